"""Hostile messages for each entry point, generated with hypothesis, each with the answer the service owes it.

Every case is one message a service must refuse: `codes` are the refusal codes that are right for it (a message
broken in two ways may be refused for either), `bucket` the tenant token of the `errors.<service>.<bucket>` subject
its report goes to ('_' when the subject's tenant is not a valid id). A case's base is a message with exactly one
thing wrong; a third of them are then damaged once more (a field of the wrong type, a required field dropped, an
unknown field added, a field blown up to 20-200 kB), which may change the code to a decoding one but never makes
the message acceptable.

Hypothesis only generates here (no shrinking, no example database): the services run live, so a failing case is
reported with its kind and bytes instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as fields_of
from typing import Any, get_args

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as with_seed
from hypothesis import strategies as st

from jetscribe.services.ingest.core import AUDIO_ENVELOPE_BYTES
from jetscribe.shared import subjects
from jetscribe.shared.wire import WHISPER_LANGUAGES, ControlAction, SessionOptions

DECODING = frozenset({"not_msgpack", "malformed", "unsupported_version"})
DAMAGED = DECODING | {"subject_mismatch", "too_large"}
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
TENANT = "fz"  # the tenant every fuzz case is about, unless it is about a bad one


@dataclass(frozen=True)
class Case:
    kind: str
    subject: str
    data: bytes
    codes: frozenset[str]
    bucket: str

    def __repr__(self) -> str:
        return f"Case({self.kind}, {self.subject[:80]!r}, {len(self.data)} bytes: {self.data[:120]!r})"


def draw_cases(strategy: st.SearchStrategy[Case], count: int, seed: int) -> list[Case]:
    """`count` cases from `strategy` (hypothesis's generation phase alone)."""
    out: list[Case] = []

    @with_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(case: Case) -> None:
        out.append(case)

    while len(out) < count:  # hypothesis may stop early once it thinks the space is covered
        collect()
    return out[:count]


# --- values ---------------------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), UINT64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.binary(max_size=16),
)
any_value = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=16,
)
valid_tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
# Subject tokens NATS carries but that are not ids: odd characters, or too long.
bad_tokens = st.one_of(
    st.text(alphabet="ab$!#~:@%^&()+=é€", min_size=1, max_size=12).filter(lambda t: not subjects.is_valid_token(t)),
    st.integers(65, 300).map(lambda n: "x" * n),
)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])

# Values of a type msgspec refuses for a field of each kind (int for a float field would be fine, so not there).
WRONG_FOR = {
    "int": st.one_of(st.text(max_size=8), st.floats(), st.booleans(), st.none(), st.lists(scalars, max_size=3)),
    "float": st.one_of(
        st.text(max_size=8),
        st.booleans(),
        st.none(),
        st.binary(max_size=8),
        st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    ),
    "str": st.one_of(st.integers(0, 10), st.floats(), st.none(), st.binary(max_size=8), st.lists(scalars, max_size=3)),
    "bytes": st.one_of(st.integers(0, 10), st.floats(), st.none(), st.lists(scalars, max_size=3)),
    "dict": st.one_of(st.integers(0, 10), st.text(max_size=8), st.lists(scalars, max_size=3)),
    "list": st.one_of(
        st.integers(0, 10), st.text(max_size=8), st.dictionaries(st.text(max_size=3), scalars, max_size=2)
    ),
}
AUDIO_FIELDS = {
    "type": "str", "v": "int", "tenant": "str", "session_id": "str", "seq": "int", "sent_at": "float",
    "sample_rate": "int", "channels": "int", "encoding": "str", "payload": "bytes", "received_at": "float",
}  # fmt: skip
# Required fields. Not `type` for the gateway: it decodes one message class, and msgspec takes a missing tag as that
# class's (the transcriber and the persister decode a union, where it is required).
AUDIO_REQUIRED = ("tenant", "session_id", "seq", "sent_at", "sample_rate", "channels", "encoding", "payload")
CONTROL_FIELDS = {
    "type": "str", "v": "int", "tenant": "str", "session_id": "str", "action": "str", "language": "str",
    "options": "dict", "sent_at": "float",
}  # fmt: skip
CONTROL_REQUIRED = ("tenant", "session_id", "action")
SEGMENT_FIELDS = {
    "type": "str", "v": "int", "tenant": "str", "session_id": "str", "segment_id": "int", "revision": "int",
    "status": "str", "start": "float", "end": "float", "text": "str", "words": "list", "model": "str",
    "seq_first": "int", "seq_last": "int", "worker_id": "str", "published_at": "float",
}  # fmt: skip
SEGMENT_REQUIRED = ("type", "tenant", "session_id", "segment_id", "revision", "status", "start", "end", "text")
EVENT_FIELDS = {
    "type": "str", "v": "int", "tenant": "str", "session_id": "str", "event": "str", "at": "float",
    "reason": "str", "chunks_received": "int", "audio_seconds": "float",
}  # fmt: skip
EVENT_REQUIRED = ("type", "tenant", "session_id", "event", "at")


