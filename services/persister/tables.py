"""The Postgres schema as SQLAlchemy models. The database is created from migrations, never from these."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Double, Index, Integer, Text
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    """One transcription session: its lifecycle and totals (README, "Session states")."""

    __tablename__ = "sessions"
    __table_args__ = (CheckConstraint("status IN ('active', 'ended', 'rejected')", name="sessions_status"),)

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text)  # active | ended | rejected
    reason: Mapped[str | None] = mapped_column(Text)  # why it ended or was rejected; NULL: the bot ended it
    language: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # its ended or rejected event
    chunks_received: Mapped[int] = mapped_column(BigInteger, server_default=sql("0"))
    audio_seconds: Mapped[float] = mapped_column(Double, server_default=sql("0"))
    segment_count: Mapped[int] = mapped_column(Integer, server_default=sql("0"))  # final segments
    words_dropped: Mapped[int] = mapped_column(BigInteger, server_default=sql("0"))  # removed by the guards
    empty_finals: Mapped[int] = mapped_column(BigInteger, server_default=sql("0"))  # empty over speech
    last_activity: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(Text)  # the worker of the event that set `status`


class SegmentRow(Base):
    """The current best version of one segment: its final if one arrived, else its latest interim."""

    __tablename__ = "segments"
    __table_args__ = (
        CheckConstraint("status IN ('interim', 'final')", name="segments_status"),
        Index("segments_by_start", "tenant", "session_id", "start_s"),
        Index("segments_by_meeting", "tenant", "meeting_id", postgresql_where=sql("meeting_id IS NOT NULL")),
    )

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    segment_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    start_s: Mapped[float] = mapped_column(Double)
    end_s: Mapped[float] = mapped_column(Double)
    text: Mapped[str] = mapped_column(Text)
    # [[word, start, end, probability]], a labelled word with its speaker fifth
    words: Mapped[list] = mapped_column(JSONB, server_default=sql("'[]'::jsonb"))
    speaker: Mapped[str | None] = mapped_column(Text)
    speaker_source: Mapped[str | None] = mapped_column(Text)  # "bot" (the bot said it), "audio" (diarization)
    meeting_id: Mapped[str | None] = mapped_column(Text)  # the meeting the session is a track of
    track_start: Mapped[float] = mapped_column(Double, server_default=sql("0"))  # wall time of the track's start
    language: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    seq_first: Mapped[int] = mapped_column(BigInteger)
    seq_last: Mapped[int] = mapped_column(BigInteger)
    worker_id: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=sql("now()"))
