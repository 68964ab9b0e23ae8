"""The WebSocket way in, without I/O: what a connection's URL asks for, and what goes back on the socket.

Two dialects share one path behind them (`websocket.py` turns frames into the gateway's own calls):
- `/v1/listen`: Deepgram's live API. Its query parameters map to the session's options (the issue-16 contract
  keys of `SessionControl.options`); a parameter or value jetscribe does not do is refused at the handshake
  (HTTP 400 with a JSON body, as Deepgram answers), never ignored. Results go back as Deepgram's messages.
- `/v1/sessions/<id>`: jetscribe's own. Raw format parameters, any other parameter passed as a session option
  (the gateway's option check refuses what it does not know), and back the wire messages as JSON, as
  `jetscribe follow --format json` prints them.

Audio framing: a connection cuts the audio into chunks of CHUNK_S of input frames, so chunk seq n holds frames
[n * F, (n + 1) * F) of the input (decoded, for Opus). A client that reconnects with the same session id is told
where the gateway's audio ends (`resume_from_s`, and `resume_from_byte` for raw PCM) and sends from there.
"""

from __future__ import annotations

import math
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from jetscribe.shared import subjects
from jetscribe.shared.wire import WHISPER_LANGUAGES, Segment, SessionEvent

CHUNK_S = 0.1  # input audio per chunk: what `jetscribe stream` sends too
OPUS_RATE = 48_000
DEEPGRAM_PATH = "/v1/listen"
SESSIONS_PATH = "/v1/sessions/"
SESSION_PARAM = "session_id"  # a jetscribe extension on /v1/listen: the session to start or resume

Dialect = Literal["deepgram", "native"]
Encoding = Literal["pcm_s16le", "pcm_f32le", "opus"]  # opus: an Ogg or WebM stream, told apart by its first bytes

_DEEPGRAM_ENCODINGS: dict[str, Encoding] = {
    "linear16": "pcm_s16le",
    "linear32": "pcm_f32le",
    "opus": "opus",  # Deepgram's `opus` and `ogg-opus` are Ogg/Opus here; WebM/Opus is sent with no encoding
    "ogg-opus": "opus",
}
_NATIVE_ENCODINGS: dict[str, Encoding] = {"pcm_s16le": "pcm_s16le", "pcm_f32le": "pcm_f32le", "opus": "opus"}
_DEEPGRAM_PARAMS = (
    "encoding",
    "sample_rate",
    "channels",
    "language",
    "interim_results",
    "punctuate",
    "endpointing",
    "utterance_end_ms",
    "vad_events",
    "diarize",
    "model",  # recorded on the start, as a bot's; the stack's Whisper model serves (the results name it)
    SESSION_PARAM,
)
_NATIVE_FORMAT = ("encoding", "sample_rate", "channels", "language", "token")


class ListenRefused(ValueError):
    """A connection refused at the handshake: `status` is its HTTP status, the message says what to change."""

    def __init__(self, message: str, status: int = 400, code: str = "INVALID_QUERY_PARAMETER"):
        super().__init__(message)
        self.status = status
        self.code = code

    def body(self, request_id: str) -> dict[str, str]:
        """The JSON body of the refusal, in Deepgram's shape."""
        return {"err_code": self.code, "err_msg": str(self), "request_id": request_id}


@dataclass(frozen=True)
class ListenRequest:
    """What one connection asks for."""

    dialect: Dialect
    session_id: str
    encoding: Encoding
    sample_rate: int  # of the PCM the gateway is sent: the client's for raw PCM, 48 kHz for Opus
    channels: int  # raw PCM's; Opus streams say theirs
    language: str
    options: dict[str, str | int | float | bool] = field(default_factory=dict)
    punctuate: bool = True
    diarize: bool = False
    request_id: str = ""
    model: str | None = None  # what the client asked for: recorded, as a bot's start's `model`

    @property
    def frame_bytes(self) -> int:
        """Bytes of one input frame of raw PCM (all channels)."""
        return (2 if self.encoding == "pcm_s16le" else 4) * self.channels

    def chunk_frames(self, sample_rate: int | None = None) -> int:
        return max(1, round((sample_rate or self.sample_rate) * CHUNK_S))


def parse_request(
    path: str, query: Mapping[str, Sequence[str]], *, diarize_available: bool, request_id: str | None = None
) -> ListenRequest:
    """The request a handshake's path and query name; raises ListenRefused (404 for an unknown path)."""
    request_id = request_id or str(uuid.uuid4())
    params = {}
    for name, values in query.items():
        if len(values) != 1:
            raise ListenRefused(f"{name} is given {len(values)} times; give it once")
        params[name] = values[0]
    params.pop("token", None)  # the API key, when the client cannot set a header: checked by the shell
    if path == DEEPGRAM_PATH:
        return _deepgram(params, diarize_available, request_id)
    if path.startswith(SESSIONS_PATH) and path.count("/") == 3:
        return _native(path[len(SESSIONS_PATH) :], params, request_id)
    raise ListenRefused(
        f"no endpoint {path[:80]!r}: use {DEEPGRAM_PATH} (Deepgram's live API) or {SESSIONS_PATH}<session id>",
        status=404,
        code="NOT_FOUND",
    )


