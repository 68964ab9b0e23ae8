"""The transcriber's asyncio shell: pull audio from its partitions, run one decode loop, publish, ack.

Decisions (what to decode, when a segment is final, which audio is accounted for) live in
`core`; this file moves bytes between JetStream, the core and the model.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import numpy as np
import webrtcvad
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from services.transcriber import model as whisper
from services.transcriber.core import CommitOptions, DecodeLoad, SessionStream, pick_next
from services.transcriber.group import PartitionGroup, PartitionLost, PartitionPuller
from shared import subjects, telemetry
from shared.config import StreamSettings, TranscriberConfig
from shared.streams import connect, ensure_checkpoints, ensure_streams
from shared.wire import (AudioChunk, AudioMessage, ErrorEvent, SessionCheckpoint, SessionControl, SessionEvent,
                         WireError, decode, encode)

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]
MAX_DECODE_ATTEMPTS = 3
FINISHED_REMEMBERED = 10_000
CHECKPOINT_EVERY_S = 2.0  # of accounted-for silence between finals


def commit_options(config: TranscriberConfig) -> CommitOptions:
    return CommitOptions(
        endpoint_silence_s=config.endpoint_silence_s, max_utterance_s=config.max_utterance_s,
        interim_every_s=config.interim_every_s, beam_size=config.beam_size,
        interim_beam_size=config.interim_beam_size, final_window=config.resolved_final_window(),
        sentence_endpoint_s=config.sentence_endpoint_s,
    )


def session_vad(aggressiveness: int):
    """A VAD of the session's own: webrtcvad keeps state between frames, so sessions must not share one."""
    vad = webrtcvad.Vad(aggressiveness)
    return lambda frame: vad.is_speech(frame, 16000)


