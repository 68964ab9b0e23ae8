"""Hostile WebSocket clients for the gateway's listener, generated with hypothesis, each with the answer it is owed.

Two kinds of case (tests/fuzz/cases.py's rules: one thing wrong each, generation only):
- a handshake the gateway must refuse: its path and query, how it shows its key, and the HTTP status (400, 401
  or 404, with a JSON body) and refusal code (`bad_request`, `unauthorized`) it gets;
- a socket the gateway accepts, then frames it must refuse: the close code and refusal code the socket gets
  (1008 for what the gateway refuses, 1007 for audio that is not what the handshake said); None for a client
  whose frames are odd but taken, which ends with CloseStream and a clean close.

A session case names no session: the test gives each its own, on the query (`session_id`) or the path.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from jetscribe.services.ingest.containers import MAX_BUFFERED_BYTES
from jetscribe.services.ingest.listen import WHISPER_LANGUAGES
from jetscribe.shared import subjects
from tests.fuzz.cases import TENANT

Frame = bytes | str
CLOSE_STREAM = json.dumps({"type": "CloseStream"})
CONTROL_TYPES = ("KeepAlive", "Finalize", "CloseStream")
CLUSTER = b"\x1f\x43\xb6\x75"  # a WebM Cluster's element id
# Kept under websockets' 8 KiB request line (its own 400, before the gateway sees the handshake).
HUGE_VALUE = st.integers(1000, 6000)


@dataclass(frozen=True)
class HandshakeCase:
    kind: str
    target: str  # path and query, percent-encoded
    auth: str  # how the key is shown: header, bearer, query, protocol; none, wrong, wrong_protocol, basic, lone_token
    status: int
    code: str
    bucket: str

    def __repr__(self) -> str:
        return f"HandshakeCase({self.kind}, {self.auth}, {self.target[:160]!r})"


@dataclass(frozen=True)
class SocketCase:
    kind: str
    dialect: str  # deepgram (/v1/listen) or native (/v1/sessions/<id>)
    params: tuple[tuple[str, str], ...]
    frames: tuple[Frame, ...] = field(repr=False)
    close_code: int | None  # None: taken, closed 1000 after CloseStream
    code: str | None

    def __repr__(self) -> str:
        heads = [f[:60] for f in self.frames[:3]]
        return f"SocketCase({self.kind}, {self.dialect}, {self.params}, {len(self.frames)} frames: {heads!r})"


# --- handshakes -------------------------------------------------------------------------------------------------
PCM_QUERY = (("encoding", "linear16"), ("sample_rate", "16000"))
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)


def whole_in(value: str, low: int, high: int) -> bool:
    """Whether `value` is an ASCII whole number from `low` to `high` (what the handshake takes)."""
    return value.isascii() and value.isdigit() and low <= int(value) <= high


def target(path: str, params: list[tuple[str, str]], raw: str = "") -> str:
    query = urllib.parse.urlencode(params)
    return f"{path}?{'&'.join(p for p in (query, raw) if p)}" if query or raw else path


@st.composite
def hostile_handshake(draw: st.DrawFn) -> HandshakeCase:
    kind = draw(
        st.sampled_from(
            [
                "no_key",
                "wrong_key",
                "repeated_param",
                "unknown_param",
                "bad_encoding",
                "bad_sample_rate",
                "bad_channels",
                "missing_sample_rate",
                "bad_language",
                "bad_bool",
                "bad_endpointing",
                "bad_utterance_end",
                "diarize",
                "bad_session_id",
                "bad_native_session",
                "bad_native_encoding",
                "bad_native_language",
                "unknown_path",
                "undecodable_query",
                "huge_value",
            ]
        )  # fmt: skip
    )
    params: list[tuple[str, str]] = list(PCM_QUERY)
    path, raw, auth, status, code, bucket = (
        "/v1/listen",
        "",
        draw(st.sampled_from(["header", "bearer"])),
        400,
        "",
        TENANT,
    )
    if kind == "no_key":
        auth = draw(st.sampled_from(["none", "basic", "lone_token"]))
        status, code, bucket = 401, "unauthorized", subjects.UNKNOWN_TENANT
    elif kind == "wrong_key":
        auth = draw(st.sampled_from(["wrong", "wrong_protocol", "wrong_query"]))
        status, code, bucket = 401, "unauthorized", subjects.UNKNOWN_TENANT
    elif kind == "repeated_param":
        name = draw(st.sampled_from(["encoding", "sample_rate", "channels", "language", "interim_results"]))
        params += [(name, draw(texts)), (name, draw(texts))]
    elif kind == "unknown_param":
        known = {"encoding", "sample_rate", "channels", "language", "interim_results", "punctuate", "endpointing"}
        known |= {"utterance_end_ms", "vad_events", "diarize", "model", "session_id", "token"}
        params.append((draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in known)), draw(texts)))
    elif kind == "bad_encoding":
        params[0] = ("encoding", draw(texts.filter(lambda e: e not in ("linear16", "linear32", "opus", "ogg-opus"))))
    elif kind in ("bad_sample_rate", "bad_channels"):
        name, low, high = ("sample_rate", 8000, 192_000) if kind == "bad_sample_rate" else ("channels", 1, 8)
        value = draw(
            st.one_of(
                texts.filter(lambda v: not whole_in(v, low, high)),
                st.integers(-(2**70), low - 1).map(str),
                st.integers(high + 1, 2**70).map(str),
                st.sampled_from(["１６０００", "16000.0", " 16000", "+16000", "1e4", "٣", "²", "16000²"]),  # not ASCII
            )
        )
        params = [p for p in params if p[0] != name] + [(name, value)]
    elif kind == "missing_sample_rate":
        params = [("encoding", draw(st.sampled_from(["linear16", "linear32"])))]
    elif kind == "bad_language":
        params.append(
            (
                "language",
                draw(texts.filter(lambda x: x != "multi" and x.split("-")[0].lower() not in WHISPER_LANGUAGES)),
            )
        )
    elif kind == "bad_bool":
        name = draw(st.sampled_from(["interim_results", "punctuate", "vad_events", "diarize"]))
        params.append((name, draw(texts.filter(lambda v: v not in ("true", "false")))))
    elif kind == "bad_endpointing":
        params.append(
            (
                "endpointing",
                draw(
                    st.one_of(texts, st.integers(-100, 9).map(str), st.integers(5001, 10**9).map(str)).filter(
                        lambda v: v != "false" and not whole_in(v, 10, 5000)
                    )
                ),
            )
        )
    elif kind == "bad_utterance_end":
        params.append(("utterance_end_ms", draw(texts.filter(lambda v: not whole_in(v, 1000, 5000)))))
    elif kind == "diarize":
        params.append(("diarize", "true"))  # no speakers from the audio in this stack
    elif kind == "bad_session_id":
        params.append(
            (
                "session_id",
                draw(
                    texts.filter(lambda t: not subjects.is_valid_token(t)) | st.integers(65, 300).map(lambda n: "s" * n)
                ),
            )
        )
    elif kind == "bad_native_session":
        session = draw(texts.filter(lambda t: "/" not in t and not subjects.is_valid_token(t)))  # "" too
        path, params = f"/v1/sessions/{urllib.parse.quote(session, safe='')}", [("sample_rate", "16000")]
    elif kind == "bad_native_encoding":
        encoding = draw(texts.filter(lambda e: e not in ("pcm_s16le", "pcm_f32le", "opus")))
        path, params = "/v1/sessions/hs", [("encoding", encoding), ("sample_rate", "16000")]
    elif kind == "bad_native_language":
        language = draw(texts.filter(lambda x: x != "auto" and x not in WHISPER_LANGUAGES))
        path, params = "/v1/sessions/hs", [("sample_rate", "16000"), ("language", language)]
    elif kind == "unknown_path":
        path = "/" + draw(
            st.from_regex(r"[a-z0-9/._-]{0,40}", fullmatch=True).filter(lambda p: not p.startswith("v1/"))
        )
        path = draw(st.sampled_from([path, "/v1/sessions/a/b", "/v1/listen/", "/v1/listens"]))
        status = 404
    elif kind == "undecodable_query":  # bytes that are not UTF-8, as a name or a value
        junk = urllib.parse.quote_from_bytes(draw(st.binary(min_size=1, max_size=16)) + b"\xff")
        raw = draw(st.sampled_from([f"{junk}=1", f"encoding={junk}", f"sample_rate={junk}", f"language={junk}"]))
        if raw.startswith("encoding="):
            params = [p for p in params if p[0] != "encoding"]
        elif raw.startswith("sample_rate="):
            params = [p for p in params if p[0] != "sample_rate"]
    else:  # huge_value: in a parameter that refuses it
        name = draw(st.sampled_from(["encoding", "language", "session_id", "punctuate", "model_x"]))
        params = [p for p in params if p[0] != name] + [(name, "x" * draw(HUGE_VALUE))]
    return HandshakeCase(kind, target(path, params, raw), auth, status, code or "bad_request", bucket)


# --- frames on an accepted socket -------------------------------------------------------------------------------
def ogg_pages(data: bytes) -> list[int]:
    """Where each page of an Ogg stream starts."""
    starts, at = [], 0
    while at < len(data):
        starts.append(at)
        count = data[at + 26]
        at += 27 + count + sum(data[at + 27 : at + 27 + count])
    return starts


def endless_ogg_packet(total: int) -> bytes:
    """Ogg pages whose one packet never ends (every lacing value 255): a packet larger than any Opus packet."""
    body = bytes(255 * 255)
    page = b"OggS" + bytes(2) + struct.pack("<QII", 0, 7, 0) + bytes(4) + bytes([255]) + bytes([255] * 255) + body
    return page * (total // len(page) + 1)


def in_frames(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in frames of `sizes` in turn, at most 256 of them (this process's event loop sends them: a few MB in
    frames of a byte would hold it for minutes, a test artefact)."""
    out, at, turn = [], 0, 0
    while at < len(data):
        size = max(sizes[turn % len(sizes)], len(data) // 256)
        out.append(data[at : at + size])
        at, turn = at + size, turn + 1
    return out


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def hostile_socket(draw: st.DrawFn, ogg: bytes, webm: bytes) -> SocketCase:
    """`ogg`, `webm`: a short good Opus stream in each container, to cut and damage."""
    kind = draw(
        st.sampled_from(
            [
                "junk_text",
                "junk_json",
                "unknown_type",
                "deep_json",
                "binary_json_on_opus",
                "bad_option",
                "nan_f32",
                "odd_pcm",
                "after_close",
                "ogg_truncated",
                "ogg_lost_sync",
                "ogg_garbage",
                "ogg_endless_packet",
                "webm_truncated",
                "webm_garbage",
                "webm_huge_element",
                "not_a_container",
            ]
        )  # fmt: skip
    )
    pcm = (("encoding", "linear16"), ("sample_rate", str(draw(st.sampled_from([8000, 16000, 44100])))))
    dialect, params, frames = draw(st.sampled_from(["deepgram", "native"])), pcm, []
    if dialect == "native":
        params = (("encoding", "pcm_s16le"), params[1])
    close, code = 1008, "bad_message"
    if kind == "junk_text":
        frames = [draw(st.text(min_size=0, max_size=200))]
    elif kind == "junk_json":
        frames = [
            json.dumps(draw(json_values.filter(lambda v: not (isinstance(v, dict) and v.get("type") in CONTROL_TYPES))))
        ]
    elif kind == "unknown_type":
        fields = draw(st.dictionaries(texts, json_values, max_size=3)) | {
            "type": draw(json_values.filter(lambda t: t not in CONTROL_TYPES))
        }
        frames = [json.dumps(fields)]
    elif kind == "deep_json":
        depth = draw(st.integers(1000, 200_000))
        frames = [draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "[" * depth]))]
    elif kind == "binary_json_on_opus":  # a control message sent as a binary frame, where audio is expected
        params = () if dialect == "deepgram" else (("encoding", "opus"),)
        frames = [json.dumps({"type": draw(st.sampled_from(CONTROL_TYPES))}).encode()]
        close, code = 1007, "bad_payload"
    elif kind == "bad_option":  # native: a parameter that is no session option the gateway knows
        dialect, close, code = "native", 1008, "bad_option"
        params = (
            ("encoding", "pcm_s16le"),
            ("sample_rate", "16000"),
            (draw(st.from_regex(r"zz[a-z_]{1,12}", fullmatch=True)), draw(texts)),
        )
    elif kind == "nan_f32":  # whole frames, one of them not a number: the gateway's check, as on NATS
        params = (("encoding", "linear32" if dialect == "deepgram" else "pcm_f32le"), ("sample_rate", "16000"))
        samples = np.zeros(draw(st.integers(1, 4000)), "<f4")
        samples[draw(st.integers(0, len(samples) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        frames = [samples.tobytes(), CLOSE_STREAM]
        code = "bad_payload"
    elif kind in ("odd_pcm", "after_close"):  # random bytes of odd lengths as PCM: taken, as any PCM is
        pieces = draw(st.lists(st.binary(min_size=1, max_size=3001), min_size=1, max_size=8))
        frames = [*pieces, CLOSE_STREAM]
        if kind == "after_close":
            frames += draw(
                st.lists(st.one_of(st.binary(max_size=64), st.just(CLOSE_STREAM), texts), min_size=1, max_size=3)
            )
        # The stream's last bytes, if not a whole frame, are no audio: dropped, and said so; the session still ends.
        close, code = None, ("bad_payload" if sum(len(p) for p in pieces) % 2 else None)
    else:
        params = () if dialect == "deepgram" else (("encoding", "opus"),)
        close, code = 1007, "bad_payload"
        if kind == "ogg_truncated":  # ends inside a page
            inside = [at for start in ogg_pages(ogg) for at in range(start + 1, start + 40)]
            frames = [ogg[: draw(st.sampled_from(inside))]]
        elif kind == "ogg_lost_sync":
            start = draw(st.sampled_from(ogg_pages(ogg)[1:]))
            frames = [
                ogg[:start] + draw(st.binary(min_size=4, max_size=4).filter(lambda b: b != b"OggS")) + ogg[start + 4 :]
            ]
        elif kind == "ogg_garbage":
            frames = [b"OggS" + draw(st.binary(max_size=2000))]
        elif kind == "ogg_endless_packet":
            frames = [endless_ogg_packet(MAX_BUFFERED_BYTES + draw(st.integers(1, 1 << 20)))]
        elif kind == "webm_truncated":  # inside its headers, or inside its last element
            cut = draw(
                st.one_of(st.integers(1, webm.index(CLUSTER) - 1), st.integers(1, 8).map(lambda k: len(webm) - k))
            )
            frames = [webm[:cut]]
        elif kind == "webm_garbage":
            frames = [webm[:4] + draw(st.binary(max_size=2000))]
        elif kind == "webm_huge_element":  # a SimpleBlock said to be 1 TiB long, then more bytes than a stream holds
            head = webm[: webm.index(CLUSTER)] + CLUSTER + b"\x01\xff\xff\xff\xff\xff\xff\xff"
            frames = [head + b"\xa3\x08" + (1 << 40).to_bytes(7, "big") + bytes(MAX_BUFFERED_BYTES + 1)]
        else:  # not_a_container
            frames = [
                draw(st.binary(min_size=4, max_size=200).filter(lambda b: b[:4] not in (b"OggS", b"\x1a\x45\xdf\xa3")))
            ]
        frames = [*in_frames(frames[0], draw(st.lists(st.integers(1, 1 << 19), min_size=1, max_size=4))), CLOSE_STREAM]
    return SocketCase(kind, dialect, tuple(params), tuple(frames), close, code)
