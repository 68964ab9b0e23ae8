"""The gateway's asyncio shell: request/reply with bots, publishing into the AUDIO stream, and hearing from the
transcriber when it ends or rejects a session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from opentelemetry import metrics as otel_metrics
from opentelemetry.trace import SpanKind

from jetscribe.services.ingest.core import IngestBook, RequestRefused, SessionLedger, check_subject_matches
from jetscribe.shared import subjects, telemetry
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.config import IngestConfig, StreamSettings
from jetscribe.shared.errors import CodedError
from jetscribe.shared.metrics import ERROR_TYPE, OPERATION, SYSTEM, TENANT, IngestMetrics
from jetscribe.shared.streams import connect, ensure_streams
from jetscribe.shared.wire import (
    AudioChunk,
    AudioMessage,
    ErrorEvent,
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


class IngestGateway:
    """Answers bots on `ingest.audio.*.*` and `ingest.session.*.*`."""

    def __init__(self, nc, settings: StreamSettings, config: IngestConfig, tracer=None, meter=None):
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.book = IngestBook(config)
        self.tracer = tracer or telemetry.trace.get_tracer("jetscribe.ingest")
        self.metrics = IngestMetrics(meter or otel_metrics.get_meter("jetscribe.ingest"))
        # One lock per session keeps a session's requests in order while other sessions proceed.
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._inflight: set[asyncio.Task] = set()
        self._checkpoints = None  # the transcribers' KV bucket, once it exists

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings)
        await self.nc.subscribe(subjects.INGEST_AUDIO_ALL, cb=self._spawn(self._on_audio))
        await self.nc.subscribe(subjects.INGEST_SESSION_ALL, cb=self._spawn(self._on_session))
        # Plain subscriptions: these events are also stored in TRANSCRIPTS, where `_recall` finds them after a restart.
        for event in ("ended", "rejected"):
            await self.nc.subscribe(subjects.session_event_all(event), cb=self._on_worker_event)

    def _spawn(self, handler):
        """nats-py runs one subscription's callbacks one at a time; a task per request lets sessions
        proceed in parallel, while the per-session lock (FIFO) keeps each session's requests in order."""

        async def callback(msg: Msg) -> None:
            task = asyncio.create_task(handler(msg))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return callback

    async def _on_audio(self, msg: Msg) -> None:
        await self._serve(msg, AudioChunk, self._accept_chunk, "ingest.audio")

    async def _on_session(self, msg: Msg) -> None:
        await self._serve(msg, SessionControl, self._control, "ingest.session")

    async def _serve(self, msg: Msg, kind: type, accept: Callable[[Any], Awaitable[Reply]], span: str) -> None:
        """Decode a bot's request, check it names its own subject, run `accept` under the session's lock, answer."""
        tenant, session_id = _ids_from_subject(msg.subject)
        received_at, started = time.time(), time.perf_counter()
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
                message = decode(msg.data, kind)
                if isinstance(message, AudioChunk):
                    message.received_at = received_at  # travels with the stored chunk: final latency starts here
                check_subject_matches(message.tenant, message.session_id, tenant, session_id)
                async with self._lock(tenant, session_id):
                    reply = await accept(message)
            except CodedError as exc:
                reply = await self._refuse(tenant, session_id, exc, seq=getattr(message, "seq", None))
        await self._answer(msg, reply)
        outcome = {SYSTEM: "nats", OPERATION: span, TENANT: tenant} | ({ERROR_TYPE: reply.code} if reply.code else {})
        self.metrics.request_duration.record(time.perf_counter() - started, outcome)

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
                await self._store(verdict.store, verdict.store.seq)
            except RequestRefused:
                verdict.ledger.resampler = None  # it consumed this chunk; the bot's retry must not feed it twice
                raise
            self.book.accepted(verdict.ledger, chunk.seq)
            self.metrics.chunks.add(1, {TENANT: chunk.tenant})
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
                    await self._store(control, "start")
                except RequestRefused:
                    self.book.forget(ledger)  # not stored, so not started: the bot's retry starts it afresh
                    raise
            return Reply(ok=True, last_seq=ledger.last_seq)
        ledger, tail = self.book.end(control)
        if not ledger.ended:
            if tail is not None:  # the resampler's last few ms, stored after the bot's final chunk
                await self._store(tail, tail.seq)
            await self._store(control, "end")
            self.book.closed(ledger)
            self._locks.pop((control.tenant, control.session_id), None)
        return Reply(ok=True, last_seq=ledger.last_seq)

    async def _store(self, message: AudioMessage, seq: int | str) -> None:
        """Publish into AUDIO and wait for the stream's ack; a repeat inside the duplicate window is dropped."""
        try:
            ack = await self.js.publish(
                subjects.audio(message.tenant, message.session_id),
                encode(message),
                headers=telemetry.inject({"Nats-Msg-Id": subjects.message_id(message.tenant, message.session_id, seq)}),
            )
        except Exception as exc:  # stream unreachable (NATS restarting): the bot resends the same seq
            raise RequestRefused("unavailable", f"could not store audio, send it again: {exc!r}") from None
        if ack.duplicate:
            log.info("stream dropped a repeat of %s/%s %s", message.tenant, message.session_id, seq)
        elif isinstance(message, AudioChunk):
            self.metrics.audio.add(len(message.payload) / (2 * SAMPLE_RATE), {TENANT: message.tenant})

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
            tenant, session_id, audio[1] if audio else None, first_closing[1] if first_closing else None, checkpoint
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
        last_seq = await self._last_seq(tenant, session_id, look_up=exc.code != "unavailable")
        event = ErrorEvent(
            tenant=tenant, session_id=session_id, code=exc.code, message=str(exc), seq=seq, at=time.time()
        )
        log.warning("refused %s/%s seq=%s: %s", tenant, session_id, seq, exc)
        self.metrics.refusals.add(1, {TENANT: tenant, ERROR_TYPE: exc.code})
        try:
            await self.nc.publish(subjects.errors("ingest", tenant), encode(event))
        except Exception:  # the bot still gets its reply when the error subject is unreachable
            log.exception("could not publish error event")
        return Reply(ok=False, last_seq=last_seq, code=exc.code, message=str(exc))

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
                async with self._lock(tenant, session_id):
                    await self._recall(tenant, session_id)
        return self.book.last_seq_of(tenant, session_id)

    async def _answer(self, msg: Msg, reply: Reply) -> None:
        if msg.reply:
            await msg.respond(encode(reply))

    def _lock(self, tenant: str, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, session_id), asyncio.Lock())


def _ids_from_subject(subject: str) -> tuple[str, str]:
    parts = subject.split(".")
    return parts[2], parts[3]


async def run(
    settings: StreamSettings,
    config: IngestConfig,
    stop: asyncio.Event | None = None,
    tel: telemetry.Telemetry | None = None,
) -> None:
    async with telemetry.serving("ingest", tel, needs=("streams",)) as tel:
        nc = await connect(settings, "jetscribe-ingest")
        gateway = IngestGateway(nc, settings, config, tel.tracer, tel.meter)
        await gateway.start()
        tel.readiness.up("streams")
        log.info("ingest gateway serving on %s; metrics on %s", settings.nats_url, tel.endpoint_url)
        stop = stop or asyncio.Event()
        await stop.wait()
        tel.readiness.down("streams", "stopping")
        await nc.drain()


def main() -> int:
    return telemetry.serve(
        "ingest", lambda stop, tel: run(StreamSettings.from_env(), IngestConfig.from_env(), stop, tel)
    )
