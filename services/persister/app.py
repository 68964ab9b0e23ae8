"""The persister's asyncio shell: JetStream batches in, one Postgres transaction each, acks only after commit.

Nothing is acked before it is committed, so a crash, a stop or a Postgres outage loses nothing: the
consumer redelivers, and the upserts make the repeat harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, set_span_in_context
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from jetscribe.services.persister.core import BatchWrite, Delivered, Unstorable, check, dropped_event, plan_batch
from jetscribe.services.persister.migrate import SchemaBehind, check_schema
from jetscribe.services.persister.store import is_message_fault, open_engine, write_batch
from jetscribe.shared import discovery, subjects, telemetry, wire
from jetscribe.shared.activity import PersisterActivity
from jetscribe.shared.clock import system_clock
from jetscribe.shared.config import PersisterConfig, StreamSettings
from jetscribe.shared.errors import CodedError
from jetscribe.shared.health import Readiness
from jetscribe.shared.jetstream import JetStreamAPI, JetStreamAPIError
from jetscribe.shared.metrics import (
    DB_OPERATION,
    DB_SYSTEM,
    DB_TABLE,
    ERROR_TYPE,
    GROUP,
    STATUS,
    STREAM,
    SYSTEM,
    TENANT,
    PersisterMetrics,
)
from jetscribe.shared.retry import Stopped, backoff_delay, retry, stopped_within
from jetscribe.shared.streams import connect, ensure_streams

SERVICE = "persister"
FETCH_WAIT_S = 0.5  # an idle fetch returns this often, so a stop is noticed quickly
ACK_WAIT_S = 60.0
# The server announces a new leader of the persister's consumer here (a cluster node stopped or lost).
CONSUMER_LEADER_ELECTED = (
    f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{subjects.TRANSCRIPTS_STREAM}.{subjects.PERSISTER_CONSUMER}"
)

log = logging.getLogger(__name__)
_DATABASE_ERRORS = (SQLAlchemyError, psycopg.Error, OSError)
_CONSUMED = {SYSTEM: "nats", STREAM: subjects.TRANSCRIPTS_STREAM, GROUP: subjects.PERSISTER_CONSUMER}
_WRITE = {DB_SYSTEM: "postgresql", DB_OPERATION: "write_batch"}


def consumer_config(config: PersisterConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.PERSISTER_CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_ack_pending=max(1000, 2 * config.batch_size),
        filter_subjects=[subjects.TRANSCRIPTS_ALL, subjects.SESSION_EVENTS_ALL],
    )


class RefusedByDatabase(Unstorable):
    """Postgres refuses the rows of a message itself (bad data, a violated constraint): retrying cannot help."""

    code = "refused_by_database"


class Persister:
    """Moves one fetched batch into Postgres: drop what can't be stored, write the rest, then ack."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        engine: AsyncEngine,
        config: PersisterConfig,
        stop: asyncio.Event,
        tel: telemetry.Telemetry | None = None,
        activity: PersisterActivity | None = None,
    ):
        self.nc, self.js, self.engine, self.config, self.stop = nc, js, engine, config, stop
        self.activity = activity or PersisterActivity(system_clock().monotonic, time.time)  # micro-service stats
        self.tracer = tel.tracer if tel is not None else trace.get_tracer(f"jetscribe.{SERVICE}")
        self.metrics = PersisterMetrics(
            tel.meter if tel is not None else otel_metrics.get_meter(f"jetscribe.{SERVICE}")
        )
        self.readiness = tel.readiness if tel is not None else Readiness(SERVICE)
        # Set when an ack may not have reached the server; `run` then has the consumer redeliver at once.
        self.acks_in_doubt = False

    async def handle(self, msgs: list[Msg]) -> None:
        self.metrics.consumed.add(len(msgs), _CONSUMED)
        self.activity.fetched([msg.metadata.timestamp.timestamp() for msg in msgs], _pending_after(msgs))
        try:
            await self._handle(msgs)
        finally:
            self.activity.handled()

    async def _handle(self, msgs: list[Msg]) -> None:
        accepted: list[tuple[Msg, Delivered]] = []
        for msg in msgs:
            try:
                message = wire.decode(msg.data, wire.TranscriptMessage)
                problem = check(msg.subject, message)
            except wire.WireError as exc:
                problem = exc
            if problem is not None:
                await self.drop_unstorable(msg, problem)
            else:
                accepted.append((msg, Delivered(message, msg.metadata.timestamp.timestamp())))
        if accepted:
            await self.store(accepted)

    async def store(self, items: list[tuple[Msg, Delivered]]) -> bool:
        """Write and ack `items`; False if stopped before they were written (they stay unacked)."""
        try:
            if not await self.write(items):
                return False
        except RefusedByDatabase as exc:
            if len(items) == 1:  # retrying this very message would block the stream behind it forever
                await self.drop_unstorable(items[0][0], exc)
                return True
            # Some message in the batch is refused: write them one by one to find it and keep the rest.
            for item in items:
                if not await self.store([item]):
                    return False
            return True
        await self.ack([msg for msg, _ in items])
        return True

    async def write(self, items: list[tuple[Msg, Delivered]]) -> bool:
        """Write `items` in one transaction, retrying while the database is unavailable; False if stopped first."""
        batch = plan_batch(delivered for _, delivered in items)
        attempt = 0
        while True:
            started, started_ns = time.perf_counter(), time.time_ns()
            try:
                with self.tracer.start_as_current_span("persister.write_batch") as span:
                    span.set_attribute("jetscribe.messages", len(items))
                    span.set_attribute("jetscribe.segments", len(batch.segments))
                    span.set_attribute("jetscribe.session_events", len(batch.session_events))
                    span.set_attribute("jetscribe.attempt", attempt)
                    await write_batch(self.engine, batch)
                self.metrics.write_duration.record(time.perf_counter() - started, _WRITE)
                rows = len(batch.segments) + len(batch.session_touches) + len(batch.session_events)
                self.activity.written(len(items), rows, time.perf_counter() - started)
                self._written(items, batch, started_ns, span.get_span_context())
                return True
            except _DATABASE_ERRORS as exc:
                error = {ERROR_TYPE: type(getattr(exc, "orig", None) or exc).__name__}
                self.metrics.write_duration.record(time.perf_counter() - started, _WRITE | error)
                if _may_be_the_schema(exc):  # a schema stepped back under us fails every write: stop, don't retry
                    await self.check_schema()
                if is_message_fault(exc):
                    raise RefusedByDatabase(message=_first_line(getattr(exc, "orig", None) or exc)) from exc
                self.readiness.down("database", _first_line(exc))
                self.metrics.retries.add(1, error)
                self.activity.retried()
                delay = backoff_delay(attempt, max_s=self.config.retry_max_s)
                attempt += 1
                log.warning(
                    "writing %d messages failed (%s); retry %d in %.1f s%s",
                    len(items),
                    _first_line(exc),
                    attempt,
                    delay,
                    _hint(exc),
                )
            if await stopped_within(self.stop, delay):
                log.warning("stopping with %d messages unwritten; they stay unacked for redelivery", len(items))
                return False

    async def check_schema(self) -> None:
        """Raise SchemaBehind if the database's schema is older than this code's; a database that does not
        answer is left to the caller's retry."""
        try:
            async with self.engine.connect() as conn:
                await check_schema(conn)
        except _DATABASE_ERRORS:
            pass

    def _written(self, items: list[tuple[Msg, Delivered]], batch: BatchWrite, started_ns: int, span: SpanContext):
        """Count a committed batch, and give each message that came with a trace context its own span in that
        trace (the transcriber's publish), linked to the batch's write."""
        self.readiness.up("database")
        self.metrics.batch_size.record(len(items))
        rows: Counter[tuple[str, str, str]] = Counter()
        for row in batch.segments:
            rows["segments", row["tenant"], row["status"]] += 1
        for row in (*batch.session_touches, *batch.session_events):
            rows["sessions", row["tenant"], ""] += 1
        for (table, tenant, status), n in rows.items():
            self.metrics.rows.add(n, {DB_TABLE: table, TENANT: tenant} | ({STATUS: status} if status else {}))
        for msg, delivered in items:
            parent = telemetry.span_context_of(msg.headers)
            if parent is None:
                continue
            message = delivered.message
            self.tracer.start_span(
                "persister.store",
                context=set_span_in_context(trace.NonRecordingSpan(parent)),
                kind=SpanKind.CONSUMER,
                links=[Link(span)] if span.is_valid else [],
                start_time=started_ns,
                attributes={"jetscribe.tenant": message.tenant, "jetscribe.session": message.session_id},
            ).end()

    async def ack(self, msgs: list[Msg]) -> None:
        """Ack committed messages. A flush proves the server read the acks, not that it kept them: a nats-server
        killed a moment later may come back with them unacked, which `run` repairs after every reconnect."""
        try:
            for msg in msgs:
                await msg.ack()
            await self.nc.flush(timeout=5)
        except (TimeoutError, nats.errors.Error) as exc:
            # Committed but maybe not acked: the redelivery is an idempotent repeat.
            self.acks_in_doubt = True
            log.warning("acking %d messages failed (%s); they will be redelivered", len(msgs), exc)

    async def drop_unstorable(self, msg: Msg, problem: CodedError) -> None:
        """Report a message that can never be stored (Unstorable, or a WireError) and terminate it."""
        event = dropped_event(msg.subject, problem, time.time())
        with telemetry.log_context(event.tenant, event.session_id):
            log.error("dropping message on %s: %s: %s", msg.subject, event.code, event.message)
        tenant = event.tenant if subjects.is_valid_token(event.tenant) else subjects.UNKNOWN_TENANT
        self.metrics.dropped.add(1, {TENANT: tenant, ERROR_TYPE: event.code})  # a bounded label
        self.activity.poison(event.code)
        try:
            await self.js.publish(subjects.errors(SERVICE, event.tenant), wire.encode(event), timeout=2)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not publish the error event (%s)", exc)
        try:
            await msg.term()  # never redelivered: it would fail the same way every time
        except nats.errors.Error as exc:
            log.warning("could not terminate the message on %s (%s)", msg.subject, exc)


