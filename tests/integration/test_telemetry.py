"""Telemetry against real servers: the gateway's /readyz says ready only once its streams are there, its /metrics
counts what it stored and refused, and a bot's trace context carries into the AUDIO stream; the persister is not
ready while PostgreSQL is unreachable."""

import asyncio
import time
import uuid

import nats
import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from jetscribe.client.bot import request
from jetscribe.devstack.servers import NatsServer, free_port
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.shared import subjects, telemetry
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TelemetryConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import AudioChunk, SessionControl, decode
from tests.scrape import http_get, readiness, scrape, total, wait_until_ready


def chunk(tenant, session, seq, samples=8000):
    return AudioChunk(
        tenant=tenant,
        session_id=session,
        seq=seq,
        sent_at=time.time(),
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=np.zeros(samples, dtype="<i2").tobytes(),
    )


async def endpoint_port(tel, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while tel.metrics_port is None:
        assert time.monotonic() < deadline, "the endpoint never came up"
        await asyncio.sleep(0.02)
    return tel.metrics_port


async def test_ready_only_once_its_streams_exist_and_metrics_count_what_was_stored(tmp_path):
    server = NatsServer(tmp_path / "nats")  # not started: the gateway waits for it
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig())
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(StreamSettings(nats_url=server.url), IngestConfig(), stop, tel))
    tenant, session = "obs", f"s-{uuid.uuid4().hex[:8]}"
    try:
        port = await endpoint_port(tel)
        assert (await http_get(port, "/healthz"))[0] == 200
        status, report = await readiness(port)
        assert status == 503 and report["checks"] == {"streams": "starting"}

        await asyncio.to_thread(server.start)
        await wait_until_ready(tel)
        nc = await nats.connect(server.url, **env_connect_options(server.url))
        try:
            start = SessionControl(tenant=tenant, session_id=session, action="start")
            assert (await request(nc, subjects.ingest_session(tenant, session), start)).ok
            assert (await request(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0))).ok
            assert (await request(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 1, 4000))).ok
            gap = await request(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))
            assert gap.code == "seq_gap"
            stored = await nc.jetstream().get_last_msg(
                subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, session)
            )
            assert decode(stored.data, AudioChunk).received_at > 0  # the gateway's receive time travels with it
        finally:
            await nc.close()

        samples = await scrape(port)
        assert total(samples, "jetscribe_ingest_chunks_total", jetscribe_tenant=tenant) == 2
        assert total(samples, "jetscribe_ingest_audio_seconds_total", jetscribe_tenant=tenant) == 0.75
        assert total(samples, "jetscribe_ingest_refusals_total", jetscribe_tenant=tenant, error_type="seq_gap") == 1
        requests = "messaging_process_duration_seconds_count"
        assert total(samples, requests, jetscribe_tenant=tenant, messaging_operation_name="ingest.audio") == 3
        assert total(samples, requests, jetscribe_tenant=tenant, messaging_operation_name="ingest.session") == 1
        assert total(samples, requests, jetscribe_tenant=tenant, error_type="seq_gap") == 1
        for sample in samples:
            assert session not in sample.labels.values() and not any("session" in k for k in sample.labels)
    finally:
        stop.set()
        await task
        server.stop()
        tel.shutdown()
    assert tel.metrics_port is None  # the endpoint closes with the service


async def test_a_bots_trace_context_carries_into_the_audio_stream(nats_url):
    exporter = InMemorySpanExporter()
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig(), span_exporter=exporter)
    bot_spans = InMemorySpanExporter()
    bot_tracer = TracerProvider()
    bot_tracer.add_span_processor(SimpleSpanProcessor(bot_spans))
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(StreamSettings(nats_url=nats_url), IngestConfig(), stop, tel))
    tenant, session = "obs", f"t-{uuid.uuid4().hex[:8]}"
    try:
        await wait_until_ready(tel)
        nc = await nats.connect(nats_url, **env_connect_options(nats_url))
        try:
            start = SessionControl(tenant=tenant, session_id=session, action="start")
            assert (await request(nc, subjects.ingest_session(tenant, session), start)).ok
            with bot_tracer.get_tracer("bot").start_as_current_span("bot.send") as bot:
                assert (await request(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0))).ok
            stored = await nc.jetstream().get_last_msg(
                subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, session)
            )
        finally:
            await nc.close()
    finally:
        stop.set()
        await task
        tel.shutdown()
    audio_span = next(s for s in exporter.get_finished_spans() if s.name == "ingest.audio")
    assert audio_span.kind == SpanKind.SERVER
    assert audio_span.context.trace_id == bot.get_span_context().trace_id
    assert audio_span.parent.span_id == bot.get_span_context().span_id
    assert audio_span.attributes["jetscribe.session"] == session
    carried = telemetry.span_context_of(stored.headers)
    assert (carried.trace_id, carried.span_id) == (audio_span.context.trace_id, audio_span.context.span_id)
    assert stored.headers["Nats-Msg-Id"] == subjects.message_id(tenant, session, 0)
    session_span = next(s for s in exporter.get_finished_spans() if s.name == "ingest.session")
    assert session_span.parent is None  # the start was sent outside any span: a trace of its own


async def test_the_persister_is_not_ready_while_postgres_is_unreachable(nats_url):
    tel = telemetry.Telemetry("persister", config=TelemetryConfig())
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/jetscribe"
    stop = asyncio.Event()
    task = asyncio.create_task(run_persister(StreamSettings(nats_url=nats_url), PersisterConfig(closed), stop, tel))
    try:
        port = await endpoint_port(tel)
        deadline = time.monotonic() + 15
        while True:  # the consumer comes up; the database never does
            status, report = await readiness(port)
            if report["checks"]["consumer"] == "ok" and report["checks"]["database"] not in ("starting", "ok"):
                break
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.05)
        assert status == 503 and not report["ready"]
        assert "connection" in report["checks"]["database"].lower(), report
    finally:
        stop.set()
        await task
        tel.shutdown()