def encode(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def bucket_of(tenant: str) -> str:
    return tenant if subjects.is_valid_token(tenant) else subjects.UNKNOWN_TENANT


@st.composite
def garbage(draw: st.DrawFn, subject: str, bucket: str, valid: dict[str, Any], limit: int) -> Case:
    """Bytes that are not a message: random, msgpack of anything, nested thousands deep, or a message cut short."""
    kind = draw(st.sampled_from(["random_bytes", "any_msgpack", "deep_nesting", "truncated"]))
    codes = DECODING
    if kind == "random_bytes":
        data = draw(st.binary(max_size=512))
    elif kind == "any_msgpack":
        data = encode(draw(any_value))
    elif kind == "deep_nesting":
        depth = draw(st.integers(100, 200_000))
        data = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdd\x00\x00\x00\x01"])) * depth + b"\xc0"
        codes |= {"too_large"} if len(data) > limit else frozenset()
    else:
        whole = encode(valid)
        data = whole[: draw(st.integers(0, len(whole) - 1))]
    return Case(kind, subject, data, codes, bucket)


@st.composite
def damaged(
    draw: st.DrawFn,
    fields: dict[str, Any],
    types: dict[str, str],
    required: tuple[str, ...],
    keep: tuple[str, ...] = (),
):
    """`fields` damaged once more, a third of the time: (fields, whether that can change the refusal's code).
    `keep`: fields a huge value must not replace (it would make the message good)."""
    how = draw(st.sampled_from(["none", "none", "none", "wrong_type", "drop", "unknown_field", "huge"]))
    fields = dict(fields)
    if how == "wrong_type":
        name = draw(st.sampled_from(sorted(types)))
        fields[name] = draw(WRONG_FOR[types[name]])
    elif how == "drop":
        fields.pop(draw(st.sampled_from(required)))
    elif how == "unknown_field":
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in types))
        fields[name] = draw(any_value)
        return fields, False
    elif how == "huge":
        name = draw(st.sampled_from(sorted(n for n, t in types.items() if t == "str" and n not in keep)))
        fields[name] = "x" * draw(st.integers(20_000, 200_000))
    return fields, how != "none"


def _case(kind: str, subject: str, data: bytes, codes: set[str] | frozenset[str], bucket: str, hurt: bool) -> Case:
    return Case(kind, subject, data, frozenset(codes) | (DAMAGED if hurt else frozenset()), bucket)


# --- the gateway: the envelope every message to it carries ------------------------------------------------------
@st.composite
def envelope_fault(
    draw: st.DrawFn, kind: str, fields: dict[str, Any], message_type: str
) -> tuple[str, str, set[str]] | None:
    """A fault of `kind` in the envelope every gateway message has (sent_at, v, type, tenant, session_id), made in
    `fields`: the tenant and session its subject names, and the codes it is refused with; None for another kind."""
    tenant, session = fields["tenant"], fields["session_id"]
    if kind == "bad_sent_at":
        fields["sent_at"] = draw(not_finite)
        codes = {"malformed"}
    elif kind == "bad_version":
        fields["v"] = draw(st.integers(-(2**63), UINT64_MAX).filter(lambda v: v != 1))
        codes = {"unsupported_version"}
    elif kind == "unknown_type":
        fields["type"] = draw(st.text(max_size=20).filter(lambda t: t != message_type))
        codes = {"malformed"}
    elif kind == "subject_mismatch":
        other = draw(valid_tokens.filter(lambda t: t != session))
        fields["session_id" if draw(st.booleans()) else "tenant"] = other
        codes = {"subject_mismatch"}
    elif kind == "bad_id":
        tenant, session = draw(st.sampled_from([(draw(bad_tokens), session), (TENANT, draw(bad_tokens))]))
        fields |= {"tenant": tenant, "session_id": session}
        codes = {"bad_id"}
    else:
        return None
    return tenant, session, codes