async def run(
    settings: StreamSettings,
    config: PersisterConfig,
    stop: asyncio.Event | None = None,
    tel: telemetry.Telemetry | None = None,
) -> None:
    """Persist the TRANSCRIPTS stream until `stop` is set; the batch in hand is finished first."""
    async with telemetry.serving(SERVICE, tel, needs=("streams", "consumer", "database")) as tel:
        await _persist(settings, config, stop or asyncio.Event(), tel)


async def _persist(
    settings: StreamSettings, config: PersisterConfig, stop: asyncio.Event, tel: telemetry.Telemetry
) -> None:
    engine = open_engine(config.database_url, config.postgres)
    nc = await connect(settings, SERVICE)
    activity = PersisterActivity(system_clock().monotonic, time.time)
    registration = await discovery.register(
        nc,
        SERVICE,
        description="jetscribe persister: the TRANSCRIPTS stream into PostgreSQL, idempotently",
        readiness=tel.readiness,
        stats=activity.report,
        metrics_port=tel.metrics_port,
    )
    tasks = [asyncio.create_task(_watch_database(engine, tel.readiness, stop))]
    try:
        js = nc.jetstream()
        sub = await _subscribe(js, settings, config)
        tel.readiness.up("streams")
        tel.readiness.up("consumer")
        await _redeliver_unacked(nc)
        persister = Persister(nc, js, engine, config, stop, tel, activity)

        async def leader_moved(_msg: Msg) -> None:
            # On a cluster, acks the consumer's old leader took may be lost with it: they would wait out ack_wait
            # (60 s). Reset to the ack floor instead, as after a reconnect; the redelivery is an idempotent repeat.
            persister.acks_in_doubt = True

        await nc.subscribe(CONSUMER_LEADER_ELECTED, cb=leader_moved)
        lag = [(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER, None)]
        tasks.append(asyncio.create_task(persister.metrics.lag.poll(js, lambda: lag, stop)))
        reconnects = nc.stats["reconnects"]
        log.info(
            "persisting %s to Postgres in batches of up to %d; metrics on %s",
            subjects.TRANSCRIPTS_STREAM,
            config.batch_size,
            tel.endpoint_url,
        )
        while not stop.is_set():
            if tasks[0].done():
                tasks[0].result()  # the database watch found the schema behind: SchemaBehind
            if (persister.acks_in_doubt or nc.stats["reconnects"] != reconnects) and nc.is_connected:
                # A NATS restart can come back holding messages it delivered to us as unacked: acks sent just
                # before a kill (lost in the socket, or not yet in the server's consumer state on disk) and
                # batches it sent as it died. Nobody holds those, yet they would wait out ack_wait (60 s).
                seen = nc.stats["reconnects"]
                if await _redeliver_unacked_after_reconnect(nc):
                    reconnects, persister.acks_in_doubt = seen, False
            try:
                msgs = await sub.fetch(config.batch_size, timeout=FETCH_WAIT_S)
            except TimeoutError:
                continue
            except nats.js.errors.APIError as exc:
                # The consumer or stream is gone (deleted by hand, or a fresh NATS store): declare them again.
                # Or, on a cluster, the consumer's leader moved: acks sent to the old one may be lost with it.
                log.warning("fetch refused (%s); subscribing again", exc)
                sub = await _resubscribe(sub, js, settings, config, stop)
                persister.acks_in_doubt = True
                continue
            except nats.errors.Error as exc:
                # While NATS is away the client reconnects by itself; wait and fetch again.
                log.warning("fetch failed (%s); retrying", exc)
                await stopped_within(stop, FETCH_WAIT_S)
                continue
            await persister.handle(msgs)
    except SchemaBehind as exc:
        await _report_schema_behind(nc, exc)
        raise
    finally:
        await _cancel(tasks)
        await registration.stop()
        # Not drain(): the pull subscription's queue is read only by fetch, so drain would wait it out.
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await nc.flush(timeout=2)
        await nc.close()
        await engine.dispose()
    log.info("stopped")


