"""The gateway's decisions, with no I/O: is a chunk acceptable, what exactly gets stored, and may a tenant open
another session.

Audio is stored as 16 kHz mono pcm_s16le (shared/audio.py) whatever the bot sends; one soxr stream per
session keeps resampling continuous across chunk joins.

A ledger is this gateway's memory of a session, not the truth: the AUDIO stream is. Every store names the
stream sequence of the session's last message as the ledger knows it (`SessionLedger.stream_seq`), and the
stream refuses it if anyone stored to the session since; the gateway then learns the session afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
import soxr

from jetscribe.services.ingest.rates import Allowance, RateLimiter, RateLimits
from jetscribe.shared import subjects
from jetscribe.shared.audio import SAMPLE_RATE, STORED_CHANNELS, STORED_ENCODING
from jetscribe.shared.clock import system_clock
from jetscribe.shared.config import IngestConfig
from jetscribe.shared.errors import CodedError
from jetscribe.shared.wire import (
    WHISPER_LANGUAGES,
    AudioChunk,
    AudioMessage,
    OptionRefused,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    session_options,
)

_SAMPLE_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4}
MAX_CONTROL_BYTES = 16 * 1024  # a start or end request: ids, language, model and a few options
AUDIO_ENVELOPE_BYTES = 64 * 1024  # an audio request's fields besides its payload (64 speaker changes of 128 chars...)


class RequestRefused(CodedError):
    """A bot's request the gateway refuses; `code` goes on the wire, the message says what to do.

    The reply's `last_seq` is not part of it: the gateway answers every refusal with the session's last
    accepted seq (`IngestBook.last_seq_of`), whatever the cause.
    """


@dataclass
class SessionLedger:
    """What the gateway knows of one session: the last seq it stored and the resampler state.

    `stream_seq` is the AUDIO stream sequence of the session's last stored message (0: none), the one the
    next store expects. `ended` is set by the bot's end, or by the transcriber's `ended` / `rejected` event;
    `rejection` is the transcriber's reason when it refused the session.
    """

    tenant: str
    session_id: str
    last_seq: int = -1
    stream_seq: int = 0
    ended: bool = False
    rejection: str | None = None
    input_format: tuple[int, int] | None = None  # (sample_rate, channels) the resampler was built for
    resampler: soxr.ResampleStream | None = field(default=None, repr=False)
    allowance: Allowance | None = field(default=None, repr=False)  # its rate limit buckets, from its first chunk


@dataclass(frozen=True)
class ChunkVerdict:
    """`store` is the normalised chunk to publish, or None when it repeats one already stored."""

    store: AudioChunk | None
    ledger: SessionLedger


def check_ids(tenant: str, session_id: str) -> None:
    for name, value in (("tenant", tenant), ("session_id", session_id)):
        if not subjects.is_valid_token(value):
            raise RequestRefused("bad_id", f"{name} {value!r} must be 1-64 letters, digits, '_' or '-'")


def check_request_size(kind: str, size: int, config: IngestConfig) -> None:
    """Refuse a request too large for what it can hold before decoding it: an audio request is its payload plus
    a small envelope, a start or end a few short fields."""
    limit = config.max_chunk_bytes + AUDIO_ENVELOPE_BYTES if kind == "audio" else MAX_CONTROL_BYTES
    if size > limit:
        what = "an audio request" if kind == "audio" else "a session request"
        raise RequestRefused("too_large", f"request of {size} bytes exceeds the limit of {limit} bytes for {what}")


def check_sent_at(sent_at: float) -> None:
    if not math.isfinite(sent_at):
        raise RequestRefused("malformed", f"sent_at {sent_at} is not a finite number of epoch seconds")


def check_subject_matches(message_tenant: str, message_session: str, tenant: str, session_id: str) -> None:
    if (message_tenant, message_session) != (tenant, session_id):
        raise RequestRefused(
            "subject_mismatch",
            f"message is for {message_tenant}/{message_session} but was sent on the subject of {tenant}/{session_id}",
        )


SERVICE_INBOX = "_INBOX."  # nats-py's default prefix: the services' (a gateway's track requests) and the operator's


def check_reply_subject(reply: str, tenant: str) -> None:
    """A bot's request must be answered on its tenant's inboxes (`_INBOX_<tenant>.…`), or the services' and the
    operator's (`_INBOX.…`, which only they may read: a tenant cannot subscribe there). The gateway answers with
    its own rights, which include writing AUDIO, the KV buckets and the JetStream API: any other reply subject
    would have it publish there for the bot (`$JS.API.STREAM.DELETE.AUDIO`, `audio.<other>.<s>`, another tenant's
    inbox or transcript). An empty reply (a plain publish) is not answered at all."""
    if not reply or reply.startswith(SERVICE_INBOX) or reply.startswith(f"_INBOX_{tenant}."):
        return
    raise RequestRefused(
        "bad_reply",
        f"reply subject {reply[:80]!r} is not tenant {tenant}'s inbox: send requests with inbox prefix _INBOX_{tenant}",
    )


MAX_SPEAKER_CHARS = 128
MAX_SPEAKER_CHANGES = 64  # per chunk


def check_speaker(name: str | None, what: str = "speaker") -> None:
    if name is not None and not (0 < len(name) <= MAX_SPEAKER_CHARS and name.isprintable()):
        raise RequestRefused(
            "bad_speaker", f"{what} {name[:80]!r} must be 1-{MAX_SPEAKER_CHARS} printable characters (a name)"
        )


def chunk_seconds(chunk: AudioChunk) -> float:
    return len(chunk.payload) / (_SAMPLE_WIDTH[chunk.encoding] * max(chunk.channels, 1) * max(chunk.sample_rate, 1))


def check_chunk_speakers(chunk: AudioChunk) -> None:
    """A chunk's speakers: names, and changes at offsets inside the chunk, at most MAX_SPEAKER_CHANGES of them."""
    check_speaker(chunk.speaker)
    if len(chunk.speaker_changes) > MAX_SPEAKER_CHANGES:
        raise RequestRefused(
            "bad_speaker", f"{len(chunk.speaker_changes)} speaker changes in one chunk; at most {MAX_SPEAKER_CHANGES}"
        )
    seconds = chunk_seconds(chunk)
    for change in chunk.speaker_changes:
        check_speaker(change.speaker)
        if not (math.isfinite(change.offset_s) and 0.0 <= change.offset_s <= seconds + 0.001):
            raise RequestRefused(
                "bad_speaker",
                f"speaker change at {change.offset_s!r} s is outside its chunk (0..{seconds:.3f} s of audio)",
            )