def _deepgram(params: dict[str, str], diarize_available: bool, request_id: str) -> ListenRequest:
    unknown = sorted(set(params) - set(_DEEPGRAM_PARAMS))
    if unknown:
        raise ListenRefused(
            f"parameter {unknown[0]!r} is not supported by this jetscribe gateway; it takes "
            f"{', '.join(_DEEPGRAM_PARAMS)}"
        )
    encoding_name = params.get("encoding")
    if encoding_name is None:
        encoding: Encoding = "opus"  # containerized audio: Ogg or WebM, as Deepgram says to send it
    elif encoding_name in _DEEPGRAM_ENCODINGS:
        encoding = _DEEPGRAM_ENCODINGS[encoding_name]
    else:
        raise ListenRefused(
            f"encoding {encoding_name!r} is not supported: use {', '.join(_DEEPGRAM_ENCODINGS)}, or none for "
            "Ogg/Opus or WebM/Opus"
        )
    sample_rate, channels = _format(params, encoding, needs_rate=encoding_name is not None)
    options: dict[str, str | int | float | bool] = {
        "interim_results": _bool(params, "interim_results", False)  # Deepgram's default is off
    }
    if "endpointing" in params:
        value = params["endpointing"]
        options["endpointing_ms"] = False if value == "false" else _int(params, "endpointing", 10, 5000)
    if "utterance_end_ms" in params:
        options["utterance_end_ms"] = _int(params, "utterance_end_ms", 1000, 5000)
    if "vad_events" in params:
        options["vad_events"] = _bool(params, "vad_events", False)
    diarize = _bool(params, "diarize", False)
    if diarize and not diarize_available:
        raise ListenRefused(
            "diarize=true needs speakers from the audio, which this jetscribe does not run (install the speakers "
            "extra and set JETSCRIBE_SPEAKERS_AUDIO); leave diarize out or set it false"
        )
    return ListenRequest(
        dialect="deepgram",
        session_id=_session_id(params[SESSION_PARAM] if SESSION_PARAM in params else request_id.replace("-", "")),
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
        language=_deepgram_language(params.get("language", "en")),
        options=options,
        punctuate=_bool(params, "punctuate", True),
        diarize=diarize,
        request_id=request_id,
        model=params.get("model") or None,
    )


def _native(session_id: str, params: dict[str, str], request_id: str) -> ListenRequest:
    encoding_name = params.get("encoding", "pcm_s16le")
    if encoding_name not in _NATIVE_ENCODINGS:
        raise ListenRefused(f"encoding {encoding_name!r} is not one of {', '.join(_NATIVE_ENCODINGS)}")
    encoding = _NATIVE_ENCODINGS[encoding_name]
    sample_rate, channels = _format(params, encoding, needs_rate=encoding != "opus")
    language = params.get("language", "auto")
    if language != "auto" and language not in WHISPER_LANGUAGES:
        raise ListenRefused(f"language {language!r} is not a Whisper language code (like 'en', 'de') or 'auto'")
    options = {name: _option_value(value) for name, value in params.items() if name not in _NATIVE_FORMAT}
    return ListenRequest(
        dialect="native",
        session_id=_session_id(session_id),
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
        language=language,
        options=options,
        request_id=request_id,
    )


def _format(params: dict[str, str], encoding: Encoding, needs_rate: bool) -> tuple[int, int]:
    if encoding == "opus":  # the stream's header says its channels; Opus decodes at 48 kHz whatever it was made at
        if "sample_rate" in params:
            _int(params, "sample_rate", 8000, 192_000)
        if "channels" in params:
            _int(params, "channels", 1, 2)
        return OPUS_RATE, 0
    if needs_rate and "sample_rate" not in params:
        raise ListenRefused("sample_rate is required with a raw encoding (as Deepgram): give the audio's rate in Hz")
    return _int(params, "sample_rate", 8000, 192_000), _int(params, "channels", 1, 8, default=1)


def _deepgram_language(value: str) -> str:
    """Deepgram's language tags (`en`, `en-US`, `multi`) as Whisper's codes; `multi` is detection ('auto')."""
    if value == "multi":
        return "auto"
    code = value.split("-")[0].lower()
    if code not in WHISPER_LANGUAGES:
        raise ListenRefused(f"language {value!r} is not one Whisper knows: use a code like en, en-US, de, fr, or multi")
    return code


def _session_id(value: str) -> str:
    if not subjects.is_valid_token(value):
        raise ListenRefused(f"session id {value[:80]!r} must be 1-64 letters, digits, '_' or '-'")
    return value


