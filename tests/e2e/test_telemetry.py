"""The three services' telemetry, in this process against real servers: a session's counters scraped over HTTP
equal what was streamed, no label names a session, and one trace follows a chunk from the gateway through the
worker into PostgreSQL."""

import asyncio
import time
import uuid
from dataclasses import dataclass

import nats
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jetscribe.client.bot import Audio, StreamResult, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import Speech, sample_speech
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.persister.store import SessionRow, final_segments, open_engine, wait_until_ended
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.shared import metrics
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TelemetryConfig, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.telemetry import Telemetry
from tests.scrape import scrape, total, wait_until_ready

pytestmark = pytest.mark.e2e

SERVICES = ("ingest", "transcriber", "persister")
# What the Prometheus exporter may add to a metric's own attributes.
EXPORTER_LABELS = {"le"}


@dataclass
class Observed:
    tels: dict[str, Telemetry]
    spans: InMemorySpanExporter
    nats_url: str


@dataclass
class Streamed:
    tenant: str
    session: str
    speech: Speech
    live: StreamResult
    row: SessionRow
    finals: list


@pytest.fixture(scope="module")
async def observed(tmp_path_factory, postgres_server, tiny_model):
    """The pipeline with a Telemetry per service, their spans kept in memory."""
    postgres_server.create_database("observed")
    database_url = postgres_server.url("observed")
    upgrade(database_url)
    spans = InMemorySpanExporter()
    tels = {name: Telemetry(name, config=TelemetryConfig(), span_exporter=spans) for name in SERVICES}
    with NatsServer(tmp_path_factory.mktemp("observed-nats")) as server:
        settings = StreamSettings(nats_url=server.url)
        stop = asyncio.Event()
        worker = TranscriberConfig(model="tiny.en", worker_id="obs-w1", speakers_audio="off")
        tasks = [
            asyncio.create_task(run_ingest(settings, IngestConfig(), stop, tels["ingest"])),
            asyncio.create_task(run_transcriber(settings, worker, stop, model=tiny_model, tel=tels["transcriber"])),
            asyncio.create_task(
                run_persister(settings, PersisterConfig(database_url=database_url), stop, tels["persister"])
            ),
        ]
        try:
            for tel in tels.values():
                await wait_until_ready(tel, timeout_s=60)
            yield Observed(tels, spans, server.url), database_url
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for tel in tels.values():
                tel.shutdown()


@pytest.fixture(scope="module")
async def streamed(observed):
    observed, database_url = observed
    speech = sample_speech()
    tenant, session = f"obs{uuid.uuid4().hex[:6]}", f"s-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(observed.nats_url, **env_connect_options(observed.nats_url))
    try:
        live = await stream_audio(
            nc, Audio(speech.audio, speech.sample_rate), tenant=tenant, session_id=session, speed=0
        )
    finally:
        await nc.close()
    engine = open_engine(database_url)
    try:
        row = await wait_until_ended(engine, tenant, session, timeout_s=30)
        finals = await final_segments(engine, tenant, session)
    finally:
        await engine.dispose()
    return Streamed(tenant, session, speech, live, row, finals)