# --- the gateway: ingest.audio.<tenant>.<session> ----------------------------------------------------------------
@dataclass(frozen=True)
class GatewaySessions:
    """Sessions of TENANT the test prepared: `victims` started and never sent a chunk (so every chunk for them is
    refused: a gap, or broken), `ended` started and ended."""

    victims: tuple[str, ...]
    ended: str
    max_chunk_bytes: int


def audio_fields(tenant: str, session: str, **overrides: Any) -> dict[str, Any]:
    fields = {
        "type": "audio",
        "v": 1,
        "tenant": tenant,
        "session_id": session,
        "seq": 0,
        "sent_at": 1.0,
        "sample_rate": 16000,
        "channels": 1,
        "encoding": "pcm_s16le",
        "payload": bytes(320),
    }
    return fields | overrides


@st.composite
def gateway_audio(draw: st.DrawFn, sessions: GatewaySessions) -> Case:
    victim = draw(st.sampled_from(sessions.victims))
    subject = subjects.ingest_audio(TENANT, victim)
    limit = sessions.max_chunk_bytes + AUDIO_ENVELOPE_BYTES
    if draw(st.integers(0, 9)) == 0:
        return draw(garbage(subject, TENANT, audio_fields(TENANT, victim), limit))
    kind = draw(
        st.sampled_from(
            [
                "seq_gap",
                "negative_seq",
                "bad_sample_rate",
                "bad_channels",
                "bad_payload",
                "too_large",
                "bad_sent_at",
                "bad_encoding",
                "bad_version",
                "unknown_type",
                "subject_mismatch",
                "bad_id",
                "unknown_session",
                "session_ended",
            ]
        )  # fmt: skip
    )
    tenant, session, fields, codes = TENANT, victim, audio_fields(TENANT, victim), {"rate_limited"}
    if envelope := draw(envelope_fault(kind, fields, "audio")):
        tenant, session, codes = envelope
    elif kind == "seq_gap":
        fields["seq"] = draw(st.integers(1, UINT64_MAX))
        codes.add("seq_gap")
    elif kind == "negative_seq":
        fields["seq"] = draw(st.integers(-(2**63), -1))
        codes.add("bad_seq")
    elif kind == "bad_sample_rate":
        fields["sample_rate"] = draw(st.one_of(st.integers(-(2**63), 7999), st.integers(192_001, INT64_MAX)))
        codes = {"bad_sample_rate"}
    elif kind == "bad_channels":
        fields["channels"] = draw(st.one_of(st.integers(-(2**63), 0), st.integers(9, INT64_MAX)))
        codes = {"bad_channels"}
    elif kind == "bad_payload":
        channels = draw(st.integers(1, 8))
        encoding = draw(st.sampled_from(["pcm_s16le", "pcm_f32le"]))
        frame = channels * (2 if encoding == "pcm_s16le" else 4)
        frames = draw(st.integers(0, 400))
        if encoding == "pcm_f32le" and draw(st.booleans()):  # whole frames, one of them not a number
            import numpy as np

            samples = np.zeros(max(frames, 1) * channels, "<f4")
            samples[draw(st.integers(0, len(samples) - 1))] = draw(not_finite)
            payload = samples.tobytes()
        else:
            payload = bytes(frames * frame + draw(st.integers(1, frame - 1)))
        rate = draw(st.sampled_from([8000, 16000, 22050, 44100, 48000, 96000, 192000]))
        fields |= {"channels": channels, "encoding": encoding, "payload": payload, "sample_rate": rate}
        codes.add("bad_payload")
    elif kind == "too_large":
        fields["payload"] = bytes(sessions.max_chunk_bytes + draw(st.integers(1, 100_000)))
        codes = {"too_large"}
    elif kind == "bad_encoding":
        fields["encoding"] = draw(st.text(max_size=20).filter(lambda e: e not in ("pcm_s16le", "pcm_f32le")))
        codes = {"malformed"}
    elif kind == "unknown_session":
        session = "nx" + draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True))
        fields["session_id"] = session
        codes = {"unknown_session"}
    else:
        session = sessions.ended
        fields["session_id"] = session
        codes = {"session_ended"}
    fields, hurt = draw(damaged(fields, AUDIO_FIELDS, AUDIO_REQUIRED))
    return _case(kind, subjects.ingest_audio(tenant, session), encode(fields), codes, bucket_of(tenant), hurt)


