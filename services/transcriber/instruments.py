"""What a transcriber worker tells its operators: its metrics (declared in shared/metrics.py), the spans its
segments are published in, and the tally its micro-service stats answer with (`activity`). `app.py` calls one
method per thing that happened; the attributes, the latencies and the trace links are worked out here.

Latencies run from the gateway's receive time of a chunk (`AudioChunk.received_at`) to the segment published;
the queue delay from a job's newest audio arriving at this worker to its decode starting. A segment's span
continues the trace of the chunk holding its last word; a final's span links to the other chunks it covers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanKind, Tracer, set_span_in_context

from jetscribe.services.transcriber.arrivals import Arrival, ChunkArrivals
from jetscribe.services.transcriber.decoding import DecodeJob
from jetscribe.services.transcriber.transcript import FinalAudit
from jetscribe.shared import subjects
from jetscribe.shared.activity import WorkerActivity
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.metrics import (
    BATCH_SIZE,
    DECODE_KIND,
    ERROR_TYPE,
    EVENT,
    GROUP,
    PARTITION,
    REASON,
    STATUS,
    STREAM,
    SYSTEM,
    TENANT,
    WORKER,
    TranscriberMetrics,
)
from jetscribe.shared.wire import REFUSED_PREFIX, Segment, SessionEvent

Attributes = dict[str, str | int]


class WorkerInstruments:
    """One worker's metrics and segment spans."""

    def __init__(self, meter: Meter, tracer: Tracer, worker_id: str, now: Callable[[], float] = time.monotonic):
        self.metrics = TranscriberMetrics(meter)
        self.tracer = tracer
        self.worker_id = worker_id
        self.activity = WorkerActivity(now)  # `now`: the worker's monotonic clock

    def attrs(self, tenant: str) -> Attributes:
        return {TENANT: tenant, WORKER: self.worker_id}

    def watch(
        self,
        buffered: Callable[[], Iterable[tuple[str, int]]],
        partitions: Callable[[], int],
    ) -> None:
        """What the gauges read at each scrape: (tenant, buffered samples) per session, partitions held."""

        def per_tenant() -> list[tuple[float, Attributes]]:
            samples: Counter[str] = Counter()
            for tenant, n in buffered():
                samples[tenant] += n
            return [(n / SAMPLE_RATE, self.attrs(tenant)) for tenant, n in samples.items()]

        self.metrics.buffered.feed(per_tenant)
        self.metrics.partitions_owned.feed(lambda: [(partitions(), {WORKER: self.worker_id})])

    # --- partitions and messages -------------------------------------------------------------------------------
    def acquired(self, partition: int) -> None:
        self.metrics.partition_acquisitions.add(1, {PARTITION: str(partition), WORKER: self.worker_id})

    def pulled(self, partition: int, deliveries: Iterable[int]) -> None:
        """A fetch from a partition: each message's delivery count (above 1: a redelivery)."""
        counts = list(deliveries)
        if not counts:
            return
        where = {PARTITION: str(partition), WORKER: self.worker_id}
        consumed = {SYSTEM: "nats", STREAM: subjects.AUDIO_STREAM, GROUP: subjects.TRANSCRIBER_PRIORITY_GROUP}
        self.metrics.consumed.add(len(counts), consumed | where)
        if redelivered := sum(1 for n in counts if n > 1):
            self.metrics.redeliveries.add(redelivered, where)

    def arrived(self, arrivals: ChunkArrivals, tenant: str, arrival: Arrival) -> None:
        """New audio of a session: kept for its segments' latencies and trace, and counted."""
        arrivals.add(arrival)
        self.metrics.audio.add((arrival.end - arrival.start) / SAMPLE_RATE, self.attrs(tenant))

    # --- sessions ----------------------------------------------------------------------------------------------
    def opened(self, tenant: str, resumed_from: str | None) -> None:
        """A session opened here; `resumed_from` names the worker whose checkpoint it resumed from, if any."""
        self.metrics.sessions_active.add(1, self.attrs(tenant))
        if resumed_from and resumed_from != self.worker_id:
            self.metrics.takeovers.add(1, self.attrs(tenant))

    def fenced(self, tenant: str) -> None:
        """A step of a session not carried out: its partition is not this worker's any more."""
        self.metrics.fenced_steps.add(1, self.attrs(tenant))

    def closed(self, tenant: str) -> None:
        self.metrics.sessions_active.add(-1, self.attrs(tenant))

    def audited(self, tenant: str, audit: FinalAudit) -> None:
        """What the guards removed from one final."""
        for reason, words in Counter(d.reason for d in audit.dropped).items():
            self.metrics.words_dropped.add(words, self.attrs(tenant) | {REASON: reason})
        if audit.empty_over_speech:
            self.metrics.empty_finals.add(1, self.attrs(tenant))

    def event_published(self, event: SessionEvent) -> None:
        labels: Attributes = {EVENT: event.event, REASON: reason_label(event)}
        self.metrics.session_events.add(1, self.attrs(event.tenant) | labels)
        if event.event == "rejected":
            self.activity.rejection(event.reason)

    def checkpoint_written(self, tenant: str) -> None:
        self.metrics.checkpoint_writes.add(1, self.attrs(tenant))

    def reported(self, tenant: str, code: str) -> None:
        self.metrics.errors.add(1, self.attrs(tenant) | {ERROR_TYPE: code})
        self.activity.error(code)

    # --- segments ----------------------------------------------------------------------------------------------
    def segment_span(self, arrivals: ChunkArrivals, segment: Segment) -> AbstractContextManager[Span]:
        """The span a segment is published in (its context goes into the TRANSCRIPTS message's headers)."""
        last = arrivals.at_time(segment.words[-1].end) if segment.words else arrivals.of_seq(segment.seq_last)
        links = []
        if segment.status == "final":
            links = [
                Link(chunk.context)
                for chunk in arrivals.between(segment.seq_first, segment.seq_last)
                if chunk.context is not None and chunk is not last
            ]
        parent = last.context if last is not None else None
        return self.tracer.start_as_current_span(
            f"transcriber.{segment.status}",
            context=set_span_in_context(NonRecordingSpan(parent)) if parent is not None else Context(),
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "jetscribe.tenant": segment.tenant,
                "jetscribe.session": segment.session_id,
                "jetscribe.segment_id": segment.segment_id,
                "jetscribe.revision": segment.revision,
                "jetscribe.seq_first": segment.seq_first,
                "jetscribe.seq_last": segment.seq_last,
                "jetscribe.worker": self.worker_id,
            },
        )

    def segment_published(self, arrivals: ChunkArrivals, segment: Segment, now: float) -> None:
        """Count a published segment (`now`: wall time); a final's latency from the gateway receiving its last
        word, a segment's first interim's from the gateway receiving its first word."""
        attrs = self.attrs(segment.tenant)
        self.metrics.segments.add(1, attrs | {STATUS: segment.status})
        if segment.status == "final":
            chunk = arrivals.at_time(segment.words[-1].end) if segment.words else None
            latency = max(0.0, now - chunk.received_at) if chunk is not None and chunk.received_at else None
            if latency is not None:
                self.metrics.final_latency.record(latency, attrs)
            self.activity.final(latency)
        if not segment.words:
            return
        if segment.segment_id > arrivals.first_interim_seen:
            arrivals.first_interim_seen = segment.segment_id
            chunk = arrivals.at_time(segment.words[0].end)
            if segment.status == "interim" and chunk is not None and chunk.received_at:
                self.metrics.first_interim_latency.record(max(0.0, now - chunk.received_at), attrs)

    # --- decoding ----------------------------------------------------------------------------------------------
    def decode_starts(self, work: Iterable[tuple[ChunkArrivals, DecodeJob]], now: float) -> None:
        """Each job's wait (`now`: monotonic): from its newest audio arriving here to now."""
        for arrivals, job in work:
            newest = arrivals.at(job.end_sample)
            if newest is not None:
                self.metrics.queue_delay.record(max(0.0, now - newest.arrived), self._kind(job))

    def decoded(self, jobs: list[DecodeJob], seconds: float) -> None:
        """One decode call of `jobs` took `seconds`."""
        for job in jobs:
            self.metrics.decode_audio.add(len(job.audio) / SAMPLE_RATE, self._kind(job))
        batch = self._kind(*jobs)
        self.metrics.decode_duration.record(seconds, batch | {BATCH_SIZE: len(jobs)})
        self.metrics.decode_batch.record(len(jobs), batch)
        if audio_s := sum(len(job.audio) for job in jobs) / SAMPLE_RATE:
            self.metrics.real_time_factor.record(seconds / audio_s, batch)
        self.activity.decoded([str(self._kind(job)[DECODE_KIND]) for job in jobs], seconds)

    def _kind(self, *jobs: DecodeJob) -> Attributes:
        """A decode's kind: interim, final, or speculative (an early final, decoded before its endpoint)."""
        kind = "speculative" if all(job.speculative for job in jobs) else jobs[0].kind
        return {DECODE_KIND: kind, WORKER: self.worker_id}


def reason_label(event: SessionEvent) -> str:
    """A session event's reason as a metric attribute, bounded: the transcriber's own reasons as they are, an end's
    reason (which a bot may make up) as `refused` (the gateway's, `refused: <code>`: the gateway's refusals count
    the codes) or `given`."""
    if event.event != "ended" or event.reason in ("", "idle_timeout"):
        return event.reason
    return "refused" if event.reason.startswith(REFUSED_PREFIX) else "given"
