"""jetscribe/devstack/stack.py's pure parts: worker names, who holds which partition, who has not settled yet."""

from jetscribe.devstack.sizing import plan_workers
from jetscribe.devstack.stack import LocalStack, holders, unsettled, worker_ids
from jetscribe.services.transcriber.partitions import assign


def test_worker_ids_are_stable_names():
    assert worker_ids("host", 3) == ["host-t0", "host-t1", "host-t2"]


def test_holders_count_only_leases_written_after_the_start():
    leases = [(0, "h-t0#aa", 10), (1, "h-t1#bb", 12), (2, "h-t0#old", 3), (3, "h-t0#aa", 11)]
    assert holders(leases, since_revision=5) == {"h-t0": [0, 3], "h-t1": [1]}
    assert holders(leases, since_revision=0) == {"h-t0": [0, 2, 3], "h-t1": [1]}


def test_a_worker_is_settled_when_it_holds_what_the_group_assigns_it():
    ours = ["h-t0", "h-t1"]
    members = dict.fromkeys(ours)
    split = assign(16, members)
    exact = {w: sorted(p for p, o in split.items() if o == w) for w in ours}
    assert unsettled(ours, 16, members, exact) == {}
    # t0 took all 16 before t1 joined and has not handed t1's half over yet
    assert unsettled(ours, 16, members, {"h-t0": list(range(16))}) == {"h-t0": (16, 8), "h-t1": (0, 8)}
    # t1 has not joined the member set yet: nobody is settled for it
    assert unsettled(ours, 16, {"h-t0": None}, {"h-t0": list(range(16))}) == {"h-t1": (0, 0)}


def test_other_members_of_a_shared_nats_count_in_the_split():
    members = {"h-t0": None, "other-host-t0": None}
    split = assign(16, members)
    mine = sorted(p for p, o in split.items() if o == "h-t0")
    assert unsettled(["h-t0"], 16, members, {"h-t0": mine}) == {}


def test_each_worker_gets_its_id_its_thread_share_and_on_cuda_its_gpu_and_batch(tmp_path):
    stack = LocalStack(tmp_path)
    stack.transcriber_ids = worker_ids("h", 2)
    stack.plan = plan_workers(8, "cpu", transcribers=2)
    cpu = stack._worker_env({"JETSCRIBE_MODEL": "base"}, 1)
    assert cpu["JETSCRIBE_WORKER_ID"] == "h-t1" and cpu["JETSCRIBE_MODEL"] == "base"
    assert [cpu[v] for v in ("JETSCRIBE_CPU_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")] == ["4"] * 3
    assert "JETSCRIBE_DEVICE_INDEX" not in cpu and "JETSCRIBE_MAX_BATCH" not in cpu

    stack.plan = plan_workers(8, "cuda", gpus=2)
    gpu = [stack._worker_env({"JETSCRIBE_DEVICE": "auto"}, i) for i in range(2)]
    assert [(e["JETSCRIBE_DEVICE"], e["JETSCRIBE_DEVICE_INDEX"], e["JETSCRIBE_MAX_BATCH"]) for e in gpu] == [
        ("cuda", "0", "32"),
        ("cuda", "1", "32"),
    ]
    assert stack._worker_env({"JETSCRIBE_MAX_BATCH": "16"}, 0)["JETSCRIBE_MAX_BATCH"] == "16"  # the user's stays


def test_a_seed_that_is_not_the_operators_or_a_services_connects_as_a_tenant(tmp_path, monkeypatch):
    from jetscribe.devstack.keys import Keyring
    from jetscribe.devstack.stack import connects_as_tenant
    from jetscribe.shared.natsauth import ClientAuth

    monkeypatch.setenv("JETSCRIBE_NATS_KEYS", str(tmp_path / "nats-keys"))
    keys = Keyring(tmp_path / "nats-keys").ensure_services()
    tenant = keys.add_tenant("acme")
    elsewhere = tmp_path / "other.nk"
    elsewhere.write_bytes(keys.path("operator").read_bytes())  # the operator's seed, copied: still the operator
    assert not connects_as_tenant(ClientAuth(), tmp_path)
    assert not connects_as_tenant(ClientAuth(str(keys.path("operator"))), tmp_path)
    assert not connects_as_tenant(ClientAuth(str(elsewhere)), tmp_path)
    assert connects_as_tenant(ClientAuth(str(tenant)), tmp_path)
    jwt = tmp_path / "user.creds"
    jwt.write_text("-----BEGIN NATS USER JWT-----\n...")
    assert connects_as_tenant(ClientAuth(str(jwt)), tmp_path)
