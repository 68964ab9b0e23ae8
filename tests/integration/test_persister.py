"""The persister against a real nats-server and a real Postgres, run in-process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
import uuid

import msgspec
import nats
import nats.js.errors
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool, select, text
from sqlalchemy.exc import IntegrityError

from jetscribe.cli import main as cli
from jetscribe.devstack.servers import NatsServer, PostgresServer
from jetscribe.services.persister import store
from jetscribe.services.persister.app import Persister, run
from jetscribe.services.persister.core import Delivered, next_status, plan_batch
from jetscribe.services.persister.migrate import current, downgrade, upgrade
from jetscribe.services.persister.store import final_segments, list_sessions, open_engine, sqlalchemy_url, write_batch
from jetscribe.services.persister.tables import Base, SegmentRow, SessionRow
from jetscribe.shared import subjects, wire
from jetscribe.shared.config import PersisterConfig, StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_streams
from jetscribe.shared.wire import ErrorEvent, Segment, SessionEvent, Word
from tests.integration.running import persister_process

T0 = 1_700_000_000.0


@contextlib.asynccontextmanager
async def running_persister(nats_url: str, js, database_url: str, batch_size: int = 100):
    """The persister on its own task, subscribed; on exit it is stopped and must return promptly."""
    settings = StreamSettings(nats_url=nats_url)
    config = PersisterConfig(database_url=database_url, batch_size=batch_size, retry_max_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, config, stop))
    try:
        await eventually(lambda: consumer_exists(js, task))
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def tenant() -> str:
    # The NATS server and its TRANSCRIPTS stream are shared by the session: each test writes its own tenant.
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def schema(database_url):
    await asyncio.to_thread(upgrade, database_url)
    return database_url


@pytest.fixture
async def engine(schema):
    engine = open_engine(schema)
    yield engine
    await engine.dispose()


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings(nats_url=nats_url))  # so a test may publish before the persister runs
    yield js
    await nc.close()


def segment(tenant, session, segment_id, revision, status, text_=None, start=None, **kw) -> Segment:
    start = float(segment_id) if start is None else start
    return Segment(
        tenant=tenant,
        session_id=session,
        segment_id=segment_id,
        revision=revision,
        status=status,
        start=start,
        end=start + 0.9,
        text=text_ if text_ is not None else f"{status} {segment_id}.{revision}",
        words=[Word("w", start, start + 0.5, 0.75)],
        model="base",
        worker_id="w1",
        published_at=T0 + segment_id + revision / 10 + (0.05 if status == "final" else 0),
        **kw,
    )


def event(tenant, session, kind, at, **kw) -> SessionEvent:
    return SessionEvent(tenant=tenant, session_id=session, event=kind, at=at, **kw)


async def publish(js, *messages) -> None:
    for message in messages:
        if isinstance(message, Segment):
            subject = subjects.transcript(message.tenant, message.session_id)
        else:
            subject = subjects.session_event(message.tenant, message.session_id, message.event)
        await js.publish(subject, wire.encode(message))


async def eventually(probe, timeout: float = 10.0):
    """Poll the async `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {probe.__name__}")
        await asyncio.sleep(0.05)


async def consumer_exists(js, task) -> bool:
    if task.done():
        task.result()  # the persister failed to start: show why
    try:
        await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def drained(js) -> bool:
    """Everything in TRANSCRIPTS was delivered to the persister and acked."""
    info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def rows(engine, table, tenant, session):
    async with engine.connect() as conn:
        result = await conn.execute(
            select(table)
            .where(table.tenant == tenant, table.session_id == session)
            .order_by(*table.__table__.primary_key.columns)
        )
        return [dict(r) for r in result.mappings()]


async def session_row(engine, tenant, session):
    found = await rows(engine, SessionRow, tenant, session)
    return found[0] if found else None


def lifecycle(tenant, session="s1"):
    """Interims, finals, revisions and repeats of three segments between a start and an end."""
    return [
        event(tenant, session, "started", T0, language="en", model="base", worker_id="w1"),
        segment(tenant, session, 0, 0, "interim"),
        segment(tenant, session, 0, 1, "interim"),
        segment(tenant, session, 0, 1, "interim"),  # replayed duplicate
        segment(tenant, session, 0, 0, "final", "hello there"),
        segment(tenant, session, 0, 2, "interim", "late interim"),  # after its final: ignored
        segment(tenant, session, 1, 0, "interim"),
        segment(tenant, session, 1, 0, "final", "general kenobi"),
        segment(tenant, session, 1, 0, "final", "general kenobi"),  # a final arriving twice
        segment(tenant, session, 2, 0, "final", "you are a bold one"),
        segment(tenant, session, 2, 1, "final", "you are a bold one!"),  # revised final
        segment(tenant, session, 2, 0, "final", "stale"),  # older revision: ignored
        segment(tenant, session, 3, 4, "interim", "still talking"),
        segment(tenant, session, 3, 2, "interim", "older"),  # lower revision: ignored
        event(tenant, session, "ended", T0 + 60, chunks_received=120, audio_seconds=59.5, segments=3),
    ]


@pytest.mark.parametrize("batch_size", [1, 100])  # 1: every rule meets the database; 100: the in-batch plan
async def test_segments_and_lifecycle_end_in_the_right_rows(nats_url, engine, schema, js, tenant, batch_size):
    async with running_persister(nats_url, js, schema, batch_size):
        await publish(js, *lifecycle(tenant))

        async def ended_with_counts():
            row = await session_row(engine, tenant, "s1")
            return row if row and row["status"] == "ended" and row["segment_count"] == 3 else None

        session = await eventually(ended_with_counts)
        await eventually(lambda: drained(js))

    segments = await rows(engine, SegmentRow, tenant, "s1")
    assert [(s["segment_id"], s["status"], s["revision"], s["text"]) for s in segments] == [
        (0, "final", 0, "hello there"),
        (1, "final", 0, "general kenobi"),
        (2, "final", 1, "you are a bold one!"),
        (3, "interim", 4, "still talking"),
    ]
    assert segments[0]["words"] == [["w", 0.0, 0.5, 0.75]]
    assert segments[0]["model"] == "base" and segments[0]["speaker"] is None
    assert session["language"] == "en" and session["model"] == "base" and session["worker_id"] == "w1"
    assert session["created_at"].timestamp() == T0
    assert session["ended_at"].timestamp() == T0 + 60
    assert (session["chunks_received"], session["audio_seconds"]) == (120, 59.5)
    assert session["last_activity"].timestamp() == T0 + 60

    # What the CLI shows.
    transcript = await final_segments(engine, tenant, "s1")
    assert [s.text for s in transcript] == ["hello there", "general kenobi", "you are a bold one!"]
    assert [(s.tenant, s.session_id, s.status) for s in await list_sessions(engine, tenant)] == [
        (tenant, "s1", "ended")
    ]


async def test_replaying_everything_changes_nothing(nats_url, engine, schema, js, tenant):
    messages = lifecycle(tenant)
    async with running_persister(nats_url, js, schema):
        await publish(js, *messages)
        await eventually(lambda: drained(js))
        segments_before = await rows(engine, SegmentRow, tenant, "s1")
        session_before = await session_row(engine, tenant, "s1")
        assert session_before["segment_count"] == 3

        await publish(js, *messages, *reversed(messages))
        await eventually(lambda: drained(js))

    # updated_at included: no row was even rewritten.
    assert await rows(engine, SegmentRow, tenant, "s1") == segments_before
    assert await session_row(engine, tenant, "s1") == session_before


async def test_segment_before_its_session_start_creates_an_active_session(nats_url, engine, schema, js, tenant):
    async with running_persister(nats_url, js, schema):
        await publish(js, segment(tenant, "s2", 0, 0, "final", "first words"))
        created = await eventually(lambda: session_row(engine, tenant, "s2"))
        assert (created["status"], created["segment_count"]) == ("active", 1)
        assert created["created_at"].timestamp() == pytest.approx(T0 + 0.05)

        # The start arrives late: it dates the session back and never reopens or resets it.
        await publish(js, event(tenant, "s2", "started", T0 - 5, language="de"))
        await publish(js, event(tenant, "s2", "ended", T0 + 30, chunks_received=7, audio_seconds=6.0))
        await publish(js, event(tenant, "s2", "started", T0 - 5, language="de"))  # redelivered start

        async def ended():
            row = await session_row(engine, tenant, "s2")
            return row if row["status"] == "ended" else None

        await eventually(ended)
        await eventually(lambda: drained(js))

    row = await session_row(engine, tenant, "s2")
    assert row["status"] == "ended"
    assert row["created_at"].timestamp() == T0 - 5
    assert row["language"] == "de"
    assert row["segment_count"] == 1


async def test_bad_messages_are_reported_and_do_not_block_the_stream(nats_url, engine, schema, js, tenant):
    errors = await js._nc.subscribe(subjects.errors("persister", tenant))
    async with running_persister(nats_url, js, schema):
        await js.publish(subjects.transcript(tenant, "s3"), b"\xc1 garbage")
        await js.publish(subjects.transcript(tenant, "s3"), msgspec.msgpack.encode({"type": "segment", "v": 1}))
        await publish(js, segment(tenant, "s3", 0, 0, "final", "nul \x00 byte"))
        # A message on its own subject must not write into another tenant's rows.
        await js.publish(subjects.transcript(tenant, "s3"), wire.encode(segment("other", "s3", 9, 0, "final")))
        await publish(js, segment(tenant, "s3", 1, 0, "final", "good"))

        await eventually(lambda: session_row(engine, tenant, "s3"))
        reports = [wire.decode((await errors.next_msg(timeout=5)).data, ErrorEvent) for _ in range(4)]
        await eventually(lambda: drained(js))

    assert [r.code for r in reports] == ["not_msgpack", "malformed", "malformed", "subject_mismatch"]
    assert {(r.tenant, r.session_id) for r in reports} == {(tenant, "s3")}
    assert [s["text"] for s in await rows(engine, SegmentRow, tenant, "s3")] == ["good"]
    assert await session_row(engine, "other", "s3") is None


async def test_postgres_outage_loses_nothing(nats_url, js, tenant, tmp_path):
    # This test stops its Postgres, so it runs its own rather than the session's.
    with PostgresServer(tmp_path / "pg", fast=True) as server:
        server.create_database("jetscribe")
        database_url = server.url("jetscribe")
        await asyncio.to_thread(upgrade, database_url)
        engine = open_engine(database_url)
        messages = lifecycle(tenant)
        try:
            async with running_persister(nats_url, js, database_url, batch_size=3):
                await publish(js, *messages[:5])
                await eventually(lambda: rows(engine, SegmentRow, tenant, "s1"))

                await asyncio.to_thread(server.stop)
                await publish(js, *messages[5:])
                await asyncio.sleep(1.5)  # the persister retries meanwhile and must not ack
                info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
                assert info.num_ack_pending + info.num_pending > 0
                await asyncio.to_thread(server.start)

                async def ended():
                    row = await session_row(engine, tenant, "s1")
                    return row if row["status"] == "ended" and row["segment_count"] == 3 else None

                await eventually(ended, timeout=20)
                await eventually(lambda: drained(js))

            texts = [s["text"] for s in await rows(engine, SegmentRow, tenant, "s1")]
            assert texts == ["hello there", "general kenobi", "you are a bold one!", "still talking"]
        finally:
            await engine.dispose()


async def test_persister_waits_for_the_schema(nats_url, database_url, js, tenant):
    """Started before `jetscribe db upgrade`, it retries instead of dropping messages."""
    async with running_persister(nats_url, js, database_url):
        await publish(js, segment(tenant, "s4", 0, 0, "final", "early"))
        await asyncio.sleep(0.7)
        await asyncio.to_thread(upgrade, database_url)
        engine = open_engine(database_url)
        try:
            await eventually(lambda: rows(engine, SegmentRow, tenant, "s4"))
        finally:
            await engine.dispose()


def test_migrations_go_up_and_down(database_url):
    assert current(database_url) is None
    upgrade(database_url)
    upgrade(database_url)  # again: nothing to do
    assert current(database_url) == "0004"
    downgrade(database_url, "base")
    assert current(database_url) is None


def test_the_models_match_the_migrated_schema(database_url):
    upgrade(database_url)
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_migration_0002_down_and_up_keeps_sessions(database_url):
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    columns = lambda: {c["name"] for c in inspect(engine).get_columns("sessions")}  # noqa: E731
    insert_row = (
        "INSERT INTO sessions (tenant, session_id, status, created_at, last_activity{}) "
        "VALUES ('t', '{}', '{}', now(), now(){})"
    )
    try:
        upgrade(database_url, "0001")
        assert "reason" not in columns()
        with engine.begin() as conn:
            conn.execute(text(insert_row.format("", "old", "ended", "")))
            with pytest.raises(IntegrityError), conn.begin_nested():
                conn.execute(text(insert_row.format("", "r0", "rejected", "")))
        upgrade(database_url)
        with engine.begin() as conn:
            conn.execute(text(insert_row.format(", reason", "r1", "rejected", ", 'worker_full'")))
            assert conn.execute(text("SELECT session_id, status, reason FROM sessions ORDER BY session_id")).all() == [
                ("old", "ended", None),
                ("r1", "rejected", "worker_full"),
            ]
        downgrade(database_url, "0001")  # 0001 has no 'rejected': the session is stored as ended, as before
        assert "reason" not in columns()
        with engine.begin() as conn:
            assert conn.execute(text("SELECT session_id, status FROM sessions ORDER BY session_id")).all() == [
                ("old", "ended"),
                ("r1", "ended"),
            ]
        upgrade(database_url)
        assert current(database_url) == "0004"
    finally:
        engine.dispose()


def test_migration_0003_adds_the_guard_totals_and_takes_them_away(database_url):
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    columns = lambda: {c["name"] for c in inspect(engine).get_columns("sessions")}  # noqa: E731
    try:
        upgrade(database_url, "0002")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sessions (tenant, session_id, status, created_at, last_activity) "
                    "VALUES ('t', 'old', 'ended', now(), now())"
                )
            )
        upgrade(database_url)
        with engine.begin() as conn:  # a session stored before 0003 has no drops on record: 0
            assert conn.execute(text("SELECT words_dropped, empty_finals FROM sessions")).all() == [(0, 0)]
        downgrade(database_url, "0002")
        assert not {"words_dropped", "empty_finals"} & columns()
        with engine.begin() as conn:
            assert conn.execute(text("SELECT session_id FROM sessions")).all() == [("old",)]
        upgrade(database_url)
        assert current(database_url) == "0004"
    finally:
        engine.dispose()


async def test_plain_postgres_urls_work(schema):
    engine = open_engine(schema.replace("postgresql+psycopg://", "postgres://"))
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("select count(*) from sessions")) == 0
    finally:
        await engine.dispose()


async def test_a_message_the_database_refuses_is_reported_and_the_rest_of_its_batch_stored(
    nats_url, engine, schema, js, tenant
):
    # A rule the core does not know about stands in for any row Postgres refuses.
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE segments ADD CONSTRAINT refuse_boom CHECK (text <> 'boom')"))
    errors = await js._nc.subscribe(subjects.errors("persister", tenant))
    await publish(js, *[segment(tenant, "s5", i, 0, "final", word) for i, word in enumerate(["a", "boom", "c"])])
    async with running_persister(nats_url, js, schema):
        report = wire.decode((await errors.next_msg(timeout=5)).data, ErrorEvent)
        await eventually(lambda: drained(js))

    assert (report.code, report.session_id) == ("refused_by_database", "s5")
    assert "refuse_boom" in report.message
    assert [s["text"] for s in await rows(engine, SegmentRow, tenant, "s5")] == ["a", "c"]
    assert (await session_row(engine, tenant, "s5"))["segment_count"] == 2


async def test_the_service_exits_0_on_sigterm(nats_url, engine, schema, js, tenant):
    async with persister_process(nats_url, schema) as proc:
        await publish(js, segment(tenant, "s6", 0, 0, "final"))
        await eventually(lambda: rows(engine, SegmentRow, tenant, "s6"))
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()
    assert b"stopped" in stderr


async def test_a_nats_restart_only_pauses_the_persister(engine, schema, tenant, tmp_path):
    # This test restarts its NATS, so it runs its own rather than the session's.
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(
            server.url, **env_connect_options(server.url), max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        js = nc.jetstream()
        try:
            messages = lifecycle(tenant)
            async with running_persister(server.url, js, schema):
                await publish(js, *messages[:5])
                await eventually(lambda: rows(engine, SegmentRow, tenant, "s1"))
                await asyncio.to_thread(server.restart)  # same store: stream and consumer survive
                await eventually(nc_connected(nc))
                await publish(js, *messages[5:])

                async def ended():
                    row = await session_row(engine, tenant, "s1")
                    return row if row["status"] == "ended" and row["segment_count"] == 3 else None

                await eventually(ended, timeout=20)
        finally:
            await nc.close()


async def test_an_ack_a_nats_restart_lost_is_redelivered_at_once(engine, schema, tenant, tmp_path, monkeypatch):
    """A nats-server killed just after the persister acked can come back counting that message unacked (the ack
    died in the socket, or in consumer state not yet on disk), with nobody holding it: without help it waits out
    the consumer's ack_wait (60 s). Here the ack is lost on purpose, then NATS restarts for real."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(
            server.url, **env_connect_options(server.url), max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        js = nc.jetstream()
        ack = Persister.ack
        lost: list[str] = []

        async def ack_lost_once(self, msgs):
            if not lost:
                lost.extend(msg.subject for msg in msgs)  # as if NATS died before keeping these acks
                return
            await ack(self, msgs)

        monkeypatch.setattr(Persister, "ack", ack_lost_once)
        try:
            async with running_persister(server.url, js, schema):
                await publish(js, segment(tenant, "s7", 0, 0, "final", "kept"))
                await eventually(lambda: rows(engine, SegmentRow, tenant, "s7"))
                info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
                assert (lost, info.num_ack_pending) == ([subjects.transcript(tenant, "s7")], 1)
                await asyncio.to_thread(server.restart)  # same store: the unacked message survives it
                await eventually(nc_connected(nc))
                await eventually(lambda: drained(js), timeout=15)  # well inside ack_wait
        finally:
            await nc.close()


def nc_connected(nc):
    async def connected():
        return nc.is_connected

    return connected


async def test_every_session_transition_is_stored(nats_url, engine, schema, js, tenant, monkeypatch, capsys):
    """Events as the transcriber publishes them, replayed and out of order, end in one row per session."""
    ev = lambda session, kind, at, **kw: event(tenant, session, kind, at, model="base", **kw)  # noqa: E731
    async with running_persister(nats_url, js, schema):
        await publish(
            js,
            ev("live", "started", T0, language="en", worker_id="w1"),
            ev("bot", "started", T0, language="en", worker_id="w1"),
            ev(
                "bot", "ended", T0 + 30, chunks_received=30, audio_seconds=29.5, worker_id="w2", words_dropped=4
            ),  # handed over
            ev("idle", "started", T0, worker_id="w1"),
            ev("idle", "ended", T0 + 40, reason="idle_timeout", chunks_received=20, audio_seconds=19.0, worker_id="w1"),
            ev("full", "rejected", T0 + 1, reason="worker_full", chunks_received=1, audio_seconds=0.5, worker_id="w3"),
            ev("buffer", "started", T0, worker_id="w1"),
            ev(
                "buffer", "rejected", T0 + 9, reason="buffer_full", chunks_received=9, audio_seconds=8.0, worker_id="w1"
            ),
            # Late and replayed events: none reopens a session or changes how it ended.
            ev("idle", "started", T0, worker_id="w1"),
            ev("idle", "ended", T0 + 40, reason="idle_timeout", chunks_received=20, audio_seconds=19.0, worker_id="w1"),
            ev("bot", "rejected", T0 + 31, reason="buffer_full", chunks_received=31, worker_id="w4", words_dropped=9),
            ev("full", "started", T0 - 1, language="de", worker_id="w9"),
            ev("full", "ended", T0 + 5, chunks_received=5, worker_id="w9"),
            ev("live", "started", T0, language="en", worker_id="w1"),
        )
        await eventually(lambda: drained(js))

    found = {s.session_id: s for s in await list_sessions(engine, tenant)}
    assert {name: (s.status, s.reason, s.worker_id) for name, s in found.items()} == {
        "live": ("active", None, "w1"),
        "bot": ("ended", None, "w2"),
        "idle": ("ended", "idle_timeout", "w1"),
        "full": ("rejected", "worker_full", "w3"),
        "buffer": ("rejected", "buffer_full", "w1"),
    }
    assert {
        name: (s.ended_at and s.ended_at.timestamp(), s.chunks_received, s.audio_seconds) for name, s in found.items()
    } == {
        "live": (None, 0, 0.0),
        "bot": (T0 + 30, 30, 29.5),
        "idle": (T0 + 40, 20, 19.0),
        "full": (T0 + 1, 1, 0.5),
        "buffer": (T0 + 9, 9, 8.0),
    }
    # The late start dates the rejected session back and fills its unknown language, nothing more.
    assert (found["full"].created_at.timestamp(), found["full"].language) == (T0 - 1, "de")
    assert found["bot"].language == "en"
    assert (found["bot"].words_dropped, found["bot"].empty_finals, found["live"].words_dropped) == (4, 0, 0)

    monkeypatch.setenv("DATABASE_URL", schema)
    assert await asyncio.to_thread(cli.main, ["sessions", "--tenant", tenant]) == 0
    lines = {line.split()[1]: line.split()[2:4] for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines == {
        "live": ["active", "-"],
        "bot": ["ended", "-"],
        "idle": ["ended", "idle_timeout"],
        "full": ["rejected", "worker_full"],
        "buffer": ["rejected", "buffer_full"],
    }


@pytest.mark.parametrize("one_batch", [False, True])
async def test_any_order_of_events_ends_as_core_next_status_says(engine, tenant, one_batch):
    """The store's upsert against its pure twin: every order of a start, an end and a rejection."""
    events = {
        "started": event(tenant, "", "started", T0, language="en", worker_id="w1"),
        "ended": event(
            tenant, "", "ended", T0 + 60, reason="idle_timeout", chunks_received=60, worker_id="w2", words_dropped=7
        ),
        "rejected": event(
            tenant, "", "rejected", T0 + 1, reason="buffer_full", chunks_received=1, worker_id="w3", empty_finals=1
        ),
    }
    orders = [order for n in (1, 2, 3) for order in itertools.permutations(events, n)]
    orders += [("started", "started"), ("ended", "ended"), ("rejected", "started", "rejected")]
    for number, order in enumerate(orders):
        session = f"o{number}"
        delivered = [Delivered(msgspec.structs.replace(events[kind], session_id=session), T0) for kind in order]
        for batch in [delivered] if one_batch else [[d] for d in delivered]:
            await write_batch(engine, plan_batch(batch))
        status = None
        for kind in order:
            status = next_status(status, kind)
        first_closing = next((events[kind] for kind in order if kind != "started"), None)
        row = await session_row(engine, tenant, session)
        assert row["status"] == status, order
        assert row["reason"] == (first_closing and first_closing.reason), order
        assert row["chunks_received"] == (first_closing.chunks_received if first_closing else 0), order
        for total in ("words_dropped", "empty_finals"):  # the guards' totals: the first terminal event's
            assert row[total] == (getattr(first_closing, total) if first_closing else 0), order
        assert row["worker_id"] == (first_closing or events["started"]).worker_id, order
        assert row["created_at"].timestamp() == min(events[kind].at for kind in order), order


def test_migration_0004_adds_the_meeting_columns_and_takes_them_away(database_url):
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    columns = lambda: {c["name"] for c in inspect(engine).get_columns("segments")}  # noqa: E731
    try:
        upgrade(database_url, "0003")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO segments (tenant, session_id, segment_id, revision, status, start_s, end_s, text, "
                    "seq_first, seq_last) VALUES ('t', 'old', 0, 1, 'final', 0, 1, 'hi', 0, 0)"
                )
            )
        upgrade(database_url)
        with engine.begin() as conn:  # a segment stored before 0004 is no meeting's, its speaker nobody's word
            assert conn.execute(text("SELECT speaker_source, meeting_id, track_start FROM segments")).all() == [
                (None, None, 0.0)
            ]
        downgrade(database_url, "0003")
        assert not {"speaker_source", "meeting_id", "track_start"} & columns()
        upgrade(database_url)
        assert current(database_url) == "0004"
    finally:
        engine.dispose()


async def test_speakers_and_a_meetings_tracks_are_stored_and_merged(
    nats_url, js, schema, engine, tenant, monkeypatch, capsys
):
    """Two tracks of one meeting, started 10 s apart: their finals merge by wall time, with their speakers."""

    def track(session, speaker, track_start, segment_id, start, text_):
        return msgspec.structs.replace(
            segment(tenant, session, segment_id, 1, "final", text_, start=start),
            words=[Word(" " + text_, start, start + 0.5, 0.9, speaker)],
            speaker=speaker,
            speaker_source="bot",
            meeting_id="m1",
            track_start=track_start,
        )

    messages = [
        track("m1-ann", "Ann", T0, 0, 1.0, "first"),
        track("m1-ann", "Ann", T0, 1, 12.0, "third"),
        track("m1-bob", "Bob", T0 + 10.0, 0, 0.5, "second"),  # 10.5 s into the meeting
        track("m1-bob", "Bob", T0 + 10.0, 1, 5.0, "fourth"),  # 15 s
        segment(tenant, "other", 0, 1, "final", "not in the meeting"),
    ]
    await publish(js, *messages)
    async with running_persister(nats_url, js, schema):

        async def merged():
            found = await store.meeting_segments(engine, tenant, "m1")
            return found if len(found) == 4 else None

        found = await eventually(merged)
    assert [(r.text, r.speaker, r.speaker_source, r.session_id) for r in found] == [
        ("first", "Ann", "bot", "m1-ann"),
        ("second", "Bob", "bot", "m1-bob"),
        ("third", "Ann", "bot", "m1-ann"),
        ("fourth", "Bob", "bot", "m1-bob"),
    ]
    assert found[1].words == [[" second", 0.5, 1.0, 0.9, "Bob"]] and found[1].track_start == T0 + 10.0
    plain = await rows(engine, SegmentRow, tenant, "other")
    assert plain[0]["words"] == [["w", 0.0, 0.5, 0.75]] and plain[0]["meeting_id"] is None
    # `jetscribe transcript --meeting`: one transcript, timed from the first track's start, with voice tags.
    monkeypatch.setenv("DATABASE_URL", schema)
    assert (
        await asyncio.to_thread(cli.main, ["transcript", "--meeting", "m1", "--tenant", tenant, "--format", "vtt"]) == 0
    )
    vtt = capsys.readouterr().out
    assert (
        "00:00:10.500 --> 00:00:11.400\n<v Bob>second" in vtt and "00:00:01.000 --> 00:00:01.900\n<v Ann>first" in vtt
    )
    assert vtt.index("<v Ann>first") < vtt.index("<v Bob>second") < vtt.index("<v Ann>third")
    assert await asyncio.to_thread(cli.main, ["transcript", "--meeting", "nope", "--tenant", tenant]) == 1


async def test_a_jetstream_that_does_not_answer_the_start_reset_does_not_stop_the_persister(tmp_path, caplog):
    """At start the persister asks JetStream to hand back what a killed predecessor held. A cluster busy electing a
    leader (or a loaded host) may not answer in time: that reset is best effort, so a timeout is logged and the
    persister goes on (the messages come back after ack_wait), rather than exit at start. Here the real nats-server
    is frozen (SIGSTOP) while the request waits."""
    from jetscribe.services.persister.app import _redeliver_unacked

    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(server.url, **env_connect_options(server.url), max_reconnect_attempts=-1)
        try:
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with caplog.at_level(logging.WARNING, logger="jetscribe.services.persister.app"):
                    assert await _redeliver_unacked(nc) is False
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert "no reply from JetStream (TimeoutError)" in caplog.text
        finally:
            await nc.close()
