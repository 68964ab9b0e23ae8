"""The transcriber on a device it cannot use: one clear line and exit code 2, never a traceback; `jetscribe up`
and LocalStack pass that line on.

This machine has no GPU (the test skips on one that does), so JETSCRIBE_DEVICE=cuda must be refused
before the worker touches NATS: the URL below points at a closed port and is never needed.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jetscribe.devstack.servers import free_port
from jetscribe.devstack.stack import LocalStack, StackError
from jetscribe.services.transcriber.model import cuda_device_count, load_model
from jetscribe.shared.config import ConfigError

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).parents[2]
NO_GPU = pytest.mark.skipif(cuda_device_count() > 0, reason="this host has a CUDA device")


def service_env(**env: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JETSCRIBE_", "PYTEST_"))},
        "JETSCRIBE_CLOCK_OFFSET_S": os.environ["JETSCRIBE_CLOCK_OFFSET_S"],
        "JETSCRIBE_MODEL": "tiny.en",
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        **env,
    }


def run_transcriber(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jetscribe.services.transcriber"],
        cwd=REPO,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=45,
    )


@NO_GPU
def test_cuda_without_a_gpu_exits_2_with_one_line():
    done = run_transcriber(JETSCRIBE_DEVICE="cuda")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "jetscribe-transcriber: JETSCRIBE_DEVICE=cuda but CTranslate2 sees no CUDA device "
        "(get_cuda_device_count() == 0): use cpu or auto"
    ]


@NO_GPU
def test_auto_runs_on_the_cpu_here_with_int8_and_says_its_threads():
    proc = subprocess.Popen(
        [sys.executable, "-m", "jetscribe.services.transcriber"],
        cwd=REPO,
        env=service_env(JETSCRIBE_DEVICE="auto", JETSCRIBE_CPU_THREADS="1"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    assert "loading Whisper tiny.en on cpu (int8), CPU threads: 1" in first, first + rest
    assert proc.returncode == 0, rest


def test_a_compute_type_the_cpu_cannot_run_is_one_clear_error():
    with pytest.raises(ConfigError, match="JETSCRIBE_COMPUTE_TYPE=float16 does not work on cpu"):
        load_model("tiny.en", "cpu", "float16")


@NO_GPU
def test_jetscribe_up_with_cuda_and_no_gpu_says_the_same_line(tmp_path):
    env = service_env(JETSCRIBE_DEVICE="cuda", JETSCRIBE_HOME=str(tmp_path / "home"))
    env.pop("NATS_URL")
    done = subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        "jetscribe up: JETSCRIBE_DEVICE=cuda but CTranslate2 sees no CUDA device (get_cuda_device_count() == 0): "
        "use cpu or auto" in done.stderr.splitlines()
    )


def test_a_worker_that_exits_at_start_is_named_with_its_last_line(tmp_path, monkeypatch):
    """What `jetscribe up` shows when a worker cannot load (e.g. a GPU whose CUDA libraries are missing):
    here a compute type the CPU cannot run."""
    for variable in ("NATS_URL", "DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    local = LocalStack(tmp_path / "home", model="tiny.en", extra_env={"JETSCRIBE_COMPUTE_TYPE": "float16"})
    with pytest.raises(StackError) as caught, local:
        pass
    assert str(caught.value) == (
        f"transcriber {local.transcriber_ids[0]} exited with code 2: jetscribe-transcriber: JETSCRIBE_COMPUTE_TYPE="
        "float16 does not work on cpu: Requested float16 compute type, but the target device or backend do not "
        "support efficient float16 computation."
    )
    assert not local.children  # everything it started is stopped