async def test_counters_scraped_over_http_equal_what_was_streamed(observed, streamed):
    observed, _ = observed
    tenant, live, row = streamed.tenant, streamed.live, streamed.row
    ingest, transcriber, persister = [await scrape(observed.tels[name].metrics_port) for name in SERVICES]

    chunks = total(ingest, "jetscribe_ingest_chunks_total", jetscribe_tenant=tenant)
    assert chunks == len(live.sent_by_seq) == row.chunks_received
    duration = len(streamed.speech.audio) / streamed.speech.sample_rate
    stored = total(ingest, "jetscribe_ingest_audio_seconds_total", jetscribe_tenant=tenant)
    assert stored == pytest.approx(row.audio_seconds, abs=1e-6) and stored == pytest.approx(duration, abs=0.05)
    received = total(transcriber, "jetscribe_transcriber_audio_seconds_total", jetscribe_tenant=tenant)
    assert received == pytest.approx(stored, abs=1e-6)

    segments = "jetscribe_transcriber_segments_total"
    finals = total(transcriber, segments, jetscribe_tenant=tenant, jetscribe_status="final")
    assert finals == len(live.finals) == len(streamed.finals) > 0
    rows = total(persister, "jetscribe_persister_rows_total", jetscribe_tenant=tenant, jetscribe_status="final")
    assert rows == len(streamed.finals)
    events = "jetscribe_transcriber_session_events_total"
    assert total(transcriber, events, jetscribe_tenant=tenant, jetscribe_event="started") == 1
    assert total(transcriber, events, jetscribe_tenant=tenant, jetscribe_event="ended", jetscribe_reason="") == 1
    assert total(transcriber, "jetscribe_transcriber_session_active", jetscribe_tenant=tenant) == 0

    # Every AUDIO message (the chunks, the start and the end) reached the worker; every TRANSCRIPTS message the
    # persister.
    redelivered = total(transcriber, "jetscribe_transcriber_redeliveries_total")
    consumed = "messaging_client_consumed_messages_total"
    assert total(transcriber, consumed, messaging_destination_name="AUDIO") == chunks + 2 + redelivered
    published = total(transcriber, segments, jetscribe_tenant=tenant) + total(transcriber, events)
    assert total(persister, consumed, messaging_destination_name="TRANSCRIPTS") == published

    with_words = sum(1 for segment in live.finals.values() if segment.words)
    latency = "jetscribe_transcriber_final_latency_seconds_count"
    assert total(transcriber, latency, jetscribe_tenant=tenant) == with_words
    assert total(transcriber, "jetscribe_transcriber_decode_duration_seconds_count") > 0
    assert total(transcriber, "jetscribe_transcriber_queue_delay_seconds_count") > 0
    assert total(transcriber, "jetscribe_transcriber_checkpoint_writes_total", jetscribe_tenant=tenant) > 0
    assert total(persister, "db_client_operation_duration_seconds_count") > 0
    assert total(persister, "jetscribe_persister_dropped_total") == 0

    # Consumer lag: the persister's consumer, and the worker's partitions (polled every 5 s).
    lag = "jetscribe_jetstream_consumer_pending"
    assert any(s.name == lag and s.labels[metrics.CONSUMER.replace(".", "_")] == "persister" for s in persister)
    deadline = time.monotonic() + 12
    while not any(s.name == lag for s in transcriber):
        assert time.monotonic() < deadline, "the worker never reported its partitions' lag"
        await asyncio.sleep(0.2)
        transcriber = await scrape(observed.tels["transcriber"].metrics_port)
    partitions = {s.labels["messaging_destination_partition_id"] for s in transcriber if s.name == lag}
    assert partitions == {str(p) for p in range(16)}
    assert total(transcriber, "jetscribe_transcriber_partitions_owned") == 16

    declared = {spec.name: spec for spec in metrics.ALL}
    prometheus_labels = {
        key.replace(".", "_") for spec in declared.values() for key in spec.attributes
    } | EXPORTER_LABELS
    for sample in ingest + transcriber + persister:
        assert streamed.session not in sample.labels.values(), sample
        assert not any("session" in key for key in sample.labels), sample
        if sample.name != "target_info":
            assert set(sample.labels) <= prometheus_labels, sample


async def test_one_trace_follows_a_chunk_through_all_three_services(observed, streamed):
    observed, _ = observed
    spans = observed.spans.get_finished_spans()
    session = streamed.session

    def of_session(name):
        return [s for s in spans if s.name == name and s.attributes.get("jetscribe.session") == session]

    def service(span):
        return span.resource.attributes["service.name"]

    requests = {s.context.span_id: s for s in of_session("ingest.audio")}
    assert len(requests) == len(streamed.live.sent_by_seq)
    assert len({s.context.trace_id for s in requests.values()}) == len(requests)  # a trace per chunk
    finals = of_session("transcriber.final")
    assert len(finals) == len(streamed.live.finals)
    stores = of_session("persister.store")
    for final in finals:
        trace_id = final.context.trace_id
        (chunk,) = [s for s in requests.values() if s.context.trace_id == trace_id]
        assert final.parent.span_id == chunk.context.span_id  # the chunk holding its last word
        assert any(s.parent.span_id == final.context.span_id for s in stores if s.context.trace_id == trace_id)
        assert {service(s) for s in spans if s.context.trace_id == trace_id} == {
            "jetscribe-ingest",
            "jetscribe-transcriber",
            "jetscribe-persister",
        }
        assert all(link.context.span_id in requests for link in final.links)  # the other chunks it covers
        if final.attributes["jetscribe.seq_last"] > final.attributes["jetscribe.seq_first"]:
            assert final.links
