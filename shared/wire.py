"""The wire contract: msgpack messages with a schema version, validated on receipt.

msgspec encodes and decodes the msgpack format and checks every field against these
types, so a malformed message becomes a `WireError` that names the bad field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, overload

import msgspec

from jetscribe.shared.errors import CodedError

SCHEMA_VERSION = 1

Encoding = Literal["pcm_s16le", "pcm_f32le"]

# Language codes Whisper knows; a session's language is one of these or "auto".
WHISPER_LANGUAGES = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu "
    "hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt "
    "ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue".split()
)
SegmentStatus = Literal["interim", "final"]
# Who said a speaker label: "bot" (the platform told the bot: a track's participant, a speaker change, a channel)
# or "audio" (diarization: the transcriber matched the voice to the session's speakers, `voices`).
SpeakerSource = Literal["bot", "audio"]
# `utterance_end` and `speech_started` come only for sessions that ask for them (`SessionOptions`), many per session.
SessionEventKind = Literal["started", "ended", "rejected", "utterance_end", "speech_started"]
ControlAction = Literal["start", "end", "finalize"]
END_REASON_MAX_CHARS = 120  # an end's reason (`SessionControl.reason`) as the transcriber keeps it, at most
REFUSED_PREFIX = "refused: "  # an end's reason when the gateway refused a WebSocket session's input: + its code


def refused_reason(code: str) -> str:
    """The reason of the end the gateway sends for a WebSocket session whose input it refused after its start."""
    return f"{REFUSED_PREFIX}{code}"


def end_reason(raw: str) -> str:
    """An end's reason as a session's `ended` event carries it: printable characters only, whitespace runs as one
    space, at most END_REASON_MAX_CHARS (a bot may send anything; it goes into Postgres and log lines)."""
    printable = "".join(c if c.isprintable() else " " for c in raw)
    return " ".join(printable.split())[:END_REASON_MAX_CHARS]


def language_for(model: str, requested: str | None) -> str | None:
    """The language to decode in: an English-only model (name ending ".en") always decodes English;
    otherwise the requested code, or None (detect) for None or "auto"."""
    if model.endswith(".en"):
        return "en"
    return None if requested in (None, "", "auto") else requested


OptionValue = str | int | float | bool


class WireError(CodedError, ValueError):
    """A message that does not match the wire contract; `code` says how (`not_msgpack`, `malformed`, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)


class OptionRefused(CodedError, ValueError):
    """A session option the transcriber does not know, or a value it cannot take: code `bad_option`."""

    code = "bad_option"

    def __init__(self, key: str, why: str):
        super().__init__(None, f"option {key[:64]!r}: {why}")
        self.key, self.why = key, why


ENDPOINTING_MS = range(10, 5001)
UTTERANCE_END_MS = range(1000, 5001)


@dataclass(frozen=True)
class SessionOptions:
    """A session's options (`SessionControl.options` on its start), checked: every key optional.

    `endpointing_ms`: the trailing silence that ends an utterance, None for the transcriber's own setting, False
    for none (finals only at the length cap, a finalize or the end). `utterance_end_ms`: publish `utterance_end`
    once this long passes without a new word after the last final word (None: never). `vad_events`: publish
    `speech_started` where each utterance's speech begins. `language`: as the start's `language`."""

    interim_results: bool = True
    endpointing_ms: int | Literal[False] | None = None
    utterance_end_ms: int | None = None
    vad_events: bool = False
    language: str | None = None


def session_options(raw: Mapping[str, OptionValue]) -> SessionOptions:
    """The options a start asks for, checked; raises OptionRefused (`bad_option`) naming the key and why."""
    known = {f.name for f in fields(SessionOptions)}
    for key in raw:
        if key not in known:
            raise OptionRefused(key, f"unknown option; the options are {', '.join(sorted(known))}")
    values: dict[str, object] = {}
    for key in ("interim_results", "vad_events"):
        if key in raw:
            values[key] = _flag(key, raw[key])
    if "endpointing_ms" in raw:
        value = raw["endpointing_ms"]
        values["endpointing_ms"] = False if value is False else _whole_ms("endpointing_ms", value, ENDPOINTING_MS)
    if "utterance_end_ms" in raw:
        values["utterance_end_ms"] = _whole_ms("utterance_end_ms", raw["utterance_end_ms"], UTTERANCE_END_MS)
    if "language" in raw:
        language = raw["language"]
        if not isinstance(language, str) or (language != "auto" and language not in WHISPER_LANGUAGES):
            raise OptionRefused("language", f"{language!r} is not a Whisper language code (like 'en') or 'auto'")
        values["language"] = language
    return SessionOptions(**values)  # type: ignore[arg-type]  # each value checked above


