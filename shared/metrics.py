"""Every metric the services record, in one place: its name, kind, unit, attributes and meaning.

Names follow the OpenTelemetry semantic conventions where one exists (`messaging.*`, `db.client.*`), else
`jetscribe.<service>.<thing>`. Attributes are bounded: tenant, worker, partition, kinds, reasons and error
codes, never a session id (one series per session would grow without end). README.md ("Operating it") lists
them all; a unit test checks the two agree, and that no attribute names a session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation, UpDownCounter

log = logging.getLogger(__name__)

Kind = Literal["counter", "updown", "histogram", "gauge"]
Attributes = Mapping[str, str | int]

# Attribute keys.
TENANT = "jetscribe.tenant"
WORKER = "jetscribe.worker"  # a transcriber's JETSCRIBE_WORKER_ID
STATUS = "jetscribe.status"  # a segment's: interim or final
REASON = "jetscribe.reason"  # why: a session event's reason, a guard's drop reason
EVENT = "jetscribe.event"  # started, ended, rejected
DECODE_KIND = "jetscribe.decode.kind"  # interim, final, speculative (an early final)
BATCH_SIZE = "jetscribe.decode.batch_size"
ERROR_TYPE = "error.type"  # an error code (the same as in the ERRORS stream) or an exception class
SYSTEM = "messaging.system"
OPERATION = "messaging.operation.name"
STREAM = "messaging.destination.name"  # a JetStream stream: AUDIO, TRANSCRIPTS
PARTITION = "messaging.destination.partition.id"
CONSUMER = "messaging.destination.subscription.name"  # a durable consumer: transcriber-p3, persister
GROUP = "messaging.consumer.group.name"
DB_SYSTEM = "db.system.name"
DB_OPERATION = "db.operation.name"
DB_TABLE = "db.collection.name"

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


@dataclass(frozen=True)
class Spec:
    """One metric: what the README's table says of it, and what it is created with."""

    name: str
    kind: Kind
    unit: str
    attributes: tuple[str, ...]
    description: str
    buckets: tuple[float, ...] | None = None  # histograms


# --- ingest -------------------------------------------------------------------------------------------------
INGEST_REQUEST_DURATION = Spec(
    "messaging.process.duration",
    "histogram",
    "s",
    (SYSTEM, OPERATION, TENANT, ERROR_TYPE),
    "time the gateway takes to answer one bot request (ingest.audio or ingest.session): decode, check, store; "
    "error.type is the refusal code, if refused",
    REQUEST_BUCKETS,
)
INGEST_CHUNKS = Spec("jetscribe.ingest.chunks", "counter", "{chunk}", (TENANT,), "bot chunks accepted and stored")
INGEST_AUDIO = Spec(
    "jetscribe.ingest.audio", "counter", "s", (TENANT,), "audio stored into AUDIO (16 kHz mono), the end's tail too"
)
INGEST_REFUSALS = Spec(
    "jetscribe.ingest.refusals",
    "counter",
    "{request}",
    (TENANT, ERROR_TYPE),
    "requests refused, by error code (each also published on errors.ingest.<tenant>)",
)