# --- the gateway: ingest.session.<tenant>.<session> --------------------------------------------------------------
def control_fields(tenant: str, session: str, **overrides: Any) -> dict[str, Any]:
    return {"type": "control", "v": 1, "tenant": tenant, "session_id": session, "action": "start"} | overrides


@st.composite
def gateway_session(draw: st.DrawFn, sessions: GatewaySessions) -> Case:
    fresh = "nx" + draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True))  # never started
    subject = subjects.ingest_session(TENANT, fresh)
    if draw(st.integers(0, 9)) == 0:
        return draw(garbage(subject, TENANT, control_fields(TENANT, fresh), 16 * 1024))
    kind = draw(
        st.sampled_from(
            [
                "bad_language",
                "end_unknown",
                "start_ended",
                "bad_action",
                "bad_options",
                "bad_option",
                "bad_sent_at",
                "too_large",
                "bad_version",
                "unknown_type",
                "subject_mismatch",
                "bad_id",
            ]
        )  # fmt: skip
    )
    tenant, session, fields = TENANT, fresh, control_fields(TENANT, fresh)
    if envelope := draw(envelope_fault(kind, fields, "control")):
        tenant, session, codes = envelope
    elif kind == "bad_language":
        fields["language"] = draw(st.text(max_size=30).filter(lambda x: x != "auto" and x not in WHISPER_LANGUAGES))
        codes = {"bad_language"}
    elif kind == "end_unknown":
        fields["action"] = "end"
        codes = {"unknown_session"}
    elif kind == "start_ended":
        session = sessions.ended
        fields["session_id"] = session
        codes = {"session_ended"}
    elif kind == "bad_action":
        fields["action"] = draw(st.text(max_size=20).filter(lambda a: a not in get_args(ControlAction)))
        codes = {"malformed"}
    elif kind == "bad_options":
        nested = st.one_of(
            st.none(),
            st.binary(max_size=4),
            st.lists(scalars, max_size=3),
            st.dictionaries(st.text(max_size=3), scalars, max_size=2),
        )
        fields["options"] = {draw(st.text(max_size=8)): draw(nested)}
        codes = {"malformed"}
    elif kind == "bad_option":  # well-formed, but a key the transcriber does not know or a value it cannot take
        known = {f.name for f in fields_of(SessionOptions)}
        key = draw(st.one_of(st.text(max_size=8).filter(lambda k: k not in known), st.sampled_from(sorted(known))))
        value = draw(
            st.one_of(
                st.text(max_size=4),
                st.floats(allow_nan=False).filter(lambda x: x != int(x) if math.isfinite(x) else True),
                st.integers(-10, 9),
            )
        )
        if key == "language" and (value == "auto" or value in WHISPER_LANGUAGES):
            value = 7
        fields["options"] = {key: value}
        codes = {"bad_option"}
    else:  # too_large
        n = draw(st.integers(2000, 20_000))
        fields["options"] = {f"k{i}": "v" * 8 for i in range(n)}
        codes = {"too_large"}
    fields, hurt = draw(damaged(fields, CONTROL_FIELDS, CONTROL_REQUIRED))
    return _case(kind, subjects.ingest_session(tenant, session), encode(fields), codes, bucket_of(tenant), hurt)