async def _cancel(tasks: list[asyncio.Task]) -> None:
    """Cancel the background tasks and wait for them, cancelling again any still running: Python 3.11's wait_for
    drops a cancel that arrives as its awaited result does (a NATS reply, in the lag poll), and a loop that only
    ends on `stop` would then run on after an error ended the service."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), SchemaBehind):
            log.warning("background task ended with %r", task.exception())


async def _watch_database(engine: AsyncEngine, readiness: Readiness, stop: asyncio.Event) -> None:
    """Ready once PostgreSQL answers with the schema this code needs (else SchemaBehind); afterwards the writes
    themselves say whether it is up."""
    attempt = 0
    while not stop.is_set():
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await check_schema(conn)
        except _DATABASE_ERRORS as exc:
            readiness.down("database", _first_line(exc))
            await stopped_within(stop, backoff_delay(attempt, max_s=5.0))
            attempt += 1
            continue
        readiness.up("database")
        return


async def _report_schema_behind(nc: Client, exc: SchemaBehind) -> None:
    """Say why the persister stops: logged, and an ErrorEvent on errors.persister._ (nothing was acked)."""
    log.error("stopping: %s", exc)
    event = wire.ErrorEvent(tenant="_", session_id=None, code=exc.code, message=str(exc), at=time.time())
    try:
        await nc.publish(subjects.errors(SERVICE, ""), wire.encode(event))
        await nc.flush(timeout=2)
    except (TimeoutError, nats.errors.Error) as exc2:
        log.warning("could not publish the error event (%s)", exc2)


def _pending_after(msgs: list[Msg]) -> int:
    """What the consumer still had for us after this batch (JetStream says it in each message's metadata)."""
    return msgs[-1].metadata.num_pending if msgs else 0


async def _redeliver_unacked(nc) -> bool:
    """What a killed predecessor had fetched but not acked comes back now, not after ack_wait (60 s).
    Writes are idempotent upserts, so a message another persister also holds changes nothing twice."""
    try:
        await JetStreamAPI(nc).reset(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
    except JetStreamAPIError as exc:
        log.warning("could not reset the consumer to its ack floor: %s", exc)
        return False
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        # A busy cluster (a leader election, a loaded host) may not answer in time: best effort, as above; what a
        # predecessor held comes back after ack_wait instead of now.
        log.warning("could not reset the consumer to its ack floor: no reply from JetStream (%s)", type(exc).__name__)
        return False
    return True


async def _redeliver_unacked_after_reconnect(nc) -> bool:
    """`_redeliver_unacked` between batches (none is in hand); False if the server cannot do it yet (JetStream
    still recovering after a restart): the loop tries again before its next fetch."""
    try:
        done = await _redeliver_unacked(nc)
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("could not reset the consumer to its ack floor (%s); trying again", exc)
        return False
    if done:
        log.info("reset the consumer to its ack floor: what NATS still counts as unacked is redelivered now")
    return done


async def _subscribe(js: JetStreamContext, settings: StreamSettings, config: PersisterConfig):
    await ensure_streams(js, settings)
    return await js.pull_subscribe(
        "",
        durable=subjects.PERSISTER_CONSUMER,
        stream=subjects.TRANSCRIPTS_STREAM,
        config=consumer_config(config),
    )


async def _resubscribe(
    sub, js: JetStreamContext, settings: StreamSettings, config: PersisterConfig, stop: asyncio.Event
):
    try:
        await sub.unsubscribe()
    except nats.errors.Error:
        pass
    try:
        return await retry(
            lambda: _subscribe(js, settings, config),
            what="subscribing",
            stop=stop,
            retry_on=(nats.errors.Error, asyncio.TimeoutError),
            first_s=FETCH_WAIT_S * 2,
            logger=log,
        )
    except Stopped:
        return sub


def _may_be_the_schema(exc: BaseException) -> bool:
    """A write refused for its SQL (an unknown column or table: class 42) or its rows (a constraint an older
    schema has): worth asking the schema's revision. Not an outage: the database would not answer that either."""
    cause = getattr(exc, "orig", None) or exc
    return is_message_fault(exc) or (getattr(cause, "sqlstate", None) or "").startswith("42")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _hint(exc: BaseException) -> str:
    if isinstance(getattr(exc, "orig", None), psycopg.errors.UndefinedTable):
        return " (is the schema there? run `jetscribe db upgrade`)"
    return ""


def main() -> int:
    """`python -m jetscribe.services.persister`: run until SIGTERM or SIGINT, then exit 0."""
    return telemetry.serve(
        SERVICE, lambda stop, tel: run(StreamSettings.from_env(), PersisterConfig.from_env(), stop, tel)
    )