# --- transcriber --------------------------------------------------------------------------------------------
CONSUMED = Spec(
    "messaging.client.consumed.messages",
    "counter",
    "{message}",
    (SYSTEM, STREAM, GROUP, PARTITION, WORKER),
    "messages pulled from a stream (AUDIO by the transcribers, TRANSCRIPTS by the persister), redeliveries too",
)
REDELIVERIES = Spec(
    "jetscribe.transcriber.redeliveries",
    "counter",
    "{message}",
    (PARTITION, WORKER),
    "AUDIO messages delivered more than once (a takeover, an ack wait that ran out)",
)
TRANSCRIBER_AUDIO = Spec(
    "jetscribe.transcriber.audio", "counter", "s", (TENANT, WORKER), "new audio received (repeats not counted)"
)
SESSIONS_ACTIVE = Spec(
    "jetscribe.transcriber.session.active", "updown", "{session}", (TENANT, WORKER), "sessions open on the worker"
)
SESSION_EVENTS = Spec(
    "jetscribe.transcriber.session.events",
    "counter",
    "{event}",
    (TENANT, WORKER, EVENT, REASON),
    "session events published: started; ended (reason empty, idle_timeout, refused (the gateway refused a WebSocket "
    "session's input) or given (a bot's end gave another reason)); rejected (worker_full, buffer_full)",
)
TAKEOVERS = Spec(
    "jetscribe.transcriber.session.takeovers",
    "counter",
    "{session}",
    (TENANT, WORKER),
    "sessions resumed from a checkpoint another worker wrote (a crash or a hand-over)",
)
FENCED_STEPS = Spec(
    "jetscribe.transcriber.session.fenced_steps",
    "counter",
    "{step}",
    (TENANT, WORKER),
    "steps of a session (segments, events, checkpoint, acks) left to its partition's next owner: the partition was "
    "not this worker's any more (its lease lapsed, or a stream refused a write made under a superseded claim)",
)
BUFFERED = Spec(
    "jetscribe.transcriber.buffered",
    "gauge",
    "s",
    (TENANT, WORKER),
    "audio held in the sessions' buffers, waiting for its final",
)
DECODE_DURATION = Spec(
    "jetscribe.transcriber.decode.duration",
    "histogram",
    "s",
    (DECODE_KIND, BATCH_SIZE, WORKER),
    "wall time of one decode call (a batch of jobs), by kind and batch size",
    LATENCY_BUCKETS,
)
DECODE_BATCH = Spec(
    "jetscribe.transcriber.decode.batch.size",
    "histogram",
    "{job}",
    (DECODE_KIND, WORKER),
    "jobs decoded together in one call",
    COUNT_BUCKETS,
)
DECODE_AUDIO = Spec(
    "jetscribe.transcriber.decode.audio", "counter", "s", (DECODE_KIND, WORKER), "audio decoded, by kind"
)
REAL_TIME_FACTOR = Spec(
    "jetscribe.transcriber.decode.real_time_factor",
    "histogram",
    "1",
    (DECODE_KIND, WORKER),
    "decode seconds per second of audio in one call (under 1: faster than real time)",
    RTF_BUCKETS,
)
QUEUE_DELAY = Spec(
    "jetscribe.transcriber.queue.delay",
    "histogram",
    "s",
    (DECODE_KIND, WORKER),
    "from the worker receiving a job's newest audio to its decode starting",
    LATENCY_BUCKETS,
)
FINAL_LATENCY = Spec(
    "jetscribe.transcriber.final.latency",
    "histogram",
    "s",
    (TENANT, WORKER),
    "from the gateway receiving the chunk with a final's last word to the final published (two hosts' clocks)",
    LATENCY_BUCKETS,
)
FIRST_INTERIM_LATENCY = Spec(
    "jetscribe.transcriber.first_interim.latency",
    "histogram",
    "s",
    (TENANT, WORKER),
    "from the gateway receiving the chunk with a segment's first word to its first interim published",
    LATENCY_BUCKETS,
)
SEGMENTS = Spec(
    "jetscribe.transcriber.segments",
    "counter",
    "{segment}",
    (TENANT, WORKER, STATUS),
    "segments published into TRANSCRIPTS, interim or final",
)
WORDS_DROPPED = Spec(
    "jetscribe.transcriber.words.dropped",
    "counter",
    "{word}",
    (TENANT, WORKER, REASON),
    "words the guards removed from finals: loop, silence, trailing",
)
EMPTY_FINALS = Spec(
    "jetscribe.transcriber.finals.empty",
    "counter",
    "{segment}",
    (TENANT, WORKER),
    "finals that came out empty although their audio held speech",
)
TRANSCRIBER_ERRORS = Spec(
    "jetscribe.transcriber.errors",
    "counter",
    "{error}",
    (TENANT, WORKER, ERROR_TYPE),
    "errors reported on errors.transcriber.<tenant> (bad stored audio, decode_failed, buffer_full, ...)",
)
PARTITIONS_OWNED = Spec(
    "jetscribe.transcriber.partitions.owned", "gauge", "{partition}", (WORKER,), "AUDIO partitions this worker holds"
)
PARTITION_ACQUISITIONS = Spec(
    "jetscribe.transcriber.partition.acquisitions",
    "counter",
    "{partition}",
    (PARTITION, WORKER),
    "partitions taken (at start, after a rebalance, or over from a dead worker)",
)
CHECKPOINT_WRITES = Spec(
    "jetscribe.transcriber.checkpoint.writes",
    "counter",
    "{write}",
    (TENANT, WORKER),
    "session checkpoints stored in KV session_checkpoints (each before the audio it covers is acked)",
)

