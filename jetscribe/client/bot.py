"""What a meeting bot does: start a session, send audio chunks in order, end it, hear the transcript.

Used by `jetscribe stream`, `jetscribe demo` and the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import propagate

from jetscribe.shared import subjects
from jetscribe.shared.retry import backoff_delay
from jetscribe.shared.wire import (
    AudioChunk,
    Reply,
    Segment,
    SessionControl,
    SessionEvent,
    SpeakerChange,
    decode,
    encode,
)


class BotError(RuntimeError):
    """The gateway refused the session or a chunk for a reason resending cannot fix."""

    def __init__(self, reply: Reply):
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


@dataclass
class Audio:
    samples: np.ndarray  # int16, shape (frames,) or (frames, channels)
    sample_rate: int

    @property
    def channels(self) -> int:
        return 1 if self.samples.ndim == 1 else self.samples.shape[1]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def read_audio(path: str | Path) -> Audio:
    """WAV, FLAC, OGG or MP3 at its own rate and channel count: the gateway normalises it."""
    samples, rate = sf.read(str(path), dtype="int16", always_2d=False)
    return Audio(samples, rate)


@dataclass
class StreamResult:
    finals: dict[int, Segment] = field(default_factory=dict)  # by segment id (one session; see `tracks`)
    tracks: dict[str, dict[int, Segment]] = field(default_factory=dict)  # every track's finals, by session id
    sent_at: list[float] = field(default_factory=list)  # wall time each chunk was accepted
    sent_by_seq: dict[int, float] = field(default_factory=dict)  # wall time each accepted chunk was sent
    frames_per_chunk: int = 0  # input frames per chunk: seq n holds frames [n * this, (n + 1) * this)
    heard: list[tuple[float, Segment]] = field(default_factory=list)  # every segment, with its wall receive time
    ended: SessionEvent | None = None  # the session's `ended` event (its totals), once it arrived
    resumed_after: int = -1  # the gateway already had chunks 0..this when the bot started (-1: a new session)
    total_chunks: int = 0  # chunks the whole audio makes
    stopped: bool = False  # `stop` was set before all the audio was sent and its end arrived
    end_sent: bool = False  # the bot sent the session's `end`

    def final_segments(self) -> list[Segment]:
        """The finals in the order they were spoken; a multichannel session's tracks merged by wall time."""
        if len(self.tracks) <= 1:
            return [self.finals[k] for k in sorted(self.finals)]
        merged = [s for finals in self.tracks.values() for s in finals.values()]
        return sorted(merged, key=lambda s: (s.track_start + s.start, s.session_id, s.segment_id))

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.final_segments() if s.text)


RATE_LIMITED_MIN_WAIT_S = 0.01


