"""The transcriber's asyncio shell: pull audio from its partitions, run one decode loop, carry out steps.

Decisions (what to decode, when a segment is final, which message is acked when, admission, idle
timeouts) live in `core`; this file moves bytes between JetStream, the core and the model, and carries
out each `Step` the core returns, in its one order (`_carry_out`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import psutil
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js.errors import KeyNotFoundError
from opentelemetry import metrics as otel_metrics

from jetscribe.services.transcriber import batched
from jetscribe.services.transcriber import model as whisper
from jetscribe.services.transcriber.arrivals import Arrival, ChunkArrivals
from jetscribe.services.transcriber.core import (
    CommitOptions,
    SessionLimits,
    SessionStream,
    Step,
    is_reused,
    stored_message_problem,
)
from jetscribe.services.transcriber.decoding import Decoded, DecodeJob, DecodeLoad, plan_batch
from jetscribe.services.transcriber.embedding import EmbedOptions, load_embedder
from jetscribe.services.transcriber.group import (
    CHECKPOINTS_FENCE,
    TRANSCRIPTS_FENCE,
    PartitionGroup,
    PartitionLost,
    PartitionPuller,
)
from jetscribe.services.transcriber.instruments import WorkerInstruments
from jetscribe.services.transcriber.session_log import event_line, handed_over_line, takeover_line
from jetscribe.services.transcriber.stats import STATS_EVERY_S, DecodeCounters, backlog_samples, worker_stats
from jetscribe.services.transcriber.transcript import FinalAudit
from jetscribe.services.transcriber.vad import detector_maker
from jetscribe.services.transcriber.voice_thread import VoiceThread
from jetscribe.services.transcriber.voices import VoiceMatcher, VoiceOptions
from jetscribe.shared import discovery, jetstream, subjects, telemetry
from jetscribe.shared.activity import SessionLoad
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.clock import Clock, system_clock
from jetscribe.shared.config import StreamSettings, TranscriberConfig
from jetscribe.shared.errors import brief
from jetscribe.shared.retry import Stopped, retry, stopped_within
from jetscribe.shared.streams import connect, ensure_checkpoints, ensure_streams
from jetscribe.shared.wire import (
    AudioChunk,
    AudioMessage,
    ErrorEvent,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    WireError,
    WorkerStats,
    decode,
    encode,
    language_for,
)

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]
FINISHED_REMEMBERED = 10_000
ARRIVALS_KEPT_BEHIND = 30 * SAMPLE_RATE  # chunk arrivals kept before a session's buffer, for late segments


def commit_options(config: TranscriberConfig) -> CommitOptions:
    return CommitOptions(
        endpoint_silence_s=config.endpoint_silence_s,
        max_utterance_s=config.max_utterance_s,
        interim_every_s=config.interim_every_s,
        beam_size=config.beam_size,
        interim_beam_size=config.interim_beam_size,
        final_window=config.resolved_final_window(),
        sentence_endpoint_s=config.sentence_endpoint_s,
        commit_sentences_after_s=config.commit_sentences_after_s,
        speech_above_floor_db=config.vad_above_floor_db,
    )


def session_limits(config: TranscriberConfig) -> SessionLimits:
    return SessionLimits(
        max_sessions=config.max_sessions, max_buffered_s=config.max_buffered_s, idle_timeout_s=config.idle_timeout_s
    )


@dataclass
class SessionRecord:
    """What the shell keeps per open session: its core, its partition, and the lock that makes its steps
    run one at a time, in the order the core returned them (checkpoints must not overtake each other)."""

    stream: SessionStream[Msg]
    partition: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    arrivals: ChunkArrivals = field(default_factory=ChunkArrivals)  # for latencies and trace links
    words: int = 0  # words of the finals published here, for the session's end line
    resumed: bool = False  # taken over from a checkpoint: `words` counts only since then
    voices_ahead: tuple[int, int] = (-1, 0)  # (utterance start, its windows queued for embedding ahead)


@dataclass
class FinishedSession:
    """A session that ended or was rejected: later messages are acked; a reuse of its id is reported once."""

    reported: bool = False


class TranscriberWorker:
    def __init__(
        self,
        nc,
        settings: StreamSettings,
        config: TranscriberConfig,
        model,
        tracer=None,
        clock: Clock | None = None,
        meter=None,
        embedder=None,
    ):
        """`embedder`: an `embedding.VoiceEmbedder` for speakers from the audio, or None (off)."""
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.config = config
        self.model = model
        self.model_name = config.model
        self.options = commit_options(config)
        self.limits = session_limits(config)
        self.new_vad = detector_maker(  # one Silero model for all sessions; each session its own state
            config.vad, threshold=config.vad_threshold, aggressiveness=config.vad_aggressiveness
        )
        self.clock = clock or system_clock()
        self.tracer = tracer or telemetry.trace.get_tracer("jetscribe.transcriber")
        meter = meter or otel_metrics.get_meter("jetscribe.transcriber")
        self.instruments = WorkerInstruments(meter, self.tracer, config.worker_id, self.clock.monotonic)
        self.instruments.watch(
            lambda: [(r.stream.tenant, len(r.stream.segmenter.buffer)) for r in list(self.sessions.values())],
            lambda: len(self.pullers),
        )
        self.sessions: dict[SessionKey, SessionRecord] = {}
        self.finished: OrderedDict[SessionKey, FinishedSession] = OrderedDict()  # recently closed
        self.pullers: dict[int, asyncio.Task] = {}
        self.load = DecodeLoad()
        self.batch_key = batched.plan_key_for(model, config.max_batch)  # what may share one decode call
        self.counters = DecodeCounters()
        self._process = psutil.Process()  # its CPU time and memory go into the WorkerStats
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.checkpoints = None
        self.group: PartitionGroup | None = None
        self.steps_fenced = 0  # steps left undone because their partition was not ours any more
        self._tasks: list[asyncio.Task] = []
        self.embedder = embedder
        # Voice embeddings on a thread of their own, beside the decode thread: windows as they are heard, a final's
        # last one when its decode starts, so its voices are ready when its text is and the decoder never waits.
        self.voice_thread = VoiceThread(embedder, config.speakers_nice) if embedder is not None else None
        self._voice_waits: set[asyncio.Task] = set()  # finals waiting for their voices

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings)
        self.checkpoints = await ensure_checkpoints(self.js, self.settings)
        self._tasks.append(asyncio.create_task(self._decode_loop()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._publish_stats()))
        lag = self.instruments.metrics.lag.poll(self.js, self._own_consumers, self.stopping)
        self._tasks.append(asyncio.create_task(lag))
        self.group = PartitionGroup.from_config(
            self.nc, self.settings, self.config, on_assigned=self._assigned, on_revoked=self._revoked
        )
        await self.group.start()

    async def drain(self) -> None:
        """Stop taking audio, finalize and checkpoint every session, hand the partitions over."""
        if self.group is not None:
            await self.group.stop(release=True)
        await self.stop()

    async def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        for task in [*self._tasks, *self.pullers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.pullers.values(), return_exceptions=True)
        await asyncio.gather(*self._voice_waits, return_exceptions=True)
        if self.voice_thread is not None:
            await asyncio.to_thread(self.voice_thread.close)

    # --- partitions -----------------------------------------------------------------------
    async def _assigned(self, partition: int, puller: PartitionPuller) -> None:
        self.pullers[partition] = asyncio.create_task(self._pull(partition, puller))
        self.instruments.acquired(partition)

    async def _revoked(self, partition: int, lost: bool) -> None:
        task = self.pullers.pop(partition, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        records = [r for r in self.sessions.values() if r.partition == partition]
        if lost:  # someone else owns it already: touch nothing, ack nothing
            for record in records:
                record.stream.drop()
                self._forget(record)
            return
        await self._hand_over(records)

    async def _hand_over(self, records: list[SessionRecord]) -> None:
        for record in records:
            await self._carry_out(record, record.stream.hand_over())
        self.wakeup.set()
        deadline = self.clock.monotonic() + self.config.drain_timeout_s
        while any(not r.stream.gone for r in records):
            if self.clock.monotonic() > deadline:
                log.warning(
                    "hand-over: sessions not finalized in %.0f s; the next owner redoes them",
                    self.config.drain_timeout_s,
                )
                break
            await asyncio.sleep(0.05)
        for record in records:
            await self._carry_out(record, record.stream.hand_over(force=True))
            async with record.lock:  # the steps already under way are done before the lease goes
                pass

    def _forget(self, record: SessionRecord) -> None:
        key = (record.stream.tenant, record.stream.session_id)
        if self.sessions.get(key) is record:
            del self.sessions[key]
            self.instruments.closed(record.stream.tenant)

    # --- audio in -------------------------------------------------------------------------
    async def _pull(self, partition: int, puller: PartitionPuller) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await puller.fetch(256, timeout=1.0)
            except PartitionLost:
                return
            except Exception as exc:  # NATS reconnecting: keep pulling once it is back
                log.warning("fetch on partition %d failed: %r", partition, exc)
                await stopped_within(self.stopping, 0.5)
                continue
            self.instruments.pulled(partition, (msg.metadata.num_delivered for msg in msgs))
            for msg in msgs:
                try:
                    await self._receive(partition, msg)
                except Stopped:
                    return
                except Exception:  # not the message's fault: leave it to its session's ledger or a redelivery
                    log.exception("could not take %s", msg.subject)
            self.wakeup.set()

    async def _receive(self, partition: int, msg: Msg) -> None:
        try:
            message = decode(msg.data, AudioMessage)
            # Permissions are subject rules, so the subject is what vouches for the tenant (and the session).
            if not subjects.is_audio_of(msg.subject, message.tenant, message.session_id):
                raise WireError(
                    "subject_mismatch",
                    f"audio for {message.tenant}/{message.session_id} arrived on {msg.subject!r}",
                )
            problem = stored_message_problem(message)
            if problem is not None:
                raise WireError(*problem)
        except WireError as exc:
            parts = msg.subject.split(".")
            await self._report(
                ErrorEvent(
                    tenant=parts[1] if len(parts) > 1 else "",
                    session_id=parts[2] if len(parts) > 2 else None,
                    code=exc.code,
                    message=brief(f"{msg.subject}: {exc}"),
                    at=self.clock.wall(),
                )
            )
            await msg.term()
            return
        key = (message.tenant, message.session_id)
        record = self.sessions.get(key)
        if record is None and key not in self.finished:
            record = await self._open(key, partition, message)
        if record is None:
            await self._after_finished(key, message, msg)
            return
        received = record.stream.segmenter.received
        step = record.stream.receive(message, msg)
        if isinstance(message, AudioChunk) and record.stream.segmenter.received > received:  # new audio
            trace = telemetry.span_context_of(msg.headers)
            end, now = record.stream.segmenter.received, self.clock.monotonic()
            arrival = Arrival(message.seq, received, end, message.received_at, now, trace)
            self.instruments.arrived(record.arrivals, message.tenant, arrival)
            self._voices_ahead(record)
        await self._carry_out(record, step)

    def _voices_ahead(self, record: SessionRecord) -> None:
        """Queue the windows of the open utterance heard since the last call that its final will embed."""
        utt = record.stream.open
        if self.voice_thread is None or utt is None:
            return
        segmenter = record.stream.segmenter
        if record.stream.transcript.speakers.names_all(utt.start, segmenter.vad_pos):
            return  # the bot names who talks: its labels win, voices would be wasted CPU
        start, queued = record.voices_ahead if record.voices_ahead[0] == utt.start else (utt.start, 0)
        spans = self.voice_thread.embedder.options.spans_ahead(segmenter.vad_pos - utt.start)[queued:]
        record.voices_ahead = (utt.start, queued + len(spans))
        self.voice_thread.ahead(
            _name(record), [segmenter.samples(start + lo, start + hi).astype(np.float32) / 32768.0 for lo, hi in spans]
        )

    async def _open(self, key: SessionKey, partition: int, first: AudioMessage) -> SessionRecord | None:
        """A session this worker has not seen: resume it from its checkpoint, or start it. None if its
        checkpoint says it is finished."""
        checkpoint = await self._load_checkpoint(key)
        if checkpoint is not None and checkpoint.finished:
            self._remember_finished(key)
            return None
        start = first if isinstance(first, SessionControl) and first.action == "start" else None
        if start and start.model and start.model != self.model_name:
            log.warning("%s/%s asked for model %s; this worker serves %s", *key, start.model, self.model_name)
        language = (start.options.get("language") or start.language) if start else None
        stream: SessionStream[Msg] = SessionStream(
            key[0],
            key[1],
            language=language_for(self.model_name, str(language) if language is not None else None),
            model=self.model_name,
            worker_id=self.config.worker_id,
            options=self.options,
            vad=self.new_vad(),
            clock=self.clock,
            limits=self.limits,
            checkpoint=checkpoint,
            sessions_before=len(self.sessions),
            speaker=start.speaker if start else None,
            meeting_id=start.meeting_id if start else None,
            track_start=start.track_start if start else 0.0,
            voices=self._voice_matcher() if self.embedder is not None else None,
            asked=start.options if start else None,  # a takeover's first message is audio: the checkpoint's
        )
        record = self.sessions[key] = SessionRecord(stream, partition, resumed=checkpoint is not None)
        if checkpoint is not None:
            with telemetry.log_context(*key):
                log.info("%s", takeover_line(checkpoint, self.config.worker_id, partition))
        self.instruments.opened(key[0], checkpoint.worker_id if checkpoint is not None else None)
        return record

    async def _after_finished(self, key: SessionKey, message: AudioMessage, msg: Msg) -> None:
        """A message for a finished session: a late redelivery, or a reuse of the id, which is reported once."""
        finished = self.finished[key]
        if is_reused(message) and not finished.reported:
            finished.reported = True
            log.warning("%s/%s: a new start for a session that has ended; its messages are acked unused", *key)
            await self._report(
                ErrorEvent(
                    tenant=key[0],
                    session_id=key[1],
                    code="session_ended",
                    at=self.clock.wall(),
                    message="this session has ended; its id cannot be used again: start a new session",
                )
            )
        await msg.ack()

    def _remember_finished(self, key: SessionKey) -> None:
        self.finished.setdefault(key, FinishedSession())
        while len(self.finished) > FINISHED_REMEMBERED:
            self.finished.popitem(last=False)

    # --- carrying out what the core decided -------------------------------------------------
    async def _carry_out(self, record: SessionRecord, step: Step[Msg]) -> None:
        """Do what `step` says, in the order `Step` documents, after every earlier step of the session. Once the
        session's partition is not ours (the lease lapsed, or a stream refused a write because another worker
        claimed it: group.py, 5.) the rest of the step is not done: no write, no ack; the next owner redoes it."""
        with telemetry.log_context(record.stream.tenant, record.stream.session_id):
            try:
                await self._carry_out_step(record, step)
            except PartitionLost:
                self.steps_fenced += 1
                self.instruments.fenced(record.stream.tenant)
                log.warning(
                    "%s/%s: partition %d is not ours any more: %d segment(s), %d event(s) and a checkpoint "
                    "left to its next owner",
                    record.stream.tenant,
                    record.stream.session_id,
                    record.partition,
                    len(step.segments),
                    len(step.events),
                )

    async def _carry_out_step(self, record: SessionRecord, step: Step[Msg]) -> None:
        for line in step.notes:
            log.info("%s", line)
        for audit in step.audits:
            _log_audit(record.stream, audit)
            self.instruments.audited(record.stream.tenant, audit)
        if step.closed:  # forgotten first, so new messages see it closed while the last step goes out
            self._forget(record)
            if step.checkpoint is not None and step.checkpoint.finished:
                self._remember_finished((record.stream.tenant, record.stream.session_id))
        if step.empty:
            return
        async with record.lock:
            if self.group is not None and not self.group.holds(record.partition):
                raise PartitionLost(record.partition)
            for error in step.errors:
                await self._report(error)
            for segment in step.segments:
                with self.instruments.segment_span(record.arrivals, segment):
                    await self._publish(
                        record.partition,
                        subjects.transcript(segment.tenant, segment.session_id),
                        encode(segment),
                        subjects.segment_message_id(
                            segment.tenant,
                            segment.session_id,
                            segment.segment_id,
                            segment.status,
                            segment.revision,
                            segment.worker_id,
                        ),
                    )
                self.instruments.segment_published(record.arrivals, segment, self.clock.wall())
                if segment.status == "final":
                    record.words += len(segment.words)
            for event in step.events:
                await self._publish(
                    record.partition,
                    subjects.session_event(event.tenant, event.session_id, event.event),
                    encode(event),
                    subjects.event_message_id(event.tenant, event.session_id, event.event, _event_time(event)),
                )
                self.instruments.event_published(event)
                if event.event in ("started", "ended", "rejected"):  # not every pause and onset
                    vad = record.stream.segmenter.vad
                    share = getattr(vad, "silero_share", None) if event.event == "ended" else None  # hybrid only
                    log.info("%s", event_line(event, record.partition, record.words, record.resumed, share))
            if step.checkpoint is not None:
                await self._save_checkpoint(record.partition, step.checkpoint)
                self.instruments.checkpoint_written(record.stream.tenant)
            for msg in step.ack:
                await _settle_message(msg.ack, msg)
            for msg in step.nak:
                await _settle_message(msg.nak, msg)
            if step.segments:
                record.arrivals.drop_before(record.stream.segmenter.buffer.start - ARRIVALS_KEPT_BEHIND)
            if step.closed and not step.events:  # neither ended nor rejected here: handed over
                stream = record.stream
                acked = step.checkpoint.acked_seq if step.checkpoint is not None else stream.ledger.acked_seq
                log.info(
                    "%s",
                    handed_over_line(stream.tenant, stream.session_id, self.config.worker_id, record.partition, acked),
                )

    def _own_consumers(self) -> list[tuple[str, str, int | None]]:
        """The AUDIO consumers of the partitions this worker holds, for their lag."""
        return [(subjects.AUDIO_STREAM, subjects.transcriber_consumer(p), p) for p in sorted(self.pullers)]

    # --- checkpoints ----------------------------------------------------------------------
    async def _load_checkpoint(self, key: SessionKey) -> SessionCheckpoint | None:
        try:
            entry = await self.checkpoints.get(subjects.checkpoint_key(*key))
        except KeyNotFoundError:
            return None
        return decode(entry.value, SessionCheckpoint) if entry.value else None

    async def _save_checkpoint(self, partition: int, checkpoint: SessionCheckpoint) -> None:
        """Store it, retrying, while the partition is ours (fenced: group.py, 5.): the audio it accounts for is
        acked only after this. Raises PartitionLost once the partition is not ours."""
        key = subjects.checkpoint_key(checkpoint.tenant, checkpoint.session_id)
        data, group = encode(checkpoint), self.group

        async def write() -> object:
            if group is None:  # a worker driven without a group (tests): nobody to fence against
                return await self.checkpoints.put(key, data)
            subject = jetstream.kv_subject(subjects.SESSION_CHECKPOINTS_BUCKET, key)
            return await group.write(partition, CHECKPOINTS_FENCE, subject, data)

        await retry(write, what=f"checkpoint of {key}", fatal=(PartitionLost,), stop=self.stopping, logger=log)

    async def _housekeeping(self) -> None:
        """Let the cores see time pass (idle sessions end), and keep waiting audio from being redelivered."""
        touch_every = self.config.ack_wait_s / 3
        touched = self.clock.monotonic()
        while not await stopped_within(self.stopping, min(1.0, touch_every)):
            for record in list(self.sessions.values()):
                step = record.stream.tick()
                if not step.empty:
                    self.wakeup.set()  # what it still had open gets its final
                    try:
                        await self._carry_out(record, step)
                    except Stopped:
                        return
                    except Exception:  # one session's trouble must not stop the others' idle checks
                        log.exception("could not end %s/%s", record.stream.tenant, record.stream.session_id)
            if self.clock.monotonic() - touched >= touch_every:
                touched = self.clock.monotonic()
                await self._touch_waiting()

    async def _touch_waiting(self) -> None:
        for record in list(self.sessions.values()):
            for msg in record.stream.ledger.waiting():
                try:
                    await msg.in_progress()
                except Exception:  # reconnecting, or settled meanwhile: the next round tries again
                    return

    # --- decoding -------------------------------------------------------------------------
    async def _decode_loop(self) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()
            batch = await self._next_batch()
            if not batch:
                await self.wakeup.wait()
                continue
            try:
                await self._decode(batch)
            except Stopped:
                return
            except Exception:  # keep decoding other sessions whatever one of them does
                log.exception("decode step failed for %s", ", ".join(_names(batch)))
                await stopped_within(self.stopping, 0.5)

    def _interim_every(self) -> float:
        speaking = sum(1 for r in self.sessions.values() if r.stream.open is not None)
        return self.load.interim_every(self.options.interim_every_s, speaking)

    def _plan(self) -> list[SessionRecord]:
        every = self._interim_every()
        plans = [(r, plan) for r in self.sessions.values() if (plan := r.stream.peek_job(every)) is not None]
        return plan_batch(plans, self.config.max_batch, self.batch_key)

    async def _next_batch(self) -> list[SessionRecord]:
        """The sessions to decode together next; a batch that is not full waits up to `batch_wait_ms` for
        more jobs of its kind (0: it goes at once)."""
        chosen = self._plan()
        wait_s = self.config.batch_wait_ms / 1000
        if not chosen or wait_s <= 0 or len(chosen) >= self.config.max_batch:
            return chosen
        deadline = self.clock.monotonic() + wait_s
        while len(chosen) < self.config.max_batch and (left := deadline - self.clock.monotonic()) > 0:
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), left)
            chosen = self._plan()
        return chosen

    async def _decode(self, records: list[SessionRecord]) -> None:
        every = self._interim_every()
        work = [(r, job) for r in records if (job := r.stream.next_job(every)) is not None]
        if not work:
            return
        jobs = [job for _, job in work]
        self.instruments.decode_starts(((r.arrivals, job) for r, job in work), self.clock.monotonic())
        with self.tracer.start_as_current_span("transcriber.decode") as span:
            span.set_attribute("jetscribe.kind", jobs[0].kind)
            span.set_attribute("jetscribe.batch_size", len(jobs))
            span.set_attribute("jetscribe.audio_s", sum(len(job.audio) for job in jobs) / SAMPLE_RATE)
            span.set_attribute("jetscribe.speculative", any(job.speculative for job in jobs))
            started = time.perf_counter()
            voices = asyncio.ensure_future(self._embed_voices(work))  # on its own thread, beside the decode
            results = await self._decode_jobs(jobs)
            seconds = time.perf_counter() - started
        for job in jobs:
            self.load.observe(job, seconds / len(jobs))
            self.counters.observe(job.kind, job.speculative, len(jobs), seconds, len(job.audio) / SAMPLE_RATE)
        self.instruments.decoded(jobs, seconds)
        log.debug(
            "%s: %d %s job(s), %.1f s of audio, decoded in %.2f s",
            ", ".join(_names(records)),
            len(jobs),
            jobs[0].kind,
            sum(len(job.audio) for job in jobs) / SAMPLE_RATE,
            seconds,
        )
        done = list(zip(work, results, strict=True))
        if voices.done() or not any(self._wants_voices(r, job) for r, job in work):
            await self._complete([(r, job, res) for (r, job), res in done], voices)
        else:
            # The finals wait for their voices, the decoder does not: the next batch decodes meanwhile (those
            # sessions stay busy until their step is done, so nothing of theirs is decoded out of order).
            task = asyncio.create_task(self._complete([(r, job, res) for (r, job), res in done], voices))
            self._voice_waits.add(task)
            task.add_done_callback(self._voice_done)

    async def _complete(self, done: list, voices: asyncio.Future) -> None:
        """Hand each decode result (with its voices) to its session and carry the steps out. Each session's step in
        its own order (its lock), the sessions' publishes and checkpoints side by side: one at a time, a batch of
        eight waited for eight round trips to the stream before the next decode."""
        waited = time.perf_counter()
        pieces = await voices
        if self.voice_thread is not None and any(pieces):
            self.voice_thread.totals.waited(time.perf_counter() - waited)
        results = [
            replace(res, voices=tuple(v)) if isinstance(res, Decoded) and v else res
            for (_, _, res), v in zip(done, pieces, strict=True)
        ]
        steps = [
            (record, record.stream.complete(job, res)) for (record, job, _), res in zip(done, results, strict=True)
        ]
        outcomes = await asyncio.gather(
            *(self._carry_out(record, step) for record, step in steps), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _voice_done(self, task: asyncio.Task) -> None:
        self._voice_waits.discard(task)
        self.wakeup.set()  # those sessions may have work again
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, Stopped):
            log.error("finals after their voices failed", exc_info=failure)

    def _voice_matcher(self) -> VoiceMatcher:
        return VoiceMatcher(
            VoiceOptions(
                match_similarity=self.config.speakers_match, min_turn_windows=self.config.speakers_turn_windows
            )
        )

    def _wants_voices(self, record: SessionRecord, job: DecodeJob) -> bool:
        """A job whose result may be a final, with words the bot names nobody of."""
        return (
            self.embedder is not None
            and (job.kind == "final" or job.speculative)
            and not record.stream.transcript.speakers.names_all(job.start_sample, job.end_sample)
        )

    async def _embed_voices(self, work: list[tuple[SessionRecord, DecodeJob]]) -> list[list]:
        """Voice embeddings of the jobs whose result may be a final (speakers from the audio); [] for the others,
        and for all when it is off or fails (the finals then go out without a speaker: counted and logged)."""
        wanted = [i for i, (record, job) in enumerate(work) if self._wants_voices(record, job)]
        out: list[list] = [[] for _ in work]
        if self.voice_thread is None or not wanted:
            return out
        audio = [(work[i][1].audio, work[i][1].start_sample) for i in wanted]
        try:
            pieces = await self.voice_thread.pieces(audio, [_name(work[i][0]) for i in wanted])
        except Exception:
            log.exception("voice embeddings of %d job(s) failed: their finals go out without a speaker", len(audio))
            return out
        for i, p in zip(wanted, pieces, strict=True):
            out[i] = p
        return out

    async def _decode_jobs(self, jobs: list[DecodeJob]) -> list[Decoded | BaseException]:
        """Decode in a thread: one call for the batch; if the batch fails, each job alone, so that only the
        job at fault fails (its session's retry budget counts it)."""
        try:
            return list(await asyncio.to_thread(batched.decode_jobs, self.model, jobs, self.config.max_batch))
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("decode of %s failed", _job_name(jobs[0]))
                return [exc]
            log.warning("a batch of %d jobs failed (%r); decoding them one by one", len(jobs), exc)
        results: list[Decoded | BaseException] = []
        for job in jobs:
            try:
                results.append(await asyncio.to_thread(whisper.transcribe, self.model, job))
            except Exception as exc:
                log.exception("decode of %s failed", _job_name(job))
                results.append(exc)
        return results

    # --- out ------------------------------------------------------------------------------
    def _worker_stats(self) -> WorkerStats:
        """This worker's load now: what it publishes every second, and the base of its micro-service stats."""
        cpu = self._process.cpu_times()
        return worker_stats(
            self.config.worker_id,
            [r.stream for r in self.sessions.values()],
            self.counters,
            at=self.clock.wall(),
            cpu_s=cpu.user + cpu.system,
            rss_bytes=self._process.memory_info().rss,
        )

    async def _publish_stats(self) -> None:
        """This worker's load every second on core NATS (`WorkerStats`, read by bench/load.py); best effort."""
        subject = subjects.transcriber_stats(self.config.worker_id)
        while not await stopped_within(self.stopping, STATS_EVERY_S):
            stats = self._worker_stats()
            try:
                await self.nc.publish(subject, encode(stats))
            except Exception as exc:  # NATS reconnecting: the totals carry on in the next one
                log.debug("could not publish the load stats: %r", exc)

    async def _publish(self, partition: int, subject: str, data: bytes, msg_id: str) -> None:
        """Publish into TRANSCRIPTS, retrying until the stream has it, while the partition is ours (fenced:
        group.py, 5.): a decoded segment is never dropped, only left to the partition's next owner. Raises
        PartitionLost once the partition is not ours."""
        group = self.group

        async def publish() -> object:
            headers = telemetry.inject({"Nats-Msg-Id": msg_id})
            if group is None:  # a worker driven without a group (tests): nobody to fence against
                return await self.js.publish(subject, data, headers=headers)
            return await group.write(partition, TRANSCRIPTS_FENCE, subject, data, headers)

        await retry(publish, what=f"publish to {subject}", fatal=(PartitionLost,), stop=self.stopping, logger=log)

    async def _report(self, event: ErrorEvent) -> None:
        log.warning("%s: %s", event.code, event.message)
        tenant = event.tenant if subjects.is_valid_token(event.tenant) else subjects.UNKNOWN_TENANT
        self.instruments.reported(tenant, event.code)  # a bounded label: not whatever a subject named
        try:
            await self.nc.publish(subjects.errors("transcriber", event.tenant), encode(event))
        except Exception as exc:  # a report is best effort: the log line above stays
            log.warning("could not publish the %s report: %r", event.code, exc)

    # --- discovery ------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """This worker's numbers for its micro-service `stats` endpoint: its `WorkerStats`, each session's backlog,
        and the last minute's finals, latency and decode time."""
        sessions = [
            SessionLoad(key[0], key[1], record.partition, backlog_samples(record.stream) / SAMPLE_RATE)
            for key, record in list(self.sessions.items())
            if not record.stream.gone
        ]
        partitions = self.group.owned if self.group is not None else ()
        report = self.instruments.activity.report(
            self._worker_stats(), sessions, partitions, model=self.model_name, device=self.config.device
        )
        if self.voice_thread is not None:
            embedder = self.voice_thread.embedder
            totals = {**self.voice_thread.totals.as_dict(), "windows_embedded": embedder.embedded}
            report["speakers_audio"] = {**totals, "reused": embedder.reused}
        return report

    def metadata(self) -> dict[str, str]:
        """Micro-service metadata that changes while the worker runs."""
        owned = self.group.owned if self.group is not None else ()
        return {"partitions": ",".join(str(p) for p in sorted(owned))}


def _event_time(event: SessionEvent) -> float | None:
    """The session time that tells apart the events of a kind a session has many of; None for the others."""
    return event.last_word_end if event.event == "utterance_end" else event.timestamp


def _name(record: SessionRecord) -> str:
    return f"{record.stream.tenant}/{record.stream.session_id}"


def _names(records: list[SessionRecord]) -> list[str]:
    return [_name(r) for r in records]


def _job_name(job: DecodeJob) -> str:
    return f"a {job.kind} job at sample {job.start_sample}"


def _log_audit(stream: SessionStream[Msg], audit: FinalAudit) -> None:
    """What the guards removed from one final (INFO, the words at DEBUG), and an empty final over speech (WARNING)."""
    where = f"{stream.tenant}/{stream.session_id} segment {audit.segment_id if audit.segment_id is not None else '-'}"
    if audit.dropped:
        reasons = Counter(d.reason for d in audit.dropped)
        log.info(
            "%s: guards dropped %d words (%s)",
            where,
            len(audit.dropped),
            ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())),
        )
        log.debug(
            "%s: dropped %s", where, " | ".join(f"{d.word.strip()}@{d.start:.2f}:{d.reason}" for d in audit.dropped)
        )
    if audit.empty_over_speech:
        log.warning(
            "%s: final for %.2f-%.2f s is empty although its audio held speech (%d words dropped)",
            where,
            audit.start,
            audit.end,
            len(audit.dropped),
        )