# --- JetStream consumers (the transcribers for their partitions, the persister for its consumer) ----------------
CONSUMER_PENDING = Spec(
    "jetscribe.jetstream.consumer.pending",
    "gauge",
    "{message}",
    (STREAM, CONSUMER, PARTITION),
    "messages in the stream not yet delivered to the consumer: its lag (polled with consumer info)",
)
CONSUMER_ACK_PENDING = Spec(
    "jetscribe.jetstream.consumer.ack_pending",
    "gauge",
    "{message}",
    (STREAM, CONSUMER, PARTITION),
    "messages delivered to the consumer and not yet acked",
)

# --- persister ----------------------------------------------------------------------------------------------
ROWS = Spec(
    "jetscribe.persister.rows",
    "counter",
    "{row}",
    (DB_TABLE, TENANT, STATUS),
    "rows upserted: segments (status interim or final: the version a batch keeps) and sessions",
)
PERSIST_BATCH = Spec(
    "jetscribe.persister.batch.size",
    "histogram",
    "{message}",
    (),
    "messages written in one transaction",
    COUNT_BUCKETS,
)
WRITE_DURATION = Spec(
    "db.client.operation.duration",
    "histogram",
    "s",
    (DB_SYSTEM, DB_OPERATION, ERROR_TYPE),
    "one batch's transaction in PostgreSQL, failed attempts too (error.type set)",
    REQUEST_BUCKETS,
)
WRITE_RETRIES = Spec(
    "jetscribe.persister.retries",
    "counter",
    "{retry}",
    (ERROR_TYPE,),
    "batch writes retried while PostgreSQL is unavailable",
)
POISON = Spec(
    "jetscribe.persister.dropped",
    "counter",
    "{message}",
    (TENANT, ERROR_TYPE),
    "messages that can never be stored, reported on errors.persister.<tenant> and terminated",
)

# --- web (the captions page and session browser) ------------------------------------------------------------
WEB_REFUSALS = Spec(
    "jetscribe.web.refusals",
    "counter",
    "{request}",
    (ERROR_TYPE,),
    "session browser requests refused (no API key, an unknown key, session or export format), by error code",
)

ALL: tuple[Spec, ...] = tuple(value for value in list(globals().values()) if isinstance(value, Spec))


# --- instruments --------------------------------------------------------------------------------------------
def counter(meter: Meter, spec: Spec) -> Counter:
    assert spec.kind == "counter", spec
    return meter.create_counter(spec.name, spec.unit, spec.description)


def updown(meter: Meter, spec: Spec) -> UpDownCounter:
    assert spec.kind == "updown", spec
    return meter.create_up_down_counter(spec.name, spec.unit, spec.description)


def histogram(meter: Meter, spec: Spec) -> Histogram:
    assert spec.kind == "histogram", spec
    return meter.create_histogram(
        spec.name, spec.unit, spec.description, explicit_bucket_boundaries_advisory=spec.buckets
    )


Reading = Iterable[tuple[float, Attributes]]


class GaugeFeed:
    """An observable gauge whose values the service supplies when it is read (`feed`): a callable returning
    (value, attributes) pairs, called at each collection (a scrape, an OTLP export)."""

    def __init__(self, meter: Meter, spec: Spec):
        assert spec.kind == "gauge", spec
        self._read: Callable[[], Reading] = lambda: ()
        meter.create_observable_gauge(spec.name, [self._observe], spec.unit, spec.description)

    def feed(self, read: Callable[[], Reading]) -> None:
        self._read = read

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        try:
            return [Observation(value, dict(attributes)) for value, attributes in self._read()]
        except Exception:  # a scrape must not fail because one gauge could not be read
            log.exception("could not read a gauge")
            return []