def _flag(key: str, value: OptionValue) -> bool:
    if not isinstance(value, bool):
        raise OptionRefused(key, f"{value!r} is not true or false")
    return value


def _whole_ms(key: str, value: OptionValue, allowed: range) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionRefused(key, f"{value!r} is not a whole number of milliseconds")
    if value not in allowed:
        raise OptionRefused(key, f"{value} ms is outside {allowed.start}..{allowed.stop - 1} ms")
    return value


class _Message(msgspec.Struct, kw_only=True):
    """Every message carries the schema version it was written in."""

    v: int = SCHEMA_VERSION


class _SessionMessage(_Message):
    """A message about one session of one tenant; the tenant is also the subject's, and services check both agree."""

    tenant: str
    session_id: str


class SpeakerChange(msgspec.Struct, array_like=True):
    """The bot's word that `speaker` talks from `offset_s` seconds into its chunk on (None: nobody it knows)."""

    offset_s: float
    speaker: str | None


class AudioChunk(_SessionMessage, tag="audio"):
    """A piece of a session's audio. `seq` counts from 0, +1 per chunk.

    Speakers the bot knows (all optional; a reader that does not know them transcribes without speakers):
    `speaker` talks from the chunk's first sample on (None: whoever talked before), `speaker_changes` say
    who talks from a point inside the chunk. `channel_speakers` names one participant per channel: the
    gateway then stores each channel as a track of its own (README, "Speakers")."""

    seq: int
    sent_at: float
    sample_rate: int
    channels: int
    encoding: Encoding
    payload: bytes
    received_at: float = 0.0  # wall time the gateway received it (0: unknown): final latency counts from it
    speaker: str | None = None
    speaker_changes: list[SpeakerChange] = []
    channel_speakers: list[str] = []


class SessionControl(_SessionMessage, tag="control"):
    """Starts or ends a session, or (`finalize`) ends its current utterance now. `language` is a code like "en",
    or "auto". `options` (on a start): the session's options, `session_options` says which.

    A meeting sent as one session per participant's track: each start names the `meeting_id`, the track's
    `speaker` and `track_start` (wall time of its first sample), so readers merge the tracks' finals in
    time order. `channel_speakers` (on the start and the end): one participant per channel of the audio,
    each channel stored as its own track session `<session_id>-ch<N>` of meeting `<session_id>`.

    `reason` (optional, on an end): why the session ends, carried by the transcriber's `ended` (`end_reason` bounds
    it); empty for a bot's plain end. The gateway sends `refused: <code>` when it refused a WebSocket session's input
    after its start and closed the socket."""

    action: ControlAction
    language: str = "auto"
    model: str | None = None
    options: dict[str, OptionValue] = {}
    sent_at: float = 0.0
    speaker: str | None = None
    meeting_id: str | None = None
    track_start: float = 0.0
    channel_speakers: list[str] = []
    after_seq: int = -1  # a finalize: the session's last stored chunk seq when the gateway stored it
    reason: str = ""  # an end: why (an old reader ignores it and ends the session with no reason)


class Word(msgspec.Struct, array_like=True):
    word: str
    start: float
    end: float
    probability: float
    speaker: str | None = None  # an old reader ignores this fifth item


DropReason = Literal["loop", "silence", "trailing"]


class DroppedWord(msgspec.Struct, array_like=True):
    """A word Whisper decoded that a guard removed from a final, and why: `loop` (a repeat of a phrase
    beyond its first occurrence), `silence` (a segment the audio and Whisper both say is not speech),
    `trailing` (a stock phrase invented in the silence after the speech)."""

    word: str
    start: float
    end: float
    probability: float
    reason: DropReason


