"""`jetscribe status` against a running stack on real servers: it shows a streaming session and its worker."""

import asyncio
import json
import os
import sys
import time
import uuid

import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.transcriber.model import load_model
from tests.integration.running import endpoint_data, gather_replies, running_services


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("status-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny.en")


async def jetscribe(nats_url: str, *args: str) -> tuple[int, str, str]:
    """The `jetscribe` command as a user runs it, in its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jetscribe.cli.main",
        *args,
        env={**os.environ, "NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def worker_holds(nc, tenant: str, session: str, deadline_s: float = 30.0) -> None:
    """Until the worker's stats list the session (its first audio reached the worker)."""
    deadline = time.monotonic() + deadline_s
    while True:
        for reply in await gather_replies(nc, "$SRV.STATS.jetscribe-transcriber", 0.3):
            listed = endpoint_data(reply, "stats").get("session_list", [])
            if any((s["tenant"], s["session"]) == (tenant, session) for s in listed):
                return
        assert time.monotonic() < deadline, "the worker never listed the session"


async def test_status_once_json_shows_the_streaming_session_and_its_worker(own_nats, database_url, tiny):
    run = uuid.uuid4().hex[:6]
    worker_ids = [f"wa-{run}", f"wb-{run}"]
    tenant, session = "acme", f"st-{run}"
    async with running_services(own_nats.url, database_url, tiny, *worker_ids) as nc:
        speech = sample_speech()
        streaming = asyncio.create_task(
            stream_audio(nc, Audio(speech.audio, speech.sample_rate), tenant=tenant, session_id=session, speed=1.0)
        )
        try:
            await worker_holds(nc, tenant, session)
            code, out, err = await jetscribe(own_nats.url, "status", "--once", "--format", "json")
            assert code == 0, err
            view = json.loads(out)

            assert view["missing"] == [] and all(s["ready"] for s in view["services"])
            services = sorted(s["service"] for s in view["services"])
            assert services == ["ingest", "persister", "transcriber", "transcriber"]
            workers = {w["worker_id"]: w for w in view["workers"]}
            assert sorted(workers) == worker_ids
            owner = {p: w for w in workers for p in workers[w]["partitions"]}  # each partition held once
            assert sorted(owner) == list(range(16)) and sum(len(w["partitions"]) for w in workers.values()) == 16
            [listed] = view["sessions"]
            holder = owner[listed["partition"]]
            assert (listed["tenant"], listed["session"], listed["worker_id"]) == (tenant, session, holder)
            assert workers[holder]["sessions"] == 1 and workers[holder]["tenants"] == {tenant: 1}
            [idle] = set(workers) - {holder}
            assert workers[idle]["sessions"] == 0
            assert view["tenants"] == [{"tenant": tenant, "sessions": 1, "workers": {holder: 1}}]
            assert [(p["partition"], p["worker_id"]) for p in view["partitions"]] == sorted(owner.items())
            [gateway] = view["gateways"]
            assert gateway["sessions"] == 1 and gateway["chunks_last_min"] > 0
            [persister] = view["persisters"]
            assert persister["consumer_pending"] is not None and persister["consumer_unacked"] is not None

            code, out, err = await jetscribe(own_nats.url, "status", "--once")
            assert code == 0, err
            assert "transcriber workers" in out and all(w in out for w in worker_ids) and session in out
        finally:
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)


async def test_status_on_an_empty_nats_says_what_is_missing_and_exits_1(tmp_path):
    with NatsServer(tmp_path / "nats") as empty:
        code, out, err = await jetscribe(empty.url, "status", "--once", "--format", "json", "--wait", "0.3")
    assert code == 1, err
    view = json.loads(out)
    assert view["missing"] == ["jetscribe-ingest", "jetscribe-transcriber", "jetscribe-persister"]
    assert view["services"] == [] and view["partitions"] == []
    assert view["problems"] == [
        "stream AUDIO does not exist: no service has started on this NATS",
        "consumer persister does not exist: no persister has started",
    ]


async def test_status_unreachable_nats_is_one_line_and_exit_1():
    code, out, err = await jetscribe("nats://127.0.0.1:1", "status", "--once")
    assert code == 1 and out == ""  # a failed operation; 2 is for a wrong command line
    assert err.strip().count("\n") == 0 and "cannot reach NATS at nats://127.0.0.1:1" in err
