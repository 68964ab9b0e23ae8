"""The persister's decisions, without I/O: whether a message may be stored, and which rows a batch becomes.

Every rule here is written so that applying a batch twice, or in pieces, ends in the same rows:
JetStream redelivers anything not acked, so the persister sees repeats after every restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from jetscribe.shared import subjects
from jetscribe.shared.errors import CodedError, brief
from jetscribe.shared.wire import (
    ErrorEvent,
    Segment,
    SegmentStatus,
    SessionEvent,
    SessionEventKind,
    TranscriptMessage,
    Word,
)

SessionKey = tuple[str, str]  # (tenant, session_id)
Row = dict[str, Any]  # a database row: column name -> value
SessionStatus = Literal["active", "ended", "rejected"]  # sessions.status
EventKind = SessionEventKind

_INT64 = range(-(2**63), 2**63)


class _Interval:
    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


# Wire times become datetimes (years 1-9999); one outside them would fail the whole batch's write, every time.
_EPOCH_RANGE = _Interval(datetime(1, 1, 2, tzinfo=UTC).timestamp(), datetime(9999, 12, 30, tzinfo=UTC).timestamp())
_EPOCH_PROBLEM = "{name} must be epoch seconds between the years 1 and 9999"
_RANK: Final[dict[SegmentStatus, int]] = {"interim": 0, "final": 1}
_EVENT_STATUS: Final[dict[EventKind, SessionStatus]] = {"started": "active", "ended": "ended", "rejected": "rejected"}
CLOSED: Final[tuple[SessionStatus, ...]] = ("ended", "rejected")  # the terminal session states
# Live signals for captions and turn-taking, many per session: acked with their batch, not stored. The finals' word
# times hold the same (a gap between words, where speech began), and TRANSCRIPTS keeps them for a replay.
NOT_STORED: Final[frozenset[EventKind]] = frozenset({"utterance_end", "speech_started"})


@dataclass(frozen=True)
class Delivered:
    """A decoded message and the time the stream stored it (the same on every redelivery)."""

    message: TranscriptMessage
    stored_at: float


@dataclass(frozen=True)
class BatchWrite:
    """What one batch changes in the database, in the order the store applies it."""

    session_touches: list[Row] = field(default_factory=list)  # one per session, sorted by key
    session_events: list[Row] = field(default_factory=list)  # in stream order
    segments: list[Row] = field(default_factory=list)  # one per segment key: the version that wins
    recount: list[SessionKey] = field(default_factory=list)  # sessions whose segment_count may change


def timestamp(epoch_s: float) -> datetime | None:
    """A wire time (epoch seconds, 0 meaning unknown) as an aware datetime."""
    if not epoch_s:
        return None
    return datetime.fromtimestamp(epoch_s, UTC)


def _or_none(value: str | None) -> str | None:
    return value or None  # the wire says "" for unknown; the table says NULL


def segment_row(segment: Segment) -> Row:
    """The `segments` row of one Segment message."""
    return {
        "tenant": segment.tenant,
        "session_id": segment.session_id,
        "segment_id": segment.segment_id,
        "revision": segment.revision,
        "status": segment.status,
        "start_s": segment.start,
        "end_s": segment.end,
        "text": segment.text,
        "words": [word_row(w) for w in segment.words],
        "speaker": segment.speaker,
        "speaker_source": segment.speaker_source,
        "meeting_id": segment.meeting_id,
        "track_start": segment.track_start,
        "language": _or_none(segment.language),
        "model": _or_none(segment.model),
        "seq_first": segment.seq_first,
        "seq_last": segment.seq_last,
        "worker_id": _or_none(segment.worker_id),
        "published_at": timestamp(segment.published_at),
    }


def word_row(word: Word) -> list[Any]:
    """A word in `segments.words`: [word, start, end, probability], and its speaker fifth when it has one."""
    row: list[Any] = [word.word, word.start, word.end, word.probability]
    return row if word.speaker is None else [*row, word.speaker]


def next_status(current: SessionStatus | None, event: EventKind) -> SessionStatus:
    """A session's status after `event` (started, ended, rejected), given its stored status (None: no row yet).

    `started` makes a session active; `ended` and `rejected` close it. A closed session keeps the state it
    first closed with: a late or replayed `started` never reopens it, and a second `ended` or `rejected`
    changes nothing (nor its reason, end time or totals). The store's upsert says the same in SQL.
    """
    if current in CLOSED:
        return current
    return _EVENT_STATUS[event]


def session_row_from_event(event: SessionEvent, stored_at: float = 0.0) -> Row:
    """The `sessions` row a lifecycle event upserts; `ended` and `rejected` carry the reason and totals."""
    at = timestamp(event.at or stored_at)
    status = next_status(None, event.event)
    closes = status in CLOSED
    return {
        "tenant": event.tenant,
        "session_id": event.session_id,
        "status": status,
        "reason": _or_none(event.reason) if closes else None,
        "language": _or_none(event.language),
        "model": _or_none(event.model),
        "created_at": at,
        "last_activity": at,
        "ended_at": at if closes else None,
        "chunks_received": event.chunks_received if closes else 0,
        "audio_seconds": event.audio_seconds if closes else 0.0,
        "words_dropped": event.words_dropped if closes else 0,
        "empty_finals": event.empty_finals if closes else 0,
        "worker_id": _or_none(event.worker_id),
    }


def session_touch(segment: Segment, stored_at: float) -> Row:
    """The `sessions` row a segment implies: its session exists and was active when it was published."""
    at = timestamp(segment.published_at or stored_at)
    return {
        "tenant": segment.tenant,
        "session_id": segment.session_id,
        "status": "active",
        "created_at": at,
        "last_activity": at,
    }


def replaces(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether segment version `new` overwrites `old`; the store's ON CONFLICT ... WHERE says the same in SQL.

    A final beats any interim, an interim never beats a final, and within one status the higher
    revision wins. Equal rank keeps what is there, so a repeat changes nothing.
    """
    return (_RANK[new["status"]], new["revision"]) > (_RANK[old["status"]], old["revision"])