def check_track(control: SessionControl) -> None:
    """A start's track of a meeting: who speaks on it, the meeting's id, when its first sample was heard."""
    check_speaker(control.speaker)
    if control.meeting_id is not None and not subjects.is_valid_token(control.meeting_id):
        raise RequestRefused("bad_id", f"meeting_id {control.meeting_id!r} must be 1-64 letters, digits, '_' or '-'")
    if not (math.isfinite(control.track_start) and control.track_start >= 0):
        raise RequestRefused("bad_track_start", f"track_start {control.track_start!r} must be wall time in seconds")


def check_options(control: SessionControl) -> None:
    """A start's options (`wire.session_options`): an unknown key or a bad value is refused `bad_option`, and so is
    a `language` option that contradicts the start's own `language`."""
    options = session_options(control.options)
    if options.language not in (None, "auto") and control.language not in ("auto", options.language):
        raise OptionRefused(
            "language", f"{options.language!r} contradicts the start's language {control.language!r}; give one"
        )


# --- multichannel audio: one participant per channel, each channel its own track session ------------------
def split_channels(message: AudioMessage, max_chunk_bytes: int | None = None) -> list[AudioMessage]:
    """A message of a session whose channels are its participants (`channel_speakers`), as one message per
    channel's track: each track is a plain session (its own seqs, resampler, partition, transcriber, checkpoint)
    of the meeting named by the split session's id. Raises RequestRefused for what cannot be split; a chunk
    over `max_chunk_bytes` is refused whole (each track's share would pass)."""
    names = message.channel_speakers
    if len(names) < 2:
        raise RequestRefused("bad_channels", f"channel_speakers names {len(names)} channel(s); a split needs 2 or more")
    for name in names:
        check_speaker(name, "channel speaker")
    for channel in range(len(names)):
        check_ids(message.tenant, subjects.channel_track(message.session_id, channel))
    if isinstance(message, SessionControl):
        check_track(message)
        meeting = message.meeting_id or message.session_id
        return [
            msgspec.structs.replace(
                message,
                session_id=subjects.channel_track(message.session_id, channel),
                channel_speakers=[],
                speaker=name,
                meeting_id=meeting,
                track_start=message.track_start or message.sent_at,
            )
            for channel, name in enumerate(names)
        ]
    if message.channels != len(names):
        raise RequestRefused(
            "bad_channels", f"chunk has {message.channels} channels but channel_speakers names {len(names)}"
        )
    if max_chunk_bytes is not None and len(message.payload) > max_chunk_bytes:
        raise RequestRefused(
            "too_large",
            f"payload of {len(message.payload)} bytes exceeds the limit of {max_chunk_bytes} bytes per chunk; "
            "send shorter chunks",
        )
    if message.speaker is not None or message.speaker_changes:
        raise RequestRefused("bad_speaker", "a split chunk's speakers are its channels': leave speaker unset")
    width = _SAMPLE_WIDTH.get(message.encoding, 0)
    frame = width * message.channels
    if not frame or len(message.payload) % frame:
        raise RequestRefused(
            "bad_payload",
            f"payload of {len(message.payload)} bytes is not a whole number of {message.channels}-channel "
            f"{message.encoding} frames",
        )
    frames = np.frombuffer(message.payload, dtype=np.uint8).reshape(-1, message.channels, width)
    return [
        msgspec.structs.replace(
            message,
            session_id=subjects.channel_track(message.session_id, channel),
            channels=1,
            channel_speakers=[],
            payload=frames[:, channel, :].tobytes(),
        )
        for channel in range(len(names))
    ]