async def _settle_message(settle, msg: Msg) -> None:
    """Ack or nak one message; if NATS is away, its redelivery is recognised and acked then."""
    try:
        await settle()
    except MsgAlreadyAckdError:
        raise  # a bug in the ledger, not a network problem: never hide it
    except Exception as exc:
        log.warning("could not settle %s: %r", msg.subject, exc)


async def run(
    settings: StreamSettings,
    config: TranscriberConfig,
    stop: asyncio.Event | None = None,
    model=None,
    tel: telemetry.Telemetry | None = None,
) -> None:
    config = config.on_device(0 if config.device == "cpu" else whisper.cuda_device_count())
    needs = ("model", "streams", "consumer_group")
    async with telemetry.serving("transcriber", tel, needs=needs, instance=config.worker_id) as tel:
        if model is None:
            where = f"{config.device}:{config.device_index}" if config.device == "cuda" else config.device
            threads = config.cpu_threads or "CTranslate2's default"
            log.info(
                "loading Whisper %s on %s (%s), CPU threads: %s", config.model, where, config.compute_type, threads
            )
            model = await asyncio.to_thread(
                whisper.load_model,
                config.model,
                config.device,
                config.compute_type,
                config.cpu_threads,
                device_index=config.device_index,
            )
        embedder = await asyncio.to_thread(
            load_embedder, config.speakers_audio, EmbedOptions(hop_s=config.speakers_hop_s), config.speakers_backend
        )
        tel.readiness.up("model")
        nc = await connect(settings, f"jetscribe-transcriber-{config.worker_id}")
        worker = TranscriberWorker(nc, settings, config, model, tel.tracer, meter=tel.meter, embedder=embedder)
        registration = await discovery.register(
            nc,
            "transcriber",
            description="jetscribe transcriber worker: Whisper on the AUDIO partitions it holds, into TRANSCRIPTS",
            readiness=tel.readiness,
            stats=worker.stats,
            metadata={
                "worker_id": config.worker_id,
                "model": config.model,
                "device": f"{config.device}:{config.device_index}" if config.device == "cuda" else config.device,
                "compute_type": config.compute_type,
                "speakers_audio": "on" if embedder is not None else "off",
                "speakers_backend": embedder.backend if embedder is not None else "off",
            },
            live_metadata=worker.metadata,
            metrics_port=tel.metrics_port,
        )
        await worker.start()
        tel.readiness.up("streams")
        tel.readiness.up("consumer_group")
        log.info(
            "transcriber %s ready; partitions: %s; metrics on %s", config.worker_id, config.partitions, tel.endpoint_url
        )
        stop = stop or asyncio.Event()
        await stop.wait()
        log.info("transcriber %s draining", config.worker_id)
        tel.readiness.down("consumer_group", "draining")
        await worker.drain()
        await registration.stop()
        await nc.close()


def main() -> int:
    return telemetry.serve(
        "transcriber", lambda stop, tel: run(StreamSettings.from_env(), TranscriberConfig.from_env(), stop, tel=tel)
    )