# --- the transcriber: AUDIO, written to directly by a client that should not be able to ------------------------
@st.composite
def stored_audio(draw: st.DrawFn) -> Case:
    """What a publisher other than the gateway could put into AUDIO; none of it may open or move a session."""
    session = "tx" + draw(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True))
    subject = subjects.audio(TENANT, session)
    valid = audio_fields(TENANT, session, received_at=2.0)
    if draw(st.integers(0, 9)) == 0:
        return draw(garbage(subject, TENANT, valid, 10**9))
    kind = draw(
        st.sampled_from(
            ["not_stored_format", "bad_seq", "bad_time", "bad_id", "bad_language", "bad_version", "unknown_type"]
        )
    )
    tenant, fields = TENANT, dict(valid)
    if kind == "not_stored_format":
        how = draw(st.sampled_from(["sample_rate", "channels", "encoding", "odd_payload"]))
        if how == "sample_rate":
            fields["sample_rate"] = draw(st.integers(-(2**63), INT64_MAX).filter(lambda r: r != 16000))
        elif how == "channels":
            fields["channels"] = draw(st.integers(-(2**63), INT64_MAX).filter(lambda c: c != 1))
        elif how == "encoding":
            fields["encoding"] = "pcm_f32le"
        else:
            fields["payload"] = bytes(2 * draw(st.integers(0, 1000)) + 1)
        codes = {"malformed"}
    elif kind == "bad_seq":
        fields["seq"] = draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**63, UINT64_MAX)))
        codes = {"bad_seq"}
    elif kind == "bad_time":
        fields[draw(st.sampled_from(["sent_at", "received_at"]))] = draw(not_finite)
        codes = {"malformed"}
    elif kind == "bad_id":
        tenant, session = draw(st.sampled_from([(draw(bad_tokens), session), (TENANT, draw(bad_tokens))]))
        fields |= {"tenant": tenant, "session_id": session}
        codes = {"bad_id"}
    elif kind == "bad_language":
        language = draw(st.text(min_size=1, max_size=30).filter(lambda x: x != "auto" and x not in WHISPER_LANGUAGES))
        fields = control_fields(TENANT, session, language=language)
        codes = {"bad_language"}
    elif kind == "bad_version":
        fields["v"] = draw(st.integers(-(2**63), UINT64_MAX).filter(lambda v: v != 1))
        codes = {"unsupported_version"}
    else:
        fields["type"] = draw(st.text(max_size=20).filter(lambda t: t not in ("audio", "control")))
        codes = {"malformed"}
    control = fields["type"] == "control"
    types, required = (CONTROL_FIELDS, CONTROL_REQUIRED) if control else (AUDIO_FIELDS, AUDIO_REQUIRED)
    required = ("type", *required)
    fields, hurt = draw(damaged(fields, types, required))
    # A huge tenant or session id in the payload: a bad id, or (with auth14) not the subject's.
    hurt_codes = DECODING | {"bad_id", "subject_mismatch"} if hurt else frozenset()
    return Case(kind, subjects.audio(tenant, session), encode(fields), frozenset(codes) | hurt_codes, bucket_of(tenant))


# --- the persister: TRANSCRIPTS, written to directly -------------------------------------------------------------
def segment_fields(tenant: str, session: str, **overrides: Any) -> dict[str, Any]:
    fields = {
        "type": "segment",
        "v": 1,
        "tenant": tenant,
        "session_id": session,
        "segment_id": 0,
        "revision": 0,
        "status": "final",
        "start": 0.0,
        "end": 1.0,
        "text": "hello",
        "words": [["hello", 0.0, 1.0, 0.9]],
        "published_at": 1_790_000_000.0,
    }
    return fields | overrides


def event_fields(tenant: str, session: str, **overrides: Any) -> dict[str, Any]:
    return {
        "type": "session_event",
        "v": 1,
        "tenant": tenant,
        "session_id": session,
        "event": "ended",
        "at": 1.0e9,
    } | overrides


