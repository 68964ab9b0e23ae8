"""The web process's decisions, without I/O: whose API key a request carries, and how a stored session is shown
and exported. The shell (`app.py`) reads PostgreSQL and serves what these return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from jetscribe.shared.errors import CodedError

AUTH_SCHEMES = ("token", "bearer")  # `Authorization: Token <key>`, as Deepgram's clients send it
KEY_PARAMETER = "token"  # `?token=<key>`: a download link, like a browser's WebSocket, cannot set a header


@dataclass(frozen=True)
class Export:
    """One export format of a session: what `jetscribe transcript --format` would print, as a download."""

    format: str
    content_type: str
    suffix: str


EXPORTS = {
    "srt": Export("srt", "application/x-subrip; charset=utf-8", "srt"),
    "vtt": Export("vtt", "text/vtt; charset=utf-8", "vtt"),
    "json": Export("json", "application/json; charset=utf-8", "json"),
}


class WebRefusal(CodedError):
    """A request the web process refuses; `status` is its HTTP status."""

    status = 400


class MissingKey(WebRefusal):
    code, status = "missing_key", 401

    def __init__(self) -> None:
        super().__init__(
            message=f"no API key: send `Authorization: Token <key>` or `?{KEY_PARAMETER}=<key>` "
            "(`jetscribe tenant add T` prints a tenant's key)"
        )


class UnknownKey(WebRefusal):
    code, status = "unknown_key", 401

    def __init__(self) -> None:
        super().__init__(message="this API key belongs to no tenant (revoked, or mistyped)")


class UnknownSession(WebRefusal):
    code, status = "unknown_session", 404

    def __init__(self, session_id: str) -> None:
        super().__init__(message=f"your tenant has no session {session_id!r} in PostgreSQL")


class UnknownFormat(WebRefusal):
    code, status = "bad_format", 400

    def __init__(self, fmt: str) -> None:
        super().__init__(message=f"no export format {fmt!r}: use one of {', '.join(EXPORTS)}")


def presented_key(authorization: str | None, query: Mapping[str, str]) -> str:
    """The API key a request carries, from its Authorization header (`Token <key>` or `Bearer <key>`) or its
    `token` query parameter; MissingKey if neither holds one."""
    if authorization:
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() in AUTH_SCHEMES and key.strip():
            return key.strip()
    key = (query.get(KEY_PARAMETER) or "").strip()
    if key:
        return key
    raise MissingKey()


def export_format(fmt: str) -> Export:
    try:
        return EXPORTS[fmt]
    except KeyError:
        raise UnknownFormat(fmt) from None


def export_filename(session_id: str, export: Export) -> str:
    """A download's file name: the session id with only characters safe in a Content-Disposition header."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)
    return f"{safe or 'session'}.{export.suffix}"


class StoredSession(Protocol):
    session_id: str
    status: str
    reason: str | None
    language: str | None
    created_at: datetime
    ended_at: datetime | None
    audio_seconds: float
    segment_count: int


class StoredFinal(Protocol):
    segment_id: int
    start_s: float
    end_s: float
    text: str
    speaker: str | None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def session_summary(row: StoredSession) -> dict[str, Any]:
    """One line of the session browser."""
    return {
        "session_id": row.session_id,
        "status": row.status,
        "reason": row.reason,
        "language": row.language,
        "created_at": _iso(row.created_at),
        "ended_at": _iso(row.ended_at),
        "audio_seconds": round(row.audio_seconds or 0.0, 3),
        "segment_count": row.segment_count or 0,
    }


def session_detail(row: StoredSession, finals: Sequence[StoredFinal]) -> dict[str, Any]:
    """A session opened in the browser: its summary and its finals with speakers and times."""
    return session_summary(row) | {
        "finals": [
            {
                "segment_id": s.segment_id,
                "start": round(s.start_s, 3),
                "end": round(s.end_s, 3),
                "speaker": s.speaker,
                "text": s.text,
            }
            for s in finals
            if s.text
        ]
    }