class Segment(_SessionMessage, tag="segment"):
    """A stretch of transcript. Interims of one `segment_id` are replaced by its final."""

    segment_id: int
    revision: int
    status: SegmentStatus
    start: float  # seconds of session audio
    end: float
    text: str
    words: list[Word] = []
    stable_words: int = 0  # interims: leading words two consecutive hypotheses agreed on (LocalAgreement)
    speaker: str | None = None
    language: str | None = None
    model: str = ""
    seq_first: int = 0  # audio chunks this segment covers
    seq_last: int = 0
    worker_id: str = ""
    published_at: float = 0.0
    dropped: list[DroppedWord] = []  # finals: the words the guards removed (session times), to audit them
    speaker_source: SpeakerSource | None = None  # who said `speaker` (None: no speaker)
    meeting_id: str | None = None  # the meeting this session is a track of
    track_start: float = 0.0  # wall time of the session's first sample (0: unknown): meeting time = track_start + start


class SessionEvent(_SessionMessage, tag="session_event"):
    """A lifecycle event of a session, published by the transcriber that owns it.

    `ended` also follows an idle timeout; `rejected` means the worker refused the session, and
    `reason` says why (e.g. "idle_timeout", "worker_full", "buffer_full"; an `ended` after an end that gave a
    reason carries it, e.g. "refused: bad_payload"). The gateway relays both to the bot.
    """

    event: SessionEventKind
    at: float
    reason: str = ""
    language: str | None = None
    model: str = ""
    chunks_received: int = 0
    audio_seconds: float = 0.0
    segments: int = 0
    worker_id: str = ""
    words_dropped: int = 0  # words the guards removed from the session's finals (Segment.dropped)
    empty_finals: int = 0  # finals that came out empty although the VAD heard speech in their audio
    meeting_id: str | None = None  # the meeting this session is a track of (its readers follow the tracks)
    last_word_end: float | None = None  # utterance_end: session seconds where the last final word ended
    timestamp: float | None = None  # speech_started: session seconds where the speech began


class SpeakerVoice(msgspec.Struct, array_like=True):
    """A speaker the transcriber knows by voice: its label, the unit centroid of its voice embeddings, and the
    seconds of speech it was built from."""

    label: str
    centroid: list[float]
    seconds: float


class SessionCheckpoint(_SessionMessage, tag="checkpoint"):
    """A transcriber's saved state of one session (KV bucket `session_checkpoints`, key `tenant.session`).

    Written before the audio it accounts for is acked, so a worker taking the session over restores
    this and replays exactly the unacked audio after `acked_seq`.
    """

    acked_seq: int = -1  # every chunk up to this seq is transcribed (or silence) and acked
    acked_samples: int = 0  # session samples in those chunks: where chunk acked_seq + 1 begins
    chunks_received: int = 0
    next_segment_id: int = 0  # the first segment id without a published final
    committed_tail: list[str] = []  # the last committed words: prompt context for the next window
    language: str | None = None
    finished: bool = False  # ended or rejected: later redeliveries are only acked
    worker_id: str = ""
    updated_at: float = 0.0
    words_dropped: int = 0  # the session's running totals (SessionEvent), so a takeover carries them on
    empty_finals: int = 0
    speaker: str | None = None  # who the bot said talks at acked_samples: the replayed chunks carry the rest
    meeting_id: str | None = None
    track_start: float = 0.0
    voices: list[SpeakerVoice] = []  # the speakers heard in the audio (diarization), so labels survive a takeover
    options: dict[str, OptionValue] = {}  # the session's options from its start, so a takeover keeps them
    last_word_end: float | None = None  # the last final word's end still owed an utterance_end (session seconds)


class ErrorEvent(_Message, tag="error"):
    """Why something was refused; published on `errors.<service>.<tenant>`."""

    tenant: str
    session_id: str | None
    code: str
    message: str
    seq: int | None = None
    at: float = 0.0
    retry_after_s: float = 0.0  # `rate_limited`: when the same request would pass


