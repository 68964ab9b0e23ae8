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
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.transcriber import model as whisper
from services.transcriber.core import CommitOptions, DecodeLoad, SessionStream, pick_next
from shared import subjects, telemetry
from shared.config import StreamSettings, TranscriberConfig
from shared.streams import connect, ensure_streams
from shared.wire import (AudioChunk, AudioMessage, ErrorEvent, SessionControl, SessionEvent, WireError, decode,
                         encode)

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]
MAX_DECODE_ATTEMPTS = 3
FINISHED_REMEMBERED = 10_000


def commit_options(config: TranscriberConfig) -> CommitOptions:
    return CommitOptions(
        endpoint_silence_s=config.endpoint_silence_s, max_utterance_s=config.max_utterance_s,
        interim_every_s=config.interim_every_s, beam_size=config.beam_size,
        interim_beam_size=config.interim_beam_size,
    )


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
        self.vad = webrtcvad.Vad(config.vad_aggressiveness)
        self.streams: dict[SessionKey, SessionStream] = {}
        self.held: dict[SessionKey, dict[int, Msg]] = {}  # audio not yet accounted for, by seq
        self.end_msgs: dict[SessionKey, Msg] = {}
        self.failures: dict[SessionKey, int] = {}
        self.finished: OrderedDict[SessionKey, None] = OrderedDict()  # recently closed, to ignore redeliveries
        self.load = DecodeLoad()
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings)
        for partition in self.config.owned_partitions(self.settings.partitions):
            sub = await self.js.pull_subscribe(
                subjects.audio_partition_filter(partition),
                durable=subjects.transcriber_consumer(partition),
                stream=subjects.AUDIO_STREAM,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.config.ack_wait_s, max_ack_pending=20_000,
                ),
            )
            self._tasks.append(asyncio.create_task(self._pull(sub)))
        self._tasks.append(asyncio.create_task(self._decode_loop()))

    async def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- audio in -------------------------------------------------------------------------
    async def _pull(self, sub) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as exc:  # NATS reconnecting: keep pulling once it is back
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await self._receive(msg)
                except Exception:  # one bad message must not stop the partition
                    log.exception("could not take %s; terminating it", msg.subject)
                    await msg.term()
            self.wakeup.set()

    async def _receive(self, msg: Msg) -> None:
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
            await msg.ack()  # a late redelivery of a session this worker already closed
            return
        now = time.monotonic()
        if isinstance(message, SessionControl):
            if message.action == "start":
                if message.model and message.model != self.model_name:
                    log.warning("%s/%s asked for model %s; this worker serves %s", *key, message.model,
                                self.model_name)
                self._stream(key, message)
                await msg.ack()
                await self._publish_event(self.streams[key], "started")
                return
            stream = self._stream(key, None)
            stream.end(now)
            self.end_msgs[key] = msg
        else:
            stream = self._stream(key, None)
            samples = np.frombuffer(message.payload, dtype="<i2")
            if stream.add_audio(message.seq, samples, now) or message.seq > stream.acked_through:
                self.held[key][message.seq] = msg  # a redelivery of held audio: ack the newest delivery
            else:
                await msg.ack()
        await self._settle(key)

    def _stream(self, key: SessionKey, start: SessionControl | None) -> SessionStream:
        stream = self.streams.get(key)
        if stream is None:
            language = start.language if start and start.language != "auto" else None
            if self.model_name.endswith(".en"):
                language = "en"
            stream = SessionStream(key[0], key[1], language=language, model=self.model_name,
                                   worker_id=self.config.worker_id, options=self.options,
                                   is_speech=lambda frame: self.vad.is_speech(frame, 16000))
            self.streams[key] = stream
            self.held[key] = {}
        return stream

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
                decoded = job.ready or await asyncio.to_thread(whisper.transcribe, self.model, job)
                if job.ready is None:
                    self.load.observe(job, time.perf_counter() - started)
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
            await self._publish(
                subjects.transcript(segment.tenant, segment.session_id), encode(segment),
                f"{segment.tenant}:{segment.session_id}:seg:{segment.segment_id}:{segment.revision}",
            )
        stream.published()
        await self._settle(key)

    async def _settle(self, key: SessionKey) -> None:
        """Ack what the core says is accounted for; close the session once everything is."""
        stream = self.streams.get(key)
        if stream is None:
            return
        held = self.held[key]
        for seq in stream.take_ackable():
            msg = held.pop(seq, None)
            if msg is not None:
                await msg.ack()
        if stream.finished:
            # Forget the session first, so nothing settles or revives it while the event goes out.
            del self.streams[key]
            self.finished[key] = None
            while len(self.finished) > FINISHED_REMEMBERED:
                self.finished.popitem(last=False)
            await self._publish_event(stream, "ended")
            for msg in self.held.pop(key).values():
                await msg.ack()
            end_msg = self.end_msgs.pop(key, None)
            if end_msg is not None:
                await end_msg.ack()

    # --- out ------------------------------------------------------------------------------
    async def _publish_event(self, stream: SessionStream, event: str) -> None:
        message = SessionEvent(
            tenant=stream.tenant, session_id=stream.session_id, event=event, at=time.time(),
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
    log.info("transcriber %s ready on partitions %s", config.worker_id, config.partitions)
    stop = stop or asyncio.Event()
    await stop.wait()
    await worker.stop()
    await nc.close()


def main() -> int:
    return telemetry.serve("transcriber",
                           lambda stop: run(StreamSettings.from_env(), TranscriberConfig.from_env(), stop))