def _bool(params: dict[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value not in ("true", "false"):
        raise ListenRefused(f"{name}={value[:40]!r}: use true or false")
    return value == "true"


def _int(params: dict[str, str], name: str, low: int, high: int, default: int | None = None) -> int:
    value = params.get(name)
    if value is None and default is not None:
        return default
    if value is None or not _is_whole(value) or not low <= int(value) <= high:
        raise ListenRefused(f"{name}={str(value)[:40]!r}: use a whole number from {low} to {high}")
    return int(value)


def _is_whole(text: str) -> bool:
    """ASCII digits only: str.isdigit also takes '²' (int() refuses it) and '１６' (not what a client means)."""
    return text.isascii() and text.isdigit()


def _option_value(text: str) -> str | int | float | bool:
    """A native query value as the option's type: true/false, a whole number, a number, else the text."""
    if text in ("true", "false"):
        return text == "true"
    if _is_whole(text.removeprefix("-")):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


# --- what goes back on the socket ---------------------------------------------------------------------------
def native_message(message: Segment | SessionEvent) -> dict[str, Any]:
    """A wire message as `jetscribe follow --format json` prints it (words as objects)."""
    data: dict[str, Any] = msgspec.to_builtins(message)
    if isinstance(message, Segment):
        data["words"] = [
            dict(zip(("word", "start", "end", "probability", "speaker"), w, strict=False)) for w in data["words"]
        ]
        data["dropped"] = [
            dict(zip(("word", "start", "end", "probability", "reason"), w, strict=False)) for w in data["dropped"]
        ]
    return data


_PUNCTUATION = str.maketrans("", "", string.punctuation.replace("'", "").replace("-", ""))


def _bare(word: str) -> str:
    """A word as Deepgram's `word` field has it: lower case, no punctuation around it."""
    return word.strip().translate(_PUNCTUATION).lower()


@dataclass
class DeepgramDialect:
    """Turns one connection's segments and events into Deepgram's messages; numbers the speakers it meets."""

    request: ListenRequest
    speakers: dict[str, int] = field(default_factory=dict)
    from_finalize: bool = False  # the next final answers the client's Finalize

    def results(self, segment: Segment) -> dict[str, Any]:
        final = segment.status == "final"
        words = []
        for word in segment.words:
            text = word.word.strip()
            entry: dict[str, Any] = {
                "word": _bare(text),
                "start": round(word.start, 3),
                "end": round(word.end, 3),
                "confidence": round(word.probability, 4),
            }
            if self.request.punctuate:
                entry["punctuated_word"] = text
            if self.request.diarize:
                speaker = word.speaker or segment.speaker
                entry["speaker"] = self.speakers.setdefault(speaker or "", len(self.speakers))
            words.append(entry)
        transcript = segment.text.strip()
        if not self.request.punctuate:
            transcript = " ".join(w["word"] for w in words) if words else _bare(transcript)
        confidence = sum(w["confidence"] for w in words) / len(words) if words else 0.0
        answers_finalize = final and self.from_finalize
        if answers_finalize:
            self.from_finalize = False
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(segment.end - segment.start, 3),
            "start": round(segment.start, 3),
            "is_final": final,
            "speech_final": final,
            "from_finalize": answers_finalize,
            "channel": {
                "alternatives": [{"transcript": transcript, "confidence": round(confidence, 4), "words": words}]
            },
            "metadata": self._metadata(segment.model),
        }

    def event(self, event: SessionEvent) -> dict[str, Any] | None:
        """UtteranceEnd or SpeechStarted for those events; None for the others (the shell handles the end)."""
        kind = str(event.event)
        if kind == "utterance_end":
            return {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": getattr(event, "last_word_end", None)}
        if kind == "speech_started":
            return {"type": "SpeechStarted", "channel": [0], "timestamp": getattr(event, "timestamp", None)}
        return None

    def closing(self, audio_seconds: float, created: str, model: str | None) -> dict[str, Any]:
        """The Metadata message sent before the socket closes."""
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request.request_id,
            "sha256": "",
            "created": created,
            "duration": round(audio_seconds, 3),
            "channels": 1,
            "models": [model or "jetscribe"],
            "model_info": {model or "jetscribe": {"name": model or "jetscribe", "version": "", "arch": "whisper"}},
        }

    def _metadata(self, model: str | None) -> dict[str, Any]:
        name = model or "jetscribe"
        return {
            "request_id": self.request.request_id,
            "model_info": {"name": name, "version": "", "arch": "whisper"},
            "model_uuid": name,
        }


def error_message(dialect: Dialect, code: str, message: str) -> dict[str, Any]:
    """A refusal of the session or its audio, sent before the socket closes."""
    if dialect == "deepgram":
        return {"type": "Error", "description": message, "message": message, "variant": code}
    return {"type": "error", "code": code, "message": message}


def resume_message(request: ListenRequest, last_seq: int, input_rate: int) -> dict[str, Any]:
    """Where the gateway's audio of the session ends, for a client that reconnects: send from there."""
    frames = (last_seq + 1) * request.chunk_frames(input_rate)
    message: dict[str, Any] = {
        "type": "resume" if request.dialect == "native" else "Resume",
        "session_id": request.session_id,
        "last_seq": last_seq,
        "resume_from_s": frames / input_rate,
    }
    if request.encoding != "opus":
        message["resume_from_byte"] = frames * request.frame_bytes
    return message