class DecodeTotals(msgspec.Struct, kw_only=True):
    """A transcriber's decodes of one kind since it started (`WorkerStats.decodes`)."""

    count: int = 0
    seconds: float = 0.0  # their share of the decode calls' wall time: an item of a batch of n is charged 1/n
    audio_s: float = 0.0  # audio seconds decoded


class WorkerStats(_Message, tag="worker_stats"):
    """A transcriber's load, published every second on core NATS (`jetscribe.stats.transcriber.<worker>`, not
    stored). Totals run from the worker's start, so a message lost on the way only leaves a gap."""

    worker_id: str
    at: float  # wall time
    sessions: int = 0
    speaking: int = 0  # sessions with an utterance open
    backlog_s: float = 0.0  # audio received and not yet covered by a final, summed over the sessions
    backlog_max_s: float = 0.0  # the same, in the session with the most
    finals_waiting_s: float = 0.0  # audio of ended utterances whose final is not out yet: grows if decoding lags
    decodes: dict[str, DecodeTotals] = {}  # by kind: "final", "interim", "speculative" (an early final)
    batches: int = 0  # decode calls; batch_items / batches is the mean batch size
    batch_items: int = 0
    cpu_s: float = 0.0  # the worker process's CPU seconds, user + system, since it started
    rss_bytes: int = 0


class Reply(_Message, tag="reply"):
    """The gateway's answer to a bot's request: ok with the last accepted seq, or an error."""

    ok: bool
    last_seq: int = -1  # -1: nothing accepted yet
    code: str = ""
    message: str = ""
    retry_after_s: float = 0.0  # `rate_limited`: send the same request again after this many seconds


class HistoryRequest(_Message, tag="history_request"):
    """A request for a page of one session's stored segments and events, on `jetscribe.history.<tenant>.<session>`
    (a tenant may ask for its own sessions only: its NATS permissions), answered by a gateway with a HistoryPage."""

    from_seq: int = 0  # the TRANSCRIPTS seq to start at; 0: the session's first message
    limit: int = 100  # messages at most (the gateway holds a page to HISTORY_MAX_PAGE and to a size)


class StoredMessage(msgspec.Struct, kw_only=True):
    """One message of TRANSCRIPTS as stored: its stream seq, its subject and its bytes (a Segment or SessionEvent)."""

    seq: int
    subject: str
    data: bytes


class HistoryPage(_Message, tag="history_page"):
    """A page of a session's history in stream order, or a refusal (`ok` false: code, message, retry_after_s)."""

    ok: bool
    messages: list[StoredMessage] = msgspec.field(default_factory=list)
    next_seq: int = 0  # from_seq of the next page
    done: bool = True  # nothing more was stored when the page was read
    code: str = ""
    message: str = ""
    retry_after_s: float = 0.0


AudioMessage = AudioChunk | SessionControl
TranscriptMessage = Segment | SessionEvent

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[object, msgspec.msgpack.Decoder[Any]] = {}
T = TypeVar("T")


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


@overload
def decode(data: bytes, kind: type[T]) -> T: ...
@overload
def decode(data: bytes, kind: Any) -> Any: ...  # a union of message classes, e.g. AudioMessage


def decode(data: bytes, kind: Any) -> Any:
    """Decode `data` as `kind` (a message class or a union of them); raise WireError if it does not fit."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        message = decoder.decode(data)
    except Exception as exc:  # msgspec's errors, and e.g. UnicodeDecodeError or RecursionError on hostile bytes
        version = _peek_version(data)
        if version is not None and version != SCHEMA_VERSION:
            raise WireError(
                "unsupported_version",
                f"schema version {version} is not supported (this side speaks {SCHEMA_VERSION})",
            ) from None
        code = "malformed" if isinstance(exc, msgspec.ValidationError) else "not_msgpack"
        raise WireError(code, f"invalid message: {exc}") from None
    if message.v != SCHEMA_VERSION:
        raise WireError(
            "unsupported_version",
            f"schema version {message.v} is not supported (this side speaks {SCHEMA_VERSION})",
        )
    return message


def _peek_version(data: bytes) -> object | None:
    try:
        raw = msgspec.msgpack.decode(data)
    except Exception:
        return None
    return raw.get("v") if isinstance(raw, dict) else None