class IngestMetrics:
    def __init__(self, meter: Meter):
        self.request_duration = histogram(meter, INGEST_REQUEST_DURATION)
        self.chunks = counter(meter, INGEST_CHUNKS)
        self.audio = counter(meter, INGEST_AUDIO)
        self.refusals = counter(meter, INGEST_REFUSALS)


class ConsumerLag:
    """Pending and unacked messages per consumer, from `consumer_info` every `every_s` (`poll`)."""

    def __init__(self, meter: Meter):
        self.pending = GaugeFeed(meter, CONSUMER_PENDING)
        self.ack_pending = GaugeFeed(meter, CONSUMER_ACK_PENDING)
        self._latest: dict[tuple[str, str], tuple[int, int, Attributes]] = {}
        self.pending.feed(lambda: [(p, attrs) for p, _, attrs in self._latest.values()])
        self.ack_pending.feed(lambda: [(a, attrs) for _, a, attrs in self._latest.values()])

    async def poll(
        self,
        js: Any,
        consumers: Callable[[], Iterable[tuple[str, str, int | None]]],
        stop: asyncio.Event,
        every_s: float = 5.0,
    ) -> None:
        """Until `stop`: ask the server about each (stream, consumer, partition) that `consumers` names now;
        a consumer no longer named (a partition handed over) stops being reported."""
        while not stop.is_set():
            latest: dict[tuple[str, str], tuple[int, int, Attributes]] = {}
            for stream, consumer, partition in consumers():
                try:
                    info = await js.consumer_info(stream, consumer)
                except Exception as exc:  # reconnecting, or the consumer is being made: the next round sees it
                    log.debug("consumer info of %s/%s: %r", stream, consumer, exc)
                    continue
                attrs: dict[str, str | int] = {STREAM: stream, CONSUMER: consumer}
                if partition is not None:
                    attrs[PARTITION] = str(partition)
                latest[(stream, consumer)] = (int(info.num_pending or 0), int(info.num_ack_pending or 0), attrs)
            self._latest = latest
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass


class TranscriberMetrics:
    def __init__(self, meter: Meter):
        self.consumed = counter(meter, CONSUMED)
        self.redeliveries = counter(meter, REDELIVERIES)
        self.audio = counter(meter, TRANSCRIBER_AUDIO)
        self.sessions_active = updown(meter, SESSIONS_ACTIVE)
        self.session_events = counter(meter, SESSION_EVENTS)
        self.takeovers = counter(meter, TAKEOVERS)
        self.fenced_steps = counter(meter, FENCED_STEPS)
        self.buffered = GaugeFeed(meter, BUFFERED)
        self.decode_duration = histogram(meter, DECODE_DURATION)
        self.decode_batch = histogram(meter, DECODE_BATCH)
        self.decode_audio = counter(meter, DECODE_AUDIO)
        self.real_time_factor = histogram(meter, REAL_TIME_FACTOR)
        self.queue_delay = histogram(meter, QUEUE_DELAY)
        self.final_latency = histogram(meter, FINAL_LATENCY)
        self.first_interim_latency = histogram(meter, FIRST_INTERIM_LATENCY)
        self.segments = counter(meter, SEGMENTS)
        self.words_dropped = counter(meter, WORDS_DROPPED)
        self.empty_finals = counter(meter, EMPTY_FINALS)
        self.errors = counter(meter, TRANSCRIBER_ERRORS)
        self.partitions_owned = GaugeFeed(meter, PARTITIONS_OWNED)
        self.partition_acquisitions = counter(meter, PARTITION_ACQUISITIONS)
        self.checkpoint_writes = counter(meter, CHECKPOINT_WRITES)
        self.lag = ConsumerLag(meter)


class PersisterMetrics:
    def __init__(self, meter: Meter):
        self.consumed = counter(meter, CONSUMED)
        self.rows = counter(meter, ROWS)
        self.batch_size = histogram(meter, PERSIST_BATCH)
        self.write_duration = histogram(meter, WRITE_DURATION)
        self.retries = counter(meter, WRITE_RETRIES)
        self.dropped = counter(meter, POISON)
        self.lag = ConsumerLag(meter)


class WebMetrics:
    def __init__(self, meter: Meter):
        self.refusals = counter(meter, WEB_REFUSALS)
