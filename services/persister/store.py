"""Postgres reads and writes: idempotent upserts of a planned batch, and the queries the CLI shows."""

from __future__ import annotations

import asyncio

import psycopg
from sqlalchemy import and_, case, event, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from jetscribe.services.persister.core import CLOSED, BatchWrite, SessionKey
from jetscribe.services.persister.tables import SegmentRow, SessionRow
from jetscribe.shared.config import PostgresClient, read_secret

_SESSION_KEY = ["tenant", "session_id"]
_SEGMENT_KEY = ["tenant", "session_id", "segment_id"]


def sqlalchemy_url(database_url: str) -> str:
    """`database_url` with the psycopg 3 driver named, so plain postgres:// URLs work too."""
    url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def open_engine(database_url: str, client: PostgresClient | None = None, connect_timeout_s: int = 5) -> AsyncEngine:
    """An async engine whose pool survives a Postgres restart (each checkout is pinged first); `client`: the
    password and TLS to connect with (None: JETSCRIBE_PG_* of the environment)."""
    client = client or PostgresClient()
    engine = create_async_engine(
        sqlalchemy_url(database_url),
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout_s, **client.connect_args()},  # a bad file fails here
    )
    if client.password_file:
        password_file = client.password_file

        @event.listens_for(engine.sync_engine, "do_connect")
        def _read_password(dialect, connection_record, cargs, cparams) -> None:
            # At each connect, not once: a rotated password is taken at the next sign-in, without a restart.
            cparams["password"] = read_secret(password_file, "JETSCRIBE_PG_PASSWORD_FILE")

    return engine


def is_message_fault(exc: BaseException) -> bool:
    """Whether a database error comes from the rows written (retrying cannot help), not from the database."""
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, (psycopg.DataError, psycopg.IntegrityError)):
        return True
    return (getattr(cause, "sqlstate", None) or "").startswith("54")  # program limit exceeded, e.g. a huge row


async def write_batch(engine: AsyncEngine, batch: BatchWrite) -> None:
    """Apply one planned batch in one transaction; writing the same batch again changes nothing."""
    async with engine.begin() as conn:
        if batch.session_touches:
            await conn.execute(_touch_sessions(), batch.session_touches)
        for row in batch.session_events:
            await conn.execute(_upsert_session(), row)  # one by one: a batch may hold several of a session
        if batch.segments:
            await conn.execute(_upsert_segments(), batch.segments)
        if batch.recount:
            await conn.execute(_recount_segments(batch.recount))


def _session_common(stmt) -> dict:
    new, old = stmt.excluded, SessionRow
    return {
        "created_at": func.least(old.created_at, new.created_at),
        "last_activity": func.greatest(old.last_activity, new.last_activity),
    }


def _touch_sessions():
    # A segment may arrive before its session's `started`: create the row as active, else only move times.
    stmt = insert(SessionRow)
    new, old = stmt.excluded, SessionRow
    return stmt.on_conflict_do_update(
        index_elements=_SESSION_KEY,
        set_=_session_common(stmt),
        where=or_(new.last_activity > old.last_activity, new.created_at < old.created_at),
    )


def _upsert_session():
    stmt = insert(SessionRow)
    new, old = stmt.excluded, SessionRow.__table__.c
    is_open = old.status == "active"

    def state(name):
        # The SQL twin of core.next_status: an active session takes the event's state; a closed one keeps
        # the state it first closed with, so a late start, a replay or a second end changes nothing.
        return case((is_open, new[name]), else_=old[name])

    def detail(name):
        # The event's value while the session is active; once closed, a late event only fills a gap.
        return case((is_open, func.coalesce(new[name], old[name])), else_=func.coalesce(old[name], new[name]))

    changes = _session_common(stmt)
    totals = ("chunks_received", "audio_seconds", "words_dropped", "empty_finals")
    changes |= {name: state(name) for name in ("status", "reason", "ended_at", *totals)}
    changes |= {name: detail(name) for name in ("language", "model", "worker_id")}
    return stmt.on_conflict_do_update(index_elements=_SESSION_KEY, set_=changes)


