"""jetscribe/devstack/sizing.py: how many transcriber workers a host runs, with how many threads each."""

import pytest

from jetscribe.devstack.sizing import THREAD_VARIABLES, WorkerPlan, plan_workers, thread_env
from jetscribe.shared.config import ConfigError


@pytest.mark.parametrize(
    ("cores", "workers", "threads"),
    [(1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 4, 1), (16, 16, 1), (64, 16, 4)],
)
def test_a_cpu_host_runs_one_worker_per_core_up_to_the_partitions(cores, workers, threads):
    plan = plan_workers(cores, "cpu")
    assert (plan.transcribers, plan.threads, plan.device, plan.device_indexes) == (workers, threads, "cpu", ())
    assert plan.transcribers * plan.threads <= cores


@pytest.mark.parametrize(("cores", "asked", "threads"), [(2, 1, 2), (2, 2, 1), (8, 3, 2), (2, 4, 1)])
def test_asked_for_n_workers_each_gets_an_equal_share_of_the_cores(cores, asked, threads):
    plan = plan_workers(cores, "cpu", transcribers=asked)
    assert (plan.transcribers, plan.threads) == (asked, threads)


def test_threads_set_by_the_user_are_kept_and_decide_the_count():
    assert plan_workers(8, "cpu", threads=2) == WorkerPlan(4, 2, "cpu")
    assert plan_workers(2, "cpu", threads=4) == WorkerPlan(1, 4, "cpu")  # one worker at least, as asked
    assert plan_workers(2, "cpu", transcribers=2, threads=2) == WorkerPlan(2, 2, "cpu")  # both asked: both kept


def test_a_gpu_host_runs_one_worker_per_gpu_each_on_its_own_device():
    assert plan_workers(16, "cuda", gpus=2) == WorkerPlan(2, 8, "cuda", (0, 1))
    assert plan_workers(4, "cuda", gpus=1) == WorkerPlan(1, 4, "cuda", (0,))
    assert plan_workers(4, "cuda", gpus=2, transcribers=4) == WorkerPlan(4, 1, "cuda", (0, 1, 0, 1))
    assert plan_workers(8, "cuda", gpus=32).transcribers == 16  # never more workers than partitions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transcribers": 17}, "17 transcribers: use 1 to 16"),
        ({"transcribers": 0}, "0 transcribers: use 1 to 16"),
        ({"threads": 0}, "JETSCRIBE_CPU_THREADS=0"),
    ],
)
def test_impossible_requests_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_workers(4, "cpu", **kwargs)


def test_a_plan_needs_a_resolved_device_and_a_gpu_for_cuda():
    with pytest.raises(ConfigError, match="needs at least one GPU"):
        plan_workers(4, "cuda", gpus=0)
    with pytest.raises(ConfigError, match="plan for cpu or cuda"):
        plan_workers(4, "auto")


def test_the_plan_reads_as_one_line():
    assert plan_workers(2, "cpu").describe(2) == "2 transcribers on cpu, 1 CPU thread each of 2 cores"
    assert (
        plan_workers(16, "cuda", gpus=2).describe(16)
        == "2 transcribers on cuda (GPUs [0, 1]), 8 CPU threads each of 16 cores"
    )


def test_thread_env_holds_every_pool_to_the_share():
    env = thread_env(3)
    assert env["JETSCRIBE_CPU_THREADS"] == "3"
    assert all(env[variable] == "3" for variable in THREAD_VARIABLES)
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} <= set(env)