class TranscriberWorker:
    def __init__(self, nc, settings: StreamSettings, config: TranscriberConfig, model, tracer=None):
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.config = config
        self.model = model
        self.model_name = config.model
        self.options = commit_options(config)
        self.tracer = tracer or telemetry.trace.get_tracer("jetscribe.transcriber")
        self.streams: dict[SessionKey, SessionStream] = {}
        self.partition_of: dict[SessionKey, int] = {}
        self.held: dict[SessionKey, dict[int, Msg]] = {}  # audio not yet accounted for, by seq
        self.unsaved: dict[SessionKey, list[Msg]] = {}  # accounted for, acked once a checkpoint says so
        self.saved: dict[SessionKey, tuple[int, int]] = {}  # (finals published, samples acked) at the last checkpoint
        self.end_msgs: dict[SessionKey, Msg] = {}
        self.failures: dict[SessionKey, int] = {}
        self.finished: OrderedDict[SessionKey, None] = OrderedDict()  # recently closed, to ignore redeliveries
        self.pullers: dict[int, asyncio.Task] = {}
        self.load = DecodeLoad()
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.checkpoints = None
        self.group: PartitionGroup | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings)
        self.checkpoints = await ensure_checkpoints(self.js, self.settings)
        self._tasks.append(asyncio.create_task(self._decode_loop()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self.group = PartitionGroup.from_config(self.nc, self.settings, self.config,
                                                on_assigned=self._assigned, on_revoked=self._revoked)
        await self.group.start()

    async def drain(self) -> None:
        """Stop taking audio, finalize and checkpoint every session, hand the partitions over."""
        if self.group is not None:
            await self.group.stop(release=True)
        await self.stop()

    async def crash(self) -> None:
        """Stop where everything stands, as a killed process would (tests)."""
        if self.group is not None:
            await self.group.stop(release=False)
        await self.stop()

    async def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        for task in [*self._tasks, *self.pullers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.pullers.values(), return_exceptions=True)

    # --- partitions -----------------------------------------------------------------------
    async def _assigned(self, partition: int, puller: PartitionPuller) -> None:
        self.pullers[partition] = asyncio.create_task(self._pull(partition, puller))

    async def _revoked(self, partition: int, lost: bool) -> None:
        task = self.pullers.pop(partition, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        keys = [key for key, p in self.partition_of.items() if p == partition]
        if lost:  # someone else owns it already: touch nothing, ack nothing
            for key in keys:
                self._forget(key)
            return
        await self._hand_over(keys)

    async def _hand_over(self, keys: list[SessionKey]) -> None:
        now = time.monotonic()
        for key in keys:
            if key in self.streams:
                self.streams[key].hand_over()
        self.wakeup.set()
        deadline = now + self.config.drain_timeout_s
        while any(key in self.streams and not self.streams[key].settled for key in keys):
            if time.monotonic() > deadline:
                log.warning("hand-over: sessions not finalized in %.0f s; the next owner redoes them",
                            self.config.drain_timeout_s)
                break
            await asyncio.sleep(0.05)
        for key in keys:
            await self._settle(key)
            end_msg = self.end_msgs.get(key)
            for msg in [*self.held.get(key, {}).values(), *([end_msg] if end_msg else [])]:
                await msg.nak()  # the next owner gets them at once
            self._forget(key)

    def _forget(self, key: SessionKey) -> None:
        for table in (self.streams, self.partition_of, self.held, self.unsaved, self.saved, self.end_msgs,
                      self.failures):
            table.pop(key, None)

    # --- audio in -------------------------------------------------------------------------
    async def _pull(self, partition: int, puller: PartitionPuller) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await puller.fetch(256, timeout=1.0)
            except PartitionLost:
                return
            except Exception as exc:  # NATS reconnecting: keep pulling once it is back
                log.warning("fetch on partition %d failed: %r", partition, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await self._receive(partition, msg)
                except Exception:  # one bad message must not stop the partition
                    log.exception("could not take %s; terminating it", msg.subject)
                    await msg.term()
            self.wakeup.set()

    async def _receive(self, partition: int, msg: Msg) -> None:
        try:
            message = decode(msg.data, AudioMessage)
            if isinstance(message, AudioChunk) and (message.sample_rate, message.channels, message.encoding,
                                                    len(message.payload) % 2) != (16000, 1, "pcm_s16le", 0):
                raise WireError("malformed", "stored audio must be 16 kHz mono pcm_s16le (did the gateway store it?)")
        except WireError as exc:
            parts = msg.subject.split(".")
            await self._report(parts[1] if len(parts) > 1 else "", None, exc.code, str(exc))
            await msg.term()
            return
        key = (message.tenant, message.session_id)
        if key in self.finished:
            await msg.ack()  # a late redelivery of a session that is closed
            return
        stream = self.streams.get(key)
        if stream is None:
            stream = await self._open(key, partition, message)
            if stream is None:
                await msg.ack()
                return
        if stream.handing_over:
            await msg.nak()  # the next owner takes it
            return
        now = time.monotonic()
        if isinstance(message, SessionControl):
            if message.action == "start":
                await msg.ack()  # a replayed start of a session already open here
                return
            stream.end(now)
            self.end_msgs[key] = msg
        else:
            samples = np.frombuffer(message.payload, dtype="<i2")
            if stream.add_audio(message.seq, samples, now) or message.seq > stream.acked_through:
                self.held[key][message.seq] = msg  # a redelivery of held audio: ack the newest delivery
            else:
                await msg.ack()
            if len(stream.buffer) > self.config.max_buffered_s * 16000:
                await self._reject(stream, "buffer_full", f"more than {self.config.max_buffered_s:g} s of audio "
                                   "waiting to be transcribed: the worker cannot keep up")
                return
        await self._settle(key)

    async def _open(self, key: SessionKey, partition: int, first: AudioChunk | SessionControl) -> SessionStream | None:
        """A session this worker has not seen: resume it from its checkpoint, or start it."""
        checkpoint = await self._load_checkpoint(key)
        if checkpoint is not None and checkpoint.finished:
            self._remember_finished(key)
            return None
        start = first if isinstance(first, SessionControl) and first.action == "start" else None
        language = start.language if start and start.language != "auto" else None
        if self.model_name.endswith(".en"):
            language = "en"
        if start and start.model and start.model != self.model_name:
            log.warning("%s/%s asked for model %s; this worker serves %s", *key, start.model, self.model_name)
        stream = SessionStream(key[0], key[1], language=language, model=self.model_name,
                               worker_id=self.config.worker_id, options=self.options,
                               is_speech=session_vad(self.config.vad_aggressiveness))
        if checkpoint is not None:
            stream.restore(checkpoint)
            log.info("%s/%s resumed from its checkpoint after seq %d", *key, checkpoint.acked_seq)
        self.streams[key] = stream
        self.partition_of[key] = partition
        self.held[key], self.unsaved[key] = {}, []
        self.saved[key] = (stream.finals_published, stream.acked_samples)
        if checkpoint is None:
            if len(self.streams) > self.config.max_sessions:
                await self._reject(stream, "worker_full", f"this worker already has {self.config.max_sessions} "
                                   "sessions (JETSCRIBE_MAX_SESSIONS_PER_WORKER)")
                return None
            await self._save_checkpoint(stream, -1, 0)  # the language is known to whoever takes over
            await self._publish_event(stream, "started")
        return stream

    async def _reject(self, stream: SessionStream, reason: str, message: str) -> None:
        key = (stream.tenant, stream.session_id)
        await self._report(*key, reason, message)
        await self._publish_event(stream, "rejected", reason)
        await self._save_checkpoint(stream, stream.last_seq, stream.received, finished=True)
        for msg in [*self.held.get(key, {}).values(), *self.unsaved.get(key, [])]:
            await msg.ack()  # nobody will transcribe it: don't let it come back
        if key in self.end_msgs:
            await self.end_msgs[key].ack()
        self._forget(key)
        self._remember_finished(key)

    def _remember_finished(self, key: SessionKey) -> None:
        self.finished[key] = None
        while len(self.finished) > FINISHED_REMEMBERED:
            self.finished.popitem(last=False)

    # --- checkpoints ----------------------------------------------------------------------
    async def _load_checkpoint(self, key: SessionKey) -> SessionCheckpoint | None:
        try:
            entry = await self.checkpoints.get(subjects.checkpoint_key(*key))
        except KeyNotFoundError:
            return None
        return decode(entry.value, SessionCheckpoint) if entry.value else None

    async def _save_checkpoint(self, stream: SessionStream, acked_seq: int, acked_samples: int,
                               finished: bool = False) -> None:
        checkpoint = stream.checkpoint(acked_seq, acked_samples, time.time(), finished)
        delay = 0.2
        while True:  # the audio it accounts for is acked only after this, so it must not be skipped
            try:
                await self.checkpoints.put(subjects.checkpoint_key(stream.tenant, stream.session_id),
                                           encode(checkpoint))
                return
            except Exception as exc:
                log.warning("checkpoint of %s/%s failed (%s); retrying", stream.tenant, stream.session_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _housekeeping(self) -> None:
        """End sessions gone idle, and keep held audio from being redelivered while it waits."""
        touch_every = self.config.ack_wait_s / 3
        touched = time.monotonic()
        while not self.stopping.is_set():
            await asyncio.sleep(min(1.0, touch_every))
            now = time.monotonic()
            for key, stream in list(self.streams.items()):
                if not stream.ending and now - stream.last_audio_at > self.config.idle_timeout_s:
                    log.info("%s/%s: no audio for %.0f s; ending it", *key, self.config.idle_timeout_s)
                    stream.end(now, reason="idle_timeout")
                    self.wakeup.set()
            if now - touched >= touch_every:
                touched = now
                waiting = [m for h in self.held.values() for m in h.values()]
                waiting += [m for u in self.unsaved.values() for m in u] + list(self.end_msgs.values())
                for msg in waiting:
                    try:
                        await msg.in_progress()
                    except Exception:  # reconnecting: the next round tries again
                        break

    # --- decoding -------------------------------------------------------------------------
    async def _decode_loop(self) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()
            stream = pick_next(list(self.streams.values()), self._interim_every())
            if stream is None:
                await self.wakeup.wait()
                continue
            try:
                await self._decode_one(stream)
            except Exception:  # keep decoding other sessions whatever one of them does
                log.exception("decode step failed for %s/%s", stream.tenant, stream.session_id)
                await asyncio.sleep(0.5)

    def _interim_every(self) -> float:
        speaking = sum(1 for s in self.streams.values() if s.open is not None)
        return self.load.interim_every(self.options.interim_every_s, speaking)

    async def _decode_one(self, stream: SessionStream) -> None:
        job = stream.next_job(self._interim_every())
        if job is None:
            return
        key = (stream.tenant, stream.session_id)
        with self.tracer.start_as_current_span("transcriber.decode") as span:
            span.set_attribute("jetscribe.kind", job.kind)
            span.set_attribute("jetscribe.audio_s", len(job.audio) / 16000)
            span.set_attribute("jetscribe.speculative", job.speculative)
            span.set_attribute("jetscribe.precomputed", job.ready is not None)
            try:
                started = time.perf_counter()
                if job.ready is not None:
                    decoded = job.ready  # decoded early, at the pause that became this endpoint
                else:
                    decoded = await asyncio.to_thread(whisper.transcribe, self.model, job)
                    self.load.observe(job, time.perf_counter() - started)
                log.debug("%s/%s: %s%s of %.1f s audio decoded in %.2f s", *key, job.kind,
                          " (early)" if job.speculative else " (ready)" if job.ready else "",
                          len(job.audio) / 16000, time.perf_counter() - started)
                self.failures.pop(key, None)
            except Exception as exc:
                attempts = self.failures[key] = self.failures.get(key, 0) + 1
                log.exception("decode of %s/%s failed (attempt %d)", *key, attempts)
                if attempts < MAX_DECODE_ATTEMPTS:
                    stream.decode_failed()
                    return
                # Give up on this utterance rather than block the session (and every session behind it).
                del self.failures[key]
                await self._report(*key, "decode_failed", f"utterance at {job.start_sample / 16000:.2f} s "
                                   f"could not be decoded: {exc}")
                segments = stream.abandon(job, time.time())
            else:
                segments = stream.apply(job, decoded, time.time())
        for segment in segments:
            # A final's id is its segment id alone: a worker that re-decodes the same utterance after a
            # takeover publishes a duplicate the stream drops. Interims are per worker and revision.
            suffix = "final" if segment.status == "final" else f"{segment.revision}:{segment.worker_id}"
            await self._publish(subjects.transcript(segment.tenant, segment.session_id), encode(segment),
                                f"{segment.tenant}:{segment.session_id}:seg:{segment.segment_id}:{suffix}")
        stream.published()
        await self._settle(key)

    async def _settle(self, key: SessionKey) -> None:
        """Ack what the core says is accounted for, behind a checkpoint; close the session once all is."""
        stream = self.streams.get(key)
        if stream is None:
            return
        held, unsaved = self.held[key], self.unsaved[key]
        for seq in stream.take_ackable():
            msg = held.pop(seq, None)
            if msg is not None:
                unsaved.append(msg)
        if stream.finished:
            # Forget the session first, so nothing settles or revives it while the event goes out.
            end_msg = self.end_msgs.get(key)
            self._forget(key)
            self._remember_finished(key)
            await self._publish_event(stream, "ended", stream.end_reason)
            await self._save_checkpoint(stream, stream.acked_through, stream.acked_samples, finished=True)
            for msg in [*unsaved, *held.values(), *([end_msg] if end_msg else [])]:
                await msg.ack()
            return
        # A checkpoint per final (or per few seconds of silence, or at a hand-over) keeps KV writes
        # few; the audio waits unacked until one covers it, so a new owner resumes exactly there.
        finals, samples = self.saved[key]
        new_final = stream.finals_published != finals
        behind_s = (stream.acked_samples - samples) / 16000
        if unsaved and (new_final or behind_s >= CHECKPOINT_EVERY_S or stream.handing_over):
            await self._save_checkpoint(stream, stream.acked_through, stream.acked_samples)
            self.saved[key] = (stream.finals_published, stream.acked_samples)
            self.unsaved[key] = []
            for msg in unsaved:
                await msg.ack()

    # --- out ------------------------------------------------------------------------------
    async def _publish_event(self, stream: SessionStream, event: str, reason: str = "") -> None:
        message = SessionEvent(
            tenant=stream.tenant, session_id=stream.session_id, event=event, at=time.time(), reason=reason,
            language=stream.language, model=stream.model, chunks_received=stream.chunks_received,
            audio_seconds=stream.received / 16000, segments=stream.next_segment_id, worker_id=self.config.worker_id,
        )
        await self._publish(subjects.session_event(stream.tenant, stream.session_id, event), encode(message),
                            f"{stream.tenant}:{stream.session_id}:event:{event}")

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish into TRANSCRIPTS, retrying until the stream has it: a decoded segment is never dropped."""
        delay = 0.2
        while True:
            try:
                await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
                return
            except Exception as exc:
                log.warning("publish to %s failed (%s); retrying", subject, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _report(self, tenant: str, session_id: str | None, code: str, message: str) -> None:
        event = ErrorEvent(tenant=tenant, session_id=session_id, code=code, message=message, at=time.time())
        log.warning("%s: %s", code, message)
        await self.nc.publish(subjects.errors("transcriber", tenant), encode(event))


async def run(settings: StreamSettings, config: TranscriberConfig, stop: asyncio.Event | None = None,
              model=None) -> None:
    tracer = telemetry.trace.get_tracer("jetscribe.transcriber")
    if model is None:
        log.info("loading Whisper %s on %s (%s)", config.model, config.device, config.compute_type)
        model = await asyncio.to_thread(whisper.load_model, config.model, config.device, config.compute_type,
                                        config.cpu_threads)
    nc = await connect(settings, f"jetscribe-transcriber-{config.worker_id}")
    worker = TranscriberWorker(nc, settings, config, model, tracer)
    await worker.start()
    log.info("transcriber %s ready; partitions: %s", config.worker_id, config.partitions)
    stop = stop or asyncio.Event()
    await stop.wait()
    log.info("transcriber %s draining", config.worker_id)
    await worker.drain()
    await nc.close()


def main() -> int:
    return telemetry.serve("transcriber",
                           lambda stop: run(StreamSettings.from_env(), TranscriberConfig.from_env(), stop))