def _upsert_segments():
    stmt = insert(SegmentRow)
    new, old = stmt.excluded, SegmentRow
    replaced = [c.name for c in SegmentRow.__table__.columns if c.name not in _SEGMENT_KEY and c.name != "updated_at"]
    # The SQL twin of core.replaces: final beats interim, then higher revision; a repeat is a no-op.
    wins = or_(
        and_(new.status == "final", old.status == "interim"),
        and_(new.status == old.status, new.revision > old.revision),
    )
    return stmt.on_conflict_do_update(
        index_elements=_SEGMENT_KEY,
        set_={name: new[name] for name in replaced} | {"updated_at": func.now()},
        where=wins,
    )


def _recount_segments(sessions: list[SessionKey]):
    finals = (
        select(func.count())
        .where(
            SegmentRow.tenant == SessionRow.tenant,
            SegmentRow.session_id == SessionRow.session_id,
            SegmentRow.status == "final",
        )
        .scalar_subquery()
    )
    return (
        update(SessionRow)
        .where(tuple_(SessionRow.tenant, SessionRow.session_id).in_(sessions))
        .values(segment_count=finals)
    )


async def list_sessions(engine: AsyncEngine, tenant: str | None = None) -> list[SessionRow]:
    """Sessions, oldest first; only `tenant`'s when given."""
    query = select(SessionRow).order_by(SessionRow.created_at, SessionRow.tenant, SessionRow.session_id)
    if tenant is not None:
        query = query.where(SessionRow.tenant == tenant)
    async with AsyncSession(engine) as session:
        return list(await session.scalars(query))


async def find_session(engine: AsyncEngine, tenant: str, session_id: str) -> SessionRow | None:
    """The session's row, or None if PostgreSQL has none."""
    query = select(SessionRow).where(SessionRow.tenant == tenant, SessionRow.session_id == session_id)
    async with AsyncSession(engine) as session:
        return await session.scalar(query)


async def final_segments(engine: AsyncEngine, tenant: str, session_id: str) -> list[SegmentRow]:
    """A session's final segments in the order they were spoken: its transcript."""
    query = (
        select(SegmentRow)
        .where(
            SegmentRow.tenant == tenant,
            SegmentRow.session_id == session_id,
            SegmentRow.status == "final",
        )
        .order_by(SegmentRow.start_s, SegmentRow.segment_id)
    )
    async with AsyncSession(engine) as session:
        return list(await session.scalars(query))


async def meeting_segments(engine: AsyncEngine, tenant: str, meeting_id: str) -> list[SegmentRow]:
    """A meeting's final segments, every track's, merged in the order they were spoken: by wall time
    (the track's start plus the segment's start), then track and segment id for a stable order."""
    query = (
        select(SegmentRow)
        .where(SegmentRow.tenant == tenant, SegmentRow.meeting_id == meeting_id, SegmentRow.status == "final")
        .order_by(SegmentRow.track_start + SegmentRow.start_s, SegmentRow.session_id, SegmentRow.segment_id)
    )
    async with AsyncSession(engine) as session:
        return list(await session.scalars(query))


async def wait_until_ended(engine: AsyncEngine, tenant: str, session_id: str, timeout_s: float = 60.0) -> SessionRow:
    """Poll until the session's end is stored, `ended` or `rejected` (its finals are in by then); raise TimeoutError."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    query = select(SessionRow).where(SessionRow.tenant == tenant, SessionRow.session_id == session_id)
    while True:
        async with AsyncSession(engine) as session:
            row = await session.scalar(query)
        if row is not None and row.status in CLOSED:
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(
                f"session {tenant}/{session_id} did not end (ended or rejected) in PostgreSQL within {timeout_s:.0f} s"
            )
        await asyncio.sleep(0.1)