def to_mono_int16(chunk: AudioChunk, ledger: SessionLedger) -> np.ndarray:
    """Decode the payload, mix down to mono and resample to 16 kHz; returns int16 samples."""
    width = _SAMPLE_WIDTH[chunk.encoding]
    frame = width * chunk.channels
    if len(chunk.payload) % frame:
        raise RequestRefused(
            "bad_payload",
            f"payload of {len(chunk.payload)} bytes is not a whole number of {chunk.channels}-channel "
            f"{chunk.encoding} frames ({frame} bytes each)",
        )
    if (chunk.encoding, chunk.channels, chunk.sample_rate) == (STORED_ENCODING, STORED_CHANNELS, SAMPLE_RATE):
        return np.frombuffer(chunk.payload, dtype="<i2")  # already the stored format: kept bit for bit
    if chunk.encoding == "pcm_s16le":
        samples = np.frombuffer(chunk.payload, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(chunk.payload, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(samples)):
            raise RequestRefused("bad_payload", "pcm_f32le payload holds NaN or infinite samples")
    if chunk.channels > 1:
        samples = samples.reshape(-1, chunk.channels).mean(axis=1)
    if chunk.sample_rate != SAMPLE_RATE:
        fmt = (chunk.sample_rate, chunk.channels)
        if ledger.resampler is None or ledger.input_format != fmt:
            ledger.resampler = soxr.ResampleStream(chunk.sample_rate, SAMPLE_RATE, 1, dtype="float32")
            ledger.input_format = fmt
        samples = ledger.resampler.resample_chunk(samples)
    return _to_int16(samples)


def _to_int16(samples: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = np.clip(samples, -1.0, 1.0) * 32767.0  # np.clip's stubs return Any
    return scaled.astype("<i2")


class IngestBook:
    """All sessions this gateway has seen, and the rules for accepting their audio."""

    def __init__(self, config: IngestConfig, monotonic: Callable[[], float] | None = None):
        """`monotonic`: the clock the rate limits run on (default: the system's)."""
        self.config = config
        self.sessions: dict[tuple[str, str], SessionLedger] = {}
        self.monotonic = monotonic or system_clock().monotonic
        self.rates = RateLimiter(
            RateLimits(
                session_chunks_per_s=config.session_chunks_per_s,
                session_bytes_per_s=config.session_bytes_per_s,
                tenant_chunks_per_s=config.tenant_chunks_per_s,
                tenant_bytes_per_s=config.tenant_bytes_per_s,
                burst_s=config.rate_burst_s,
            )
        )

    def ledger(self, tenant: str, session_id: str) -> SessionLedger | None:
        return self.sessions.get((tenant, session_id))

    def last_seq_of(self, tenant: str, session_id: str) -> int:
        """What every reply says as `last_seq`, ok or not: the session's last accepted seq, -1 if none yet."""
        ledger = self.ledger(tenant, session_id)
        return -1 if ledger is None else ledger.last_seq

    def remember(self, tenant: str, session_id: str, last_seq: int, ended: bool, stream_seq: int = 0) -> SessionLedger:
        """Adopt a session found in the stream (after a gateway restart, or a partition moved here)."""
        ledger = SessionLedger(tenant, session_id, last_seq=last_seq, ended=ended, stream_seq=stream_seq)
        self.sessions[(tenant, session_id)] = ledger
        return ledger

    def recall(
        self,
        tenant: str,
        session_id: str,
        last_stored: AudioMessage | None,
        closing: SessionEvent | None,
        checkpoint: SessionCheckpoint | None,
        stream_seq: int = 0,
    ) -> SessionLedger | None:
        """Adopt a session this gateway has not seen (after a restart) from what the streams hold of it; None if
        they hold nothing, so it is new.

        `last_stored` is its last message in AUDIO (at stream sequence `stream_seq`), `closing` the transcriber's
        `ended` or `rejected` from TRANSCRIPTS and `checkpoint` its transcriber checkpoint. The last two outlive its
        audio, so a session whose audio has aged out of AUDIO is still known, and an ended one is refused rather
        than started afresh.
        """
        if last_stored is None and closing is None and checkpoint is None:
            return None
        if isinstance(last_stored, AudioChunk):
            last_seq = last_stored.seq
        elif isinstance(last_stored, SessionControl) and last_stored.action == "finalize":
            last_seq = last_stored.after_seq
        else:  # a start or an end holds no seq: the transcriber's checkpoint knows the last one it took
            last_seq = checkpoint.acked_seq if checkpoint is not None else -1
        ended_by_bot = isinstance(last_stored, SessionControl) and last_stored.action == "end"
        finished = checkpoint is not None and checkpoint.finished
        ledger = self.remember(
            tenant, session_id, last_seq=last_seq, ended=ended_by_bot or finished, stream_seq=stream_seq
        )
        if closing is not None:
            self.closed_by_worker(tenant, session_id, closing.event, closing.reason)
        return ledger

    def forget(self, ledger: SessionLedger) -> None:
        self.sessions.pop((ledger.tenant, ledger.session_id), None)

    def forget_partition(self, partition: int, partitions: int) -> list[tuple[str, str]]:
        """Drop every session of a partition this gateway no longer serves; returns their (tenant, session)."""
        gone = [key for key in self.sessions if subjects.session_partition(*key, partitions) == partition]
        for key in gone:
            del self.sessions[key]
        return gone

    def start(self, control: SessionControl) -> SessionLedger:
        """A start opens a session, or answers a reconnecting bot with where it left off.

        A new session is only remembered here: the shell takes its tenant slot (`admit`) before storing it.
        """
        check_ids(control.tenant, control.session_id)
        check_track(control)
        check_sent_at(control.sent_at)
        if control.language != "auto" and control.language not in WHISPER_LANGUAGES:
            raise RequestRefused(
                "bad_language",
                f"language {control.language!r} is not a Whisper language code (like 'en', 'de', 'fr') or 'auto'",
            )
        check_options(control)
        ledger = self.ledger(control.tenant, control.session_id)
        if ledger is None:
            ledger = self.remember(control.tenant, control.session_id, last_seq=-1, ended=False)
        elif ledger.ended:
            _refuse_if_rejected(ledger)
            raise RequestRefused("session_ended", f"session {control.session_id} has ended; start a new session id")
        return ledger

    def finalize(self, control: SessionControl) -> SessionControl:
        """What a finalize stores: the request, marked with the session's last stored seq (where a gateway that
        learns the session from the stream finds it). Refused for a session that is not open."""
        check_sent_at(control.sent_at)
        ledger = self._open_ledger(control.tenant, control.session_id)
        return msgspec.structs.replace(control, after_seq=ledger.last_seq)

    def end(self, control: SessionControl) -> tuple[SessionLedger, AudioChunk | None]:
        """What ending a session stores: the resampler's held-back tail as one last chunk, if any.

        A repeated end finds `ledger.ended` already true: answer it ok and store nothing.
        """
        check_ids(control.tenant, control.session_id)
        check_sent_at(control.sent_at)
        ledger = self.ledger(control.tenant, control.session_id)
        if ledger is None:
            raise RequestRefused("unknown_session", f"session {control.tenant}/{control.session_id} was never started")
        _refuse_if_rejected(ledger)
        tail = None
        if not ledger.ended and ledger.resampler is not None:
            rest = ledger.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            ledger.resampler = None
            if len(rest):
                tail = AudioChunk(
                    tenant=control.tenant,
                    session_id=control.session_id,
                    seq=ledger.last_seq + 1,
                    sent_at=control.sent_at,
                    sample_rate=SAMPLE_RATE,
                    channels=STORED_CHANNELS,
                    encoding=STORED_ENCODING,
                    payload=_to_int16(rest).tobytes(),
                )
        return ledger, tail

    def closed(self, ledger: SessionLedger) -> None:
        """Call once the end is stored."""
        ledger.ended = True
        ledger.resampler = None

    def closed_by_worker(self, tenant: str, session_id: str, event: str, reason: str) -> SessionLedger | None:
        """The transcriber ended (e.g. after an idle timeout) or rejected a session: it takes no more audio.

        A session this gateway does not know is left alone; `_recall` in the app finds its event in the stream.
        """
        ledger = self.ledger(tenant, session_id)
        if ledger is None:
            return None
        if event == "rejected" and ledger.rejection is None:
            ledger.rejection = reason or "no reason given"
        self.closed(ledger)
        return ledger

    def check_chunk(self, chunk: AudioChunk) -> ChunkVerdict:
        """Validate a chunk against its session; returns what to store. Raises RequestRefused."""
        cfg = self.config
        ledger = self._open_ledger(chunk.tenant, chunk.session_id)
        if len(chunk.payload) > cfg.max_chunk_bytes:
            raise RequestRefused(
                "too_large",
                f"payload of {len(chunk.payload)} bytes exceeds the limit of "
                f"{cfg.max_chunk_bytes} bytes per chunk; send shorter chunks",
            )
        if not cfg.min_sample_rate <= chunk.sample_rate <= cfg.max_sample_rate:
            raise RequestRefused(
                "bad_sample_rate",
                f"sample_rate {chunk.sample_rate} is outside {cfg.min_sample_rate}..{cfg.max_sample_rate} Hz",
            )
        if not 1 <= chunk.channels <= cfg.max_channels:
            raise RequestRefused("bad_channels", f"channels {chunk.channels} is outside 1..{cfg.max_channels}")
        check_sent_at(chunk.sent_at)
        # Every well-formed chunk of an open session costs, repeats and gaps too; a refused one costs nothing.
        now = self.monotonic()
        if ledger.allowance is None:
            ledger.allowance = self.rates.session_allowance(now)
        self.rates.admit(chunk.tenant, ledger.allowance, len(chunk.payload), now)
        if chunk.seq < 0:
            raise RequestRefused("bad_seq", f"seq {chunk.seq} is negative; seq counts from 0")
        check_chunk_speakers(chunk)
        if chunk.seq <= ledger.last_seq:
            return ChunkVerdict(store=None, ledger=ledger)
        if chunk.seq != ledger.last_seq + 1:
            raise RequestRefused(
                "seq_gap", f"seq {chunk.seq} leaves a gap: expected seq {ledger.last_seq + 1}; resend from there"
            )
        samples = to_mono_int16(chunk, ledger)
        stored = msgspec.structs.replace(
            chunk,
            sample_rate=SAMPLE_RATE,
            channels=STORED_CHANNELS,
            encoding=STORED_ENCODING,
            payload=samples.tobytes(),
        )
        return ChunkVerdict(store=stored, ledger=ledger)

    def accepted(self, ledger: SessionLedger, seq: int) -> None:
        """Call once the stored chunk is acknowledged by JetStream."""
        ledger.last_seq = max(ledger.last_seq, seq)

    def stored(self, ledger: SessionLedger, stream_seq: int) -> None:
        """Call with the stream sequence JetStream acknowledged a store of this session at."""
        ledger.stream_seq = max(ledger.stream_seq, stream_seq)

    def _open_ledger(self, tenant: str, session_id: str) -> SessionLedger:
        check_ids(tenant, session_id)
        ledger = self.ledger(tenant, session_id)
        if ledger is None:
            raise RequestRefused(
                "unknown_session",
                f"session {tenant}/{session_id} was never started; "
                f"send a start on {subjects.ingest_session(tenant, session_id)} first",
            )
        if ledger.ended:
            _refuse_if_rejected(ledger)
            raise RequestRefused("session_ended", f"session {session_id} has ended")
        return ledger


def _refuse_if_rejected(ledger: SessionLedger) -> None:
    if ledger.rejection is not None:
        raise RequestRefused(
            "rejected",
            f"session {ledger.tenant}/{ledger.session_id} was rejected by the transcriber: {ledger.rejection}",
        )


# --- the per-tenant session limit, over all gateways -------------------------------------------------------
# A tenant's open sessions are one KV value (session id -> wall time its slot was taken), rewritten only by a
# compare-and-set on the key's revision, so two gateways admitting at once cannot both take the last slot.
TenantSessions = dict[str, float]
_TENANT_SESSIONS = msgspec.msgpack.Decoder(dict[str, float])
STALE_SLOT_S = 60.0  # a slot this old whose session left nothing in AUDIO was never stored (a gateway died)


def decode_tenant_sessions(value: bytes | None) -> TenantSessions:
    return _TENANT_SESSIONS.decode(value) if value else {}


def encode_tenant_sessions(sessions: TenantSessions) -> bytes:
    return msgspec.msgpack.encode(sessions)


def admit(sessions: TenantSessions, tenant: str, session_id: str, limit: int, now: float) -> TenantSessions | None:
    """The tenant's open sessions with `session_id` added, or None if it holds a slot already (nothing to
    write). Raises `too_many_sessions` at the limit."""
    if session_id in sessions:
        return None
    if len(sessions) >= limit:
        raise RequestRefused(
            "too_many_sessions",
            f"tenant {tenant} already has {limit} active sessions, its limit; end one, then start again",
        )
    return {**sessions, session_id: now}


def without(sessions: TenantSessions, *session_ids: str) -> TenantSessions | None:
    """The tenant's open sessions less these, or None if none of them holds a slot (nothing to write)."""
    if not any(s in sessions for s in session_ids):
        return None
    return {s: at for s, at in sessions.items() if s not in session_ids}


def stale_candidates(sessions: TenantSessions, now: float, older_than_s: float = STALE_SLOT_S) -> list[str]:
    """Slots old enough that their session should have left something in AUDIO; the shell checks which did not."""
    return sorted(s for s, at in sessions.items() if now - at > older_than_s)