async def request(nc, subject: str, message, timeout: float = 5.0, attempts: int = 20) -> Reply:
    """Request/reply with the gateway, retrying while it is unreachable (a restart, a reconnect), and sending the
    same message again after the wait a `rate_limited` answer names (those waits do not count as attempts: the
    gateway is there and says when it will take the message, so nothing is lost by waiting).

    Called inside an OpenTelemetry span, the request carries its W3C trace context (`traceparent` header), so
    the gateway's span, and the chunk's path through the pipeline, join the caller's trace."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    data = encode(message)
    attempt = 0
    while attempt < attempts:
        try:
            response = await nc.request(subject, data, timeout=timeout, headers=headers or None)
            reply = decode(response.data, Reply)
            if reply.code == "rate_limited":
                await asyncio.sleep(max(reply.retry_after_s, RATE_LIMITED_MIN_WAIT_S))
                continue
            if reply.code != "unavailable":
                return reply
        except (NatsTimeout, NoRespondersError):
            pass
        await asyncio.sleep(backoff_delay(attempt, max_s=2.0))
        attempt += 1
    raise TimeoutError(
        f"no answer from the ingest gateway on {subject} after {attempts} tries: is `jetscribe up` running there?"
    )


async def stream_audio(
    nc,
    audio: Audio,
    *,
    tenant: str,
    session_id: str,
    speed: float = 1.0,
    chunk_s: float = 0.1,
    language: str = "auto",
    on_segment: Callable[[Segment], None] | None = None,
    on_start: Callable[[StreamResult], None] | None = None,
    wait_s: float = 300.0,
    speaker: str | None = None,
    meeting_id: str | None = None,
    track_start: float | None = None,
    speaker_turns: list[tuple[float, str | None]] | None = None,
    channel_speakers: list[str] | None = None,
    stop: asyncio.Event | None = None,
    end_on_stop: bool = True,
    stop_wait_s: float = 10.0,
) -> StreamResult:
    """Stream `audio` as a bot would; returns once the session's `ended` event arrives.

    Speakers the bot knows: `speaker` is this session's participant (one track per participant, of meeting
    `meeting_id`, whose first sample was heard at wall time `track_start`, default now); `speaker_turns` are
    (seconds into the audio, who talks from there) as a platform's active-speaker events say, sent on the chunk
    holding each; `channel_speakers` names one participant per channel of `audio`: the gateway stores each
    channel as track `<session_id>-ch<N>` of meeting `session_id`, and this waits until every track ended.

    Raises BotError when the gateway refuses the session, or when the transcriber rejects it
    after the bot's last request (before that, the gateway's answer says so).

    speed 1.0 paces chunks in real time; 0 sends as fast as the gateway answers. `on_start` is called once the
    gateway accepted the session (`resumed_after` says whether it had some of it already).

    Setting `stop` stops sending: with `end_on_stop` the bot ends the session and waits up to `stop_wait_s` for
    its `ended`; without it, it returns at once and the session stays open (stream again with the same id to
    resume). Either way the result has `stopped` set.
    """
    result = StreamResult()
    ended = asyncio.Event()
    stop = stop or asyncio.Event()
    names = list(channel_speakers or [])
    tracks = [subjects.channel_track(session_id, i) for i in range(len(names))] or [session_id]
    closed: set[str] = set()

    async def on_transcript(msg):
        segment = decode(msg.data, Segment)
        result.heard.append((time.time(), segment))
        if segment.status == "final":
            result.tracks.setdefault(segment.session_id, {})[segment.segment_id] = segment
            if len(tracks) == 1:
                result.finals[segment.segment_id] = segment
        if on_segment:
            on_segment(segment)

    rejected: list[SessionEvent] = []

    async def on_ended(msg):
        result.ended = decode(msg.data, SessionEvent)
        closed.add(result.ended.session_id)
        if closed >= set(tracks):
            ended.set()

    async def on_rejected(msg):
        rejected.append(decode(msg.data, SessionEvent))
        ended.set()

    subs = []
    for track in tracks:
        subs += [
            await nc.subscribe(subjects.transcript(tenant, track), cb=on_transcript),
            await nc.subscribe(subjects.session_event(tenant, track, "ended"), cb=on_ended),
            await nc.subscribe(subjects.session_event(tenant, track, "rejected"), cb=on_rejected),
        ]
    await nc.flush()
    try:
        now = time.time()
        start = SessionControl(
            tenant=tenant,
            session_id=session_id,
            action="start",
            language=language,
            sent_at=now,
            speaker=speaker,
            meeting_id=meeting_id,
            track_start=(track_start or now) if meeting_id or names else 0.0,
            channel_speakers=names,
        )
        reply = await request(nc, subjects.ingest_session(tenant, session_id), start)
        if not reply.ok:
            raise BotError(reply)
        frames_per_chunk = result.frames_per_chunk = max(1, int(audio.sample_rate * chunk_s))
        total = result.total_chunks = (len(audio.samples) + frames_per_chunk - 1) // frames_per_chunk
        seq = reply.last_seq + 1  # a reconnecting bot resumes after what the gateway already has
        result.resumed_after = reply.last_seq
        if on_start:
            on_start(result)
        t0 = time.monotonic() - seq * chunk_s / speed if speed > 0 else 0.0
        while seq < total and not stop.is_set():
            if speed > 0 and await _stopped_within(stop, t0 + seq * chunk_s / speed - time.monotonic()):
                break
            piece = audio.samples[seq * frames_per_chunk : (seq + 1) * frames_per_chunk]
            chunk = AudioChunk(
                tenant=tenant,
                session_id=session_id,
                seq=seq,
                sent_at=time.time(),
                sample_rate=audio.sample_rate,
                channels=audio.channels,
                encoding="pcm_s16le",
                payload=np.ascontiguousarray(piece).astype("<i2").tobytes(),
                speaker_changes=changes_in(
                    speaker_turns or [],
                    seq * frames_per_chunk / audio.sample_rate,
                    (seq * frames_per_chunk + len(piece)) / audio.sample_rate,
                ),
                channel_speakers=names,
            )
            reply = await request(nc, subjects.ingest_audio(tenant, session_id), chunk)
            if not reply.ok and reply.code != "seq_gap":
                raise BotError(reply)
            if reply.ok:
                result.sent_at.append(time.time())
                result.sent_by_seq[seq] = chunk.sent_at
            seq = reply.last_seq + 1
        if stop.is_set() and not end_on_stop:
            result.stopped = True
            return result
        end = SessionControl(
            tenant=tenant, session_id=session_id, action="end", sent_at=time.time(), channel_speakers=names
        )
        reply = await request(nc, subjects.ingest_session(tenant, session_id), end)
        if not reply.ok:
            raise BotError(reply)
        result.end_sent = True
        if not await _ended_or_stopped(ended, stop, wait_s, stop_wait_s):
            result.stopped = True
            return result
        if rejected:
            raise BotError(
                Reply(
                    ok=False,
                    last_seq=reply.last_seq,
                    code="rejected",
                    message=f"the transcriber rejected the session: {rejected[0].reason}",
                )
            )
        await asyncio.sleep(0.2)  # let the last segments' callbacks run
        result.stopped = stop.is_set()
        return result
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _stopped_within(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait `delay_s` (at most); True if `stop` was set meanwhile."""
    if delay_s > 0:
        try:
            await asyncio.wait_for(stop.wait(), delay_s)
        except TimeoutError:
            pass
    return stop.is_set()


async def _ended_or_stopped(ended: asyncio.Event, stop: asyncio.Event, wait_s: float, stop_wait_s: float) -> bool:
    """Wait for the session's end: up to `wait_s`, or `stop_wait_s` once `stop` is set. False if `stop` came and
    the end did not follow in time; TimeoutError if it never came without a stop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    if not stop.is_set():
        waiters = {asyncio.ensure_future(ended.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if ended.is_set():
            return True
        if not stop.is_set():
            raise TimeoutError(f"the session did not end within {wait_s:.0f} s of the bot's end")
    try:
        await asyncio.wait_for(ended.wait(), max(0.0, min(deadline, loop.time() + stop_wait_s) - loop.time()))
    except TimeoutError:
        return False
    return True


def changes_in(turns: list[tuple[float, str | None]], start_s: float, end_s: float) -> list[SpeakerChange]:
    """The speaker turns (seconds into the audio, speaker) that begin in [start_s, end_s), relative to start_s:
    what the chunk holding that audio says."""
    return [SpeakerChange(round(at - start_s, 6), who) for at, who in turns if start_s <= at < end_s]