@st.composite
def transcripts(draw: st.DrawFn) -> Case:
    """What a publisher other than the transcriber could put into TRANSCRIPTS; none of it may be stored."""
    session = "px" + draw(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True))
    if draw(st.integers(0, 9)) == 0:
        return draw(garbage(subjects.transcript(TENANT, session), TENANT, segment_fields(TENANT, session), 10**9))
    tenant = TENANT
    if draw(st.booleans()):
        fields = segment_fields(TENANT, session)
        kind = draw(
            st.sampled_from(
                ["not_finite", "int_range", "nul", "time_range", "mismatch", "bad_id", "status", "word_shape"]
            )
        )
        if kind == "not_finite":
            where = draw(st.sampled_from(["start", "end", "published_at", 1, 2, 3]))
            if isinstance(where, int):
                fields["words"] = [["hello", 0.0, 1.0, 0.9]]
                fields["words"][0][where] = draw(not_finite)
            else:
                fields[where] = draw(not_finite)
        elif kind == "int_range":
            fields[draw(st.sampled_from(["segment_id", "revision", "seq_first", "seq_last"]))] = draw(
                st.integers(2**63, UINT64_MAX)
            )
        elif kind == "nul":
            name = draw(st.sampled_from(["text", "model", "worker_id", "word"]))
            value = draw(st.text(max_size=10)) + "\x00" + "y" * draw(st.sampled_from([0, 10, 200_000]))
            if name == "word":
                fields["words"] = [[value, 0.0, 1.0, 0.9]]
            else:
                fields[name] = value
        elif kind == "time_range":
            fields["published_at"] = draw(st.one_of(st.floats(2.6e11, 1e300), st.floats(-1e300, -6.3e10)))
        elif kind == "mismatch":
            fields["session_id"] = draw(valid_tokens.filter(lambda t: t != session))
        elif kind == "bad_id":
            tenant, session = draw(st.sampled_from([(draw(bad_tokens), session), (TENANT, draw(bad_tokens))]))
            fields |= {"tenant": tenant, "session_id": session}
        elif kind == "status":
            fields["status"] = draw(st.text(max_size=10).filter(lambda s: s not in ("interim", "final")))
        else:
            fields["words"] = [draw(st.lists(scalars, max_size=6).filter(lambda w: len(w) != 4))]
        codes = {"subject_mismatch"} if kind == "mismatch" else {"malformed"}
        subject = subjects.transcript(tenant, session)
        types, required, keep = SEGMENT_FIELDS, SEGMENT_REQUIRED, ("text", "model", "worker_id")
    else:
        event = "ended"
        fields = event_fields(TENANT, session)
        kind = draw(
            st.sampled_from(["unknown_event", "not_finite", "time_range", "int_range", "nul", "mismatch", "bad_id"])
        )
        if kind == "unknown_event":
            event = draw(
                st.from_regex(r"[a-z]{1,12}", fullmatch=True).filter(
                    lambda e: e not in ("started", "ended", "rejected")
                )
            )
            fields["event"] = event
        elif kind == "not_finite":
            fields[draw(st.sampled_from(["at", "audio_seconds"]))] = draw(not_finite)
        elif kind == "time_range":
            fields["at"] = draw(st.one_of(st.floats(2.6e11, 1e300), st.floats(-1e300, -6.3e10)))
        elif kind == "int_range":
            fields["chunks_received"] = draw(st.integers(2**63, UINT64_MAX))
        elif kind == "nul":
            fields["reason"] = "idle\x00"
        elif kind == "bad_id":  # also read by the gateways' slot keeping (ended, rejected): not a KV key
            event = fields["event"] = draw(st.sampled_from(["ended", "rejected"]))
            tenant, session = draw(st.sampled_from([(draw(bad_tokens), session), (TENANT, draw(bad_tokens))]))
            fields |= {"tenant": tenant, "session_id": session}
        elif draw(st.booleans()):
            event = "started"  # an `ended` on the subject of a `started`
        else:
            fields["tenant"] = draw(valid_tokens.filter(lambda t: t != TENANT))  # another tenant's, on ours
        codes = {"subject_mismatch"} if kind == "mismatch" else {"malformed"}
        subject = subjects.session_event(tenant, session, event)
        types, required, keep = EVENT_FIELDS, EVENT_REQUIRED, ("reason",)
    fields, hurt = draw(damaged(fields, types, required, keep))
    codes_out = frozenset(codes) | (DECODING | {"subject_mismatch"} if hurt else frozenset())
    return Case(f"{fields.get('type')}:{kind}", subject, encode(fields), codes_out, bucket_of(tenant))
