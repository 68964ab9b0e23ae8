"""The persister's asyncio shell: JetStream batches in, one Postgres transaction each, acks only after commit.

Nothing is acked before it is committed, so a crash, a stop or a Postgres outage loses nothing: the
consumer redelivers, and the upserts make the repeat harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from jetscribe.services.persister.core import Delivered, Unstorable, check, dropped_event, plan_batch
from jetscribe.services.persister.store import is_message_fault, open_engine, write_batch
from jetscribe.shared import subjects, telemetry, wire
from jetscribe.shared.config import PersisterConfig, StreamSettings
from jetscribe.shared.errors import CodedError
from jetscribe.shared.jetstream import JetStreamAPI, JetStreamAPIError
from jetscribe.shared.retry import Stopped, backoff_delay, retry, stopped_within
from jetscribe.shared.streams import connect, ensure_streams

SERVICE = "persister"
FETCH_WAIT_S = 0.5  # an idle fetch returns this often, so a stop is noticed quickly
ACK_WAIT_S = 60.0

log = logging.getLogger(__name__)
_DATABASE_ERRORS = (SQLAlchemyError, psycopg.Error, OSError)


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
        self, nc: Client, js: JetStreamContext, engine: AsyncEngine, config: PersisterConfig, stop: asyncio.Event
    ):
        self.nc, self.js, self.engine, self.config, self.stop = nc, js, engine, config, stop
        self.tracer = trace.get_tracer(f"jetscribe.{SERVICE}")
        # Set when an ack may not have reached the server; `run` then has the consumer redeliver at once.
        self.acks_in_doubt = False

    async def handle(self, msgs: list[Msg]) -> None:
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
            try:
                with self.tracer.start_as_current_span("persister.write_batch") as span:
                    span.set_attribute("jetscribe.messages", len(items))
                    span.set_attribute("jetscribe.segments", len(batch.segments))
                    span.set_attribute("jetscribe.session_events", len(batch.session_events))
                    span.set_attribute("jetscribe.attempt", attempt)
                    await write_batch(self.engine, batch)
                return True
            except _DATABASE_ERRORS as exc:
                if is_message_fault(exc):
                    raise RefusedByDatabase(message=_first_line(getattr(exc, "orig", None) or exc)) from exc
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
        log.error("dropping message on %s: %s: %s", msg.subject, event.code, event.message)
        try:
            await self.js.publish(subjects.errors(SERVICE, event.tenant), wire.encode(event), timeout=2)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not publish the error event (%s)", exc)
        try:
            await msg.term()  # never redelivered: it would fail the same way every time
        except nats.errors.Error as exc:
            log.warning("could not terminate the message on %s (%s)", msg.subject, exc)


async def run(settings: StreamSettings, config: PersisterConfig, stop: asyncio.Event | None = None) -> None:
    """Persist the TRANSCRIPTS stream until `stop` is set; the batch in hand is finished first."""
    stop = stop or asyncio.Event()
    engine = open_engine(config.database_url)
    nc = await connect(settings, SERVICE)
    try:
        js = nc.jetstream()
        sub = await _subscribe(js, settings, config)
        await _redeliver_unacked(nc)
        persister = Persister(nc, js, engine, config, stop)
        reconnects = nc.stats["reconnects"]
        log.info("persisting %s to Postgres in batches of up to %d", subjects.TRANSCRIPTS_STREAM, config.batch_size)
        while not stop.is_set():
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
                log.warning("fetch refused (%s); subscribing again", exc)
                sub = await _resubscribe(sub, js, settings, config, stop)
                continue
            except nats.errors.Error as exc:
                # While NATS is away the client reconnects by itself; wait and fetch again.
                log.warning("fetch failed (%s); retrying", exc)
                await stopped_within(stop, FETCH_WAIT_S)
                continue
            await persister.handle(msgs)
    finally:
        # Not drain(): the pull subscription's queue is read only by fetch, so drain would wait it out.
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await nc.flush(timeout=2)
        await nc.close()
        await engine.dispose()
    log.info("stopped")


async def _redeliver_unacked(nc) -> bool:
    """What a killed predecessor had fetched but not acked comes back now, not after ack_wait (60 s).
    Writes are idempotent upserts, so a message another persister also holds changes nothing twice."""
    try:
        await JetStreamAPI(nc).reset(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
    except JetStreamAPIError as exc:
        log.warning("could not reset the consumer to its ack floor: %s", exc)
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


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _hint(exc: BaseException) -> str:
    if isinstance(getattr(exc, "orig", None), psycopg.errors.UndefinedTable):
        return " (is the schema there? run `jetscribe db upgrade`)"
    return ""


def main() -> int:
    """`python -m jetscribe.services.persister`: run until SIGTERM or SIGINT, then exit 0."""
    return telemetry.serve(SERVICE, lambda stop: run(StreamSettings.from_env(), PersisterConfig.from_env(), stop))
