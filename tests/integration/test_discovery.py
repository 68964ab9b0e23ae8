"""NATS micro-service discovery: the three services answer `$SRV.PING|INFO|STATS` with their names, version,
endpoints and numbers, their health endpoints answer from their readiness, and they leave when they stop."""

import asyncio
import importlib.metadata
import json
import time
import urllib.request
import uuid

import nats
import pytest
from nats.errors import NoRespondersError

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.transcriber.model import load_model
from jetscribe.shared import subjects
from jetscribe.shared.discovery import register
from jetscribe.shared.health import Readiness
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import Reply, decode, encode
from tests.integration.running import NAMES, endpoint_data, gather_replies, running_services
from tests.integration.test_ingest import chunk

VERSION = importlib.metadata.version("jetscribe")


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    """Its own server: only this test's services answer `$SRV.*` on it."""
    with NatsServer(tmp_path_factory.mktemp("discovery-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny.en")


def read_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read()


async def metric_total(info: dict, name: str) -> float:
    """The sum of a counter's series on the /metrics of the instance `info` describes."""
    url = f"http://127.0.0.1:{info['metadata']['metrics_port']}/metrics"
    text = (await asyncio.to_thread(read_url, url)).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def by_name(replies: list[dict]) -> dict[str, dict]:
    named = {r["name"]: r for r in replies}
    assert sorted(named) == sorted(NAMES) and len(replies) == len(NAMES), replies
    return named


async def test_the_three_services_answer_ping_info_and_stats(own_nats, database_url, tiny):
    worker_id = f"w-{uuid.uuid4().hex[:6]}"
    async with running_services(own_nats.url, database_url, tiny, worker_id) as nc:
        pings = by_name(await gather_replies(nc, "$SRV.PING"))
        for name, ping in pings.items():
            assert ping["type"] == "io.nats.micro.v1.ping_response"
            assert ping["version"] == VERSION, name
        assert pings["jetscribe-transcriber"]["metadata"]["worker_id"] == worker_id

        infos = by_name(await gather_replies(nc, "$SRV.INFO"))
        ports = set()
        for name, info in infos.items():
            service = name.removeprefix("jetscribe-")
            assert info["type"] == "io.nats.micro.v1.info_response" and info["description"]
            assert {e["name"]: e["subject"] for e in info["endpoints"]} == {
                "health": subjects.service_endpoint(service, info["id"], "health"),
                "stats": subjects.service_endpoint(service, info["id"], "stats"),
            }
            assert info["metadata"]["pid"] and info["metadata"]["host"]
            # JETSCRIBE_METRICS_PORT is 0 here: each picked a free port, announced here, where /readyz answers
            ports.add(port := int(info["metadata"]["metrics_port"]))
            readyz = await asyncio.to_thread(read_url, f"http://127.0.0.1:{port}/readyz")  # served on this loop
            assert json.loads(readyz)["service"] == service
        assert len(ports) == 3 and 0 not in ports
        worker = infos["jetscribe-transcriber"]["metadata"]
        assert worker["model"] == "tiny.en" and worker["device"] == "cpu"
        assert worker["partitions"] == ",".join(str(p) for p in range(16))
        gateway_meta = infos["jetscribe-ingest"]["metadata"]  # a lone gateway serves every partition
        assert gateway_meta["gateway_id"] and gateway_meta["partitions"] == worker["partitions"]

        # Every health endpoint, asked directly, says ready with no error header.
        for info in infos.values():
            health = next(e["subject"] for e in info["endpoints"] if e["name"] == "health")
            answer = await nc.request(health, b"", timeout=2)
            assert not (answer.headers or {}).get("Nats-Service-Error-Code")
            assert json.loads(answer.data)["ready"] is True

        # Some work to count: a refused chunk (no start yet), then a whole session.
        refused = decode(
            (await nc.request(subjects.ingest_audio("acme", "nostart"), encode(chunk("acme", "nostart", 0)))).data,
            Reply,
        )
        assert refused.code == "unknown_session"
        speech = sample_speech()
        result = await stream_audio(
            nc, Audio(speech.audio, speech.sample_rate), tenant="acme", session_id="disc1", speed=0.0
        )
        assert result.finals and result.ended is not None

        stats = by_name(await gather_replies(nc, "$SRV.STATS"))
        for name, reply in stats.items():
            assert reply["type"] == "io.nats.micro.v1.stats_response" and reply["version"] == VERSION
            assert endpoint_data(reply, "health")["ready"] is True, name
        gateway = endpoint_data(stats["jetscribe-ingest"], "stats")
        assert gateway["chunks"] == gateway["chunks_last_min"] == len(result.sent_at)
        assert gateway["audio_s"] == pytest.approx(len(speech.audio) / speech.sample_rate, abs=0.1)
        assert gateway["refusals"] == {"unknown_session": 1}
        assert gateway["sessions"] == 0  # the bot ended it

        transcriber = endpoint_data(stats["jetscribe-transcriber"], "stats")
        assert transcriber["worker_id"] == worker_id and transcriber["partitions"] == list(range(16))
        assert transcriber["finals"] == transcriber["finals_last_min"] == len(result.finals)
        p50, p95 = transcriber["final_latency_s"]["p50"], transcriber["final_latency_s"]["p95"]
        assert 0 < p50 <= p95 < 60
        assert transcriber["decode_calls_last_min"] > 0 and 0 < transcriber["decode_busy"] <= 1
        assert transcriber["sessions"] == 0 and transcriber["errors"] == {}

        # The persister catches up with every segment and event TRANSCRIPTS holds, one row each (the transcribers'
        # claims on their partitions live there too, and are not for it).
        held = await nc.jetstream().stream_info(subjects.TRANSCRIPTS_STREAM, subjects_filter=">")
        stored = sum(n for subject, n in (held.state.subjects or {}).items() if not subject.startswith("claim."))
        deadline = time.monotonic() + 30
        while (
            persister := endpoint_data(by_name(await gather_replies(nc, "$SRV.STATS"))["jetscribe-persister"], "stats")
        )["messages"] < stored:
            assert time.monotonic() < deadline, persister
        assert persister["messages"] == stored and persister["dropped"] == {} and persister["behind_s"] == 0
        assert persister["rows"] > 0 and persister["write_latency_s"]["p50"] > 0
        # The same counts as the services' Prometheus metrics, read from the port each announced.
        assert await metric_total(infos["jetscribe-persister"], "jetscribe_persister_rows_total") == persister["rows"]
        assert await metric_total(infos["jetscribe-ingest"], "jetscribe_ingest_chunks_total") == gateway["chunks"]

        # The stats endpoint, asked directly, answers the same report.
        direct = next(e["subject"] for e in infos["jetscribe-ingest"]["endpoints"] if e["name"] == "stats")
        assert json.loads((await nc.request(direct, b"", timeout=2)).data)["chunks"] == gateway["chunks"]

    # Stopped services leave the registry.
    async with await nats.connect(own_nats.url, **env_connect_options(own_nats.url)) as nc:
        assert await gather_replies(nc, "$SRV.PING") == []


async def test_health_answers_not_ready_with_a_503_until_every_check_is_up(nats_url):
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    readiness = Readiness("probe").need("database")
    registration = await register(nc, "probe", description="a test", readiness=readiness, stats=lambda: {"n": 1})
    try:
        health = subjects.service_endpoint("probe", registration.id, "health")
        answer = await nc.request(health, b"", timeout=2)
        assert answer.headers["Nats-Service-Error-Code"] == "503"
        assert answer.headers["Nats-Service-Error"] == "not ready (database: starting)"
        assert json.loads(answer.data) == {"service": "probe", "ready": False, "checks": {"database": "starting"}}
        stats = (await gather_replies(nc, f"$SRV.STATS.jetscribe-probe.{registration.id}"))[0]
        assert endpoint_data(stats, "health")["ready"] is False and endpoint_data(stats, "stats") == {"n": 1}

        readiness.up("database")
        answer = await nc.request(health, b"", timeout=2)
        assert not answer.headers and json.loads(answer.data)["ready"] is True
    finally:
        await registration.stop()
    with pytest.raises(NoRespondersError):
        await nc.request(f"$SRV.PING.jetscribe-probe.{registration.id}", b"", timeout=1)
    await nc.close()


async def test_a_failing_stats_report_still_answers_stats_with_the_error(nats_url):
    def broken() -> dict:
        raise RuntimeError("boom")

    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    registration = await register(nc, "broken", description="a test", readiness=Readiness("broken"), stats=broken)
    try:
        reply = (await gather_replies(nc, f"$SRV.STATS.jetscribe-broken.{registration.id}"))[0]
        assert endpoint_data(reply, "stats") == {"error": "RuntimeError('boom')"}
        assert endpoint_data(reply, "health")["ready"] is True
    finally:
        await registration.stop()
        await nc.close()