def winning_segments(rows: Iterable[Row]) -> list[Row]:
    """One row per segment key, the one `replaces` keeps (Postgres refuses to upsert a row twice in one INSERT)."""
    best: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        key = (row["tenant"], row["session_id"], row["segment_id"])
        if key not in best or replaces(row, best[key]):
            best[key] = row
    return list(best.values())


def _merge_touches(touches: Iterable[Row]) -> list[Row]:
    merged: dict[SessionKey, Row] = {}
    for touch in touches:
        key = (touch["tenant"], touch["session_id"])
        seen = merged.get(key)
        if seen is None:
            merged[key] = dict(touch)
        else:
            seen["created_at"] = min(seen["created_at"], touch["created_at"])
            seen["last_activity"] = max(seen["last_activity"], touch["last_activity"])
    # A fixed lock order keeps two persisters writing the same sessions from deadlocking.
    return [merged[key] for key in sorted(merged)]


def plan_batch(delivered: Iterable[Delivered]) -> BatchWrite:
    """The writes one batch of valid messages turns into."""
    touches: list[Row] = []
    events: list[Row] = []
    segments: list[Row] = []
    recount: set[SessionKey] = set()
    for item in delivered:
        message = item.message
        key = (message.tenant, message.session_id)
        if isinstance(message, Segment):
            segments.append(segment_row(message))
            touches.append(session_touch(message, item.stored_at))
            if message.status == "final":
                recount.add(key)
        elif message.event not in NOT_STORED:
            events.append(session_row_from_event(message, item.stored_at))
            # An event may create the row; a recount makes its segment_count right from the start.
            recount.add(key)
    return BatchWrite(
        session_touches=_merge_touches(touches),
        session_events=events,
        segments=winning_segments(segments),
        recount=sorted(recount),
    )


class Unstorable(CodedError):
    """A message the persister will never store, so retrying is useless: it is reported as an ErrorEvent
    and terminated (`Persister.drop_unstorable`). Not a session's `rejected` status: that is a stored event."""


def subject_route(subject: str) -> tuple[str, str | None]:
    """(tenant, session_id) named by a TRANSCRIPTS subject, as far as it names them."""
    tokens = subject.split(".")
    tenant = tokens[1] if len(tokens) > 1 else ""
    session_id = tokens[2] if len(tokens) > 2 else None
    return tenant, session_id


def check(subject: str, message: TranscriptMessage) -> Unstorable | None:
    """A decoded message that still cannot be stored: it claims another subject, or holds what Postgres refuses."""
    if isinstance(message, Segment):
        expected = subjects.transcript(message.tenant, message.session_id)
    else:
        expected = subjects.session_event(message.tenant, message.session_id, message.event)
    # Permissions are subject rules, so the subject is what vouches for the tenant.
    if subject != expected:
        return Unstorable("subject_mismatch", f"message for {expected!r} arrived on {subject!r}")
    for name in ("tenant", "session_id"):
        if not subjects.is_valid_token(getattr(message, name)):
            return Unstorable("malformed", f"{name} must be 1-64 letters, digits, '_' or '-'")
    problem = _segment_problem(message) if isinstance(message, Segment) else _event_problem(message)
    return Unstorable("malformed", problem) if problem else None


def _segment_problem(segment: Segment) -> str | None:
    for name in ("segment_id", "revision", "seq_first", "seq_last"):
        if getattr(segment, name) not in _INT64:
            return f"{name} is out of the 64-bit range"
    numbers = [segment.start, segment.end, segment.published_at, segment.track_start]
    numbers += [x for w in segment.words for x in (w.start, w.end, w.probability)]
    if not all(math.isfinite(x) for x in numbers):
        return "times and probabilities must be finite numbers"
    if segment.published_at not in _EPOCH_RANGE:
        return _EPOCH_PROBLEM.format(name="published_at")
    texts = [segment.text, segment.speaker, segment.language, segment.model, segment.worker_id, segment.meeting_id]
    texts += [w.word for w in segment.words] + [w.speaker for w in segment.words]
    return _nul_problem(texts)


def _event_problem(event: SessionEvent) -> str | None:
    for name in ("chunks_received", "words_dropped", "empty_finals"):
        if getattr(event, name) not in _INT64:
            return f"{name} is out of the 64-bit range"
    if not (math.isfinite(event.at) and math.isfinite(event.audio_seconds)):
        return "at and audio_seconds must be finite numbers"
    if event.at not in _EPOCH_RANGE:
        return _EPOCH_PROBLEM.format(name="at")
    return _nul_problem([event.reason, event.language, event.model, event.worker_id])


def _nul_problem(texts: Iterable[str | None]) -> str | None:
    if any(t and "\x00" in t for t in texts):
        return "text fields must not contain NUL characters"  # Postgres text cannot hold them
    return None


def dropped_event(subject: str, problem: CodedError, at: float) -> ErrorEvent:
    """The ErrorEvent reporting a message the persister dropped: Unstorable, or a WireError from decoding it."""
    tenant, session_id = subject_route(subject)
    return ErrorEvent(
        tenant=tenant, session_id=session_id, code=problem.code, message=brief(f"{subject}: {problem.message}"), at=at
    )
