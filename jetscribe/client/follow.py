"""`jetscribe follow`: replay and follow one session's transcript from the TRANSCRIPTS stream.

An ordered reader (ephemeral push consumers, no acks, recreated after a gap) of the tenant's segments and
events, `*.<tenant>.>`, keeping the session's. One filter in the consumer's create subject is what a tenant's
NATS user may ask for (shared/natsauth.py): two filters (segments and events of one session) would need the
create subject without a filter, which permissions cannot tie to a tenant. The README shows the consumer made
with the `nats` CLI.

A tenant's own NATS user may create no consumer (shared/natsauth.py: the server would not check where a push
consumer delivers), so as a tenant (`live=True`) it reads with core subscriptions on the tenant's own subjects
(`transcript.<t>.<s>`, `session.<t>.<s>.*`), without the ordered reader's repair of a gap; what was stored before
(`--from-start`, `--from-seq`) it reads first from the gateways' history (client/history.py), page by page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from jetscribe.cli.formats import WORD_FIELDS, show_live
from jetscribe.client.history import HistoryReader
from jetscribe.client.meeting import MeetingMerge
from jetscribe.shared import subjects
from jetscribe.shared.wire import (
    DroppedWord,
    Segment,
    SessionEvent,
    StoredMessage,
    TranscriptMessage,
    WireError,
    decode,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class NoStream(RuntimeError):
    """The server has no TRANSCRIPTS stream: no jetscribe service ever ran against it."""


@dataclasses.dataclass(frozen=True)
class SessionSeen:
    """What TRANSCRIPTS holds of one session before following it."""

    messages: int  # the session's segments and events in the stream
    last_stream_seq: int  # the stream's last seq (any session)
    closed_event: str | None = None  # "ended" or "rejected", if the stream holds one
    closed_seq: int = 0  # its stream seq
    closed_at: datetime | None = None  # when the stream stored it


@dataclasses.dataclass(frozen=True)
class FollowPlan:
    """What to tell the user before following, and whether following is pointless (`exit_code` set)."""

    message: str
    exit_code: int | None = None


def plan_follow(
    seen: SessionSeen, tenant: str, session: str, config: ConsumerConfig, *, keep: bool, wait: bool
) -> FollowPlan:
    """Decide, from what the stream holds, whether following can show anything, and say what it waits for."""
    name = f"session {session} of tenant {tenant}"
    if seen.messages == 0 and not wait:
        return FollowPlan(
            f"no {name} in {subjects.TRANSCRIPTS_STREAM}: check the id and --tenant, or add --wait to wait for it to "
            "start",
            exit_code=1,
        )
    policy = config.deliver_policy
    start = {
        DeliverPolicy.ALL: "from its start",
        DeliverPolicy.BY_START_TIME: f"from {config.opt_start_time:%Y-%m-%d %H:%M:%S} UTC"
        if config.opt_start_time
        else "",
        DeliverPolicy.BY_START_SEQUENCE: f"from stream seq {config.opt_start_seq}",
    }.get(policy, "from now on")
    if seen.closed_event and not keep:
        code = 0 if seen.closed_event == "ended" else 1
        after_start = (
            policy == DeliverPolicy.ALL
            or (policy == DeliverPolicy.BY_START_SEQUENCE and (config.opt_start_seq or 0) <= seen.closed_seq)
            or (
                policy == DeliverPolicy.BY_START_TIME
                and seen.closed_at is not None
                and config.opt_start_time is not None
                and config.opt_start_time <= seen.closed_at
            )
        )
        if not after_start:
            return FollowPlan(
                f"{name} already {seen.closed_event} (stream seq {seen.closed_seq}), before the point asked for: "
                "nothing more will come; replay it with --from-start",
                exit_code=code,
            )
    waiting = "" if seen.messages else " (not started yet: waiting for it)"
    past_end = ""
    if policy == DeliverPolicy.BY_START_SEQUENCE and (config.opt_start_seq or 0) > seen.last_stream_seq + 1:
        past_end = (
            f"; --from-seq {config.opt_start_seq} is past the end of {subjects.TRANSCRIPTS_STREAM} (last seq "
            f"{seen.last_stream_seq}): only what comes after it will show"
        )
    return FollowPlan(f"following {name} {start}{waiting}{past_end}; Ctrl-C stops")


async def look_up(js, tenant: str, session: str) -> SessionSeen:
    """What TRANSCRIPTS holds of the session: counts by subject, and its closing event if there is one."""
    counts = 0
    last_seq = 0
    try:
        for pattern in (subjects.transcript(tenant, session), subjects.session_events_of(tenant, session)):
            info = await js.stream_info(subjects.TRANSCRIPTS_STREAM, subjects_filter=pattern)
            counts += sum((info.state.subjects or {}).values())
            last_seq = info.state.last_seq
    except NotFoundError:
        raise NoStream(f"NATS has no {subjects.TRANSCRIPTS_STREAM} stream; is jetscribe running there?") from None
    for event in ("ended", "rejected"):
        try:
            msg = await js.get_last_msg(subjects.TRANSCRIPTS_STREAM, subjects.session_event(tenant, session, event))
        except NotFoundError:
            continue
        return SessionSeen(counts, last_seq, event, msg.seq or 0, msg.time)
    return SessionSeen(counts, last_seq)


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a duration back from `now` (`90s`, `5m`, `2h`, `1d`) or an ISO time
    (`2025-06-01T10:00:00Z`; without a zone it is local time). Returns an aware UTC time."""
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        return (now - timedelta(seconds=float(duration[1]) * _UNIT_S[duration[2]])).astimezone(UTC)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a duration like 90s, 5m, 2h, 1d nor an ISO time like 2025-06-01T10:00:00Z"
        ) from None
    if at.tzinfo is None:
        at = at.astimezone()  # a naive time is the local time of whoever typed it
    return at.astimezone(UTC)


def consumer_config(
    tenant: str, session: str, *, from_start: bool = False, since: datetime | None = None, from_seq: int | None = None
) -> ConsumerConfig:
    """The consumer for one session's segments and events, from the start, a time, a stream seq, or
    (none of them) only what comes next."""
    for name, value in (("tenant", tenant), ("session", session)):
        if not subjects.is_valid_token(value):
            raise ValueError(f"{name} {value!r} must be 1-64 letters, digits, '_' or '-'")
    if sum((from_start, since is not None, from_seq is not None)) > 1:
        raise ValueError("give at most one of --from-start, --since, --from-seq")
    config = ConsumerConfig(filter_subject=tenant_filter(tenant), deliver_policy=DeliverPolicy.NEW)
    if from_start:
        config.deliver_policy = DeliverPolicy.ALL
    elif since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = since
    elif from_seq is not None:
        if from_seq < 1:
            raise ValueError("--from-seq is a stream sequence; they start at 1")
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = from_seq
    return config


def tenant_filter(tenant: str) -> str:
    """Every segment and event of a tenant in TRANSCRIPTS (`transcript.<t>.<s>`, `session.<t>.<s>.<event>`)."""
    return f"*.{tenant}.>"


def session_of(subject: str) -> str:
    """The session token of a TRANSCRIPTS subject."""
    parts = subject.split(".")
    return parts[2] if len(parts) > 2 else ""


HEARTBEAT_S = 5.0  # the server's idle heartbeat; three missed and the consumer is made again
INACTIVE_S = 30.0  # a consumer nobody reads is removed by the server after this (a tenant may not delete one)


class OrderedReader:
    """One filter of TRANSCRIPTS in stream order, as nats-py's ordered consumer but with a consumer name (so the
    filter is in the create subject, where a tenant's permissions can check it) and a new name after a gap."""

    def __init__(self, nc, config: ConsumerConfig):
        self.nc = nc
        self.config = config
        self.sub = None
        self.expected = 1  # the consumer sequence of the next message
        self.last_stream_seq = 0

    async def start(self, from_seq: int | None = None) -> int:
        """Create the consumer (from stream seq `from_seq` if given); returns how many messages it has pending."""
        if self.sub is not None:
            await self.sub.unsubscribe()
        inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(inbox)
        config = dataclasses.replace(
            self.config,
            name=f"follow_{secrets.token_hex(8)}",
            deliver_subject=inbox,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            idle_heartbeat=HEARTBEAT_S,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        if from_seq is not None:
            config.deliver_policy, config.opt_start_seq, config.opt_start_time = (
                DeliverPolicy.BY_START_SEQUENCE,
                from_seq,
                None,
            )
        try:
            info = await self.nc.jetstream().add_consumer(subjects.TRANSCRIPTS_STREAM, config=config)
        except NotFoundError:
            raise NoStream(f"NATS has no {subjects.TRANSCRIPTS_STREAM} stream; is jetscribe running there?") from None
        self.expected = 1
        return int(info.num_pending or 0)

    async def next(self, timeout: float | None = None) -> Msg:
        """The next message in stream order; raises asyncio.TimeoutError after `timeout` seconds without one."""
        assert self.sub is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            wait = 3 * HEARTBEAT_S if deadline is None else min(3 * HEARTBEAT_S, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError
            try:
                msg = await self.sub.next_msg(timeout=wait)
            except NatsTimeout:
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError from None
                await self._restart()  # no heartbeat: the consumer is gone (a NATS restart)
                continue
            if msg.headers and msg.headers.get("Status"):  # an idle heartbeat
                continue
            sequence = msg.metadata.sequence
            if sequence.consumer != self.expected:  # lost on the way (a slow client, a reconnect)
                await self._restart()
                continue
            self.expected += 1
            self.last_stream_seq = sequence.stream
            return msg

    async def _restart(self) -> None:
        await self.start(self.last_stream_seq + 1 if self.last_stream_seq else None)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()
            self.sub = None


class LiveReader:
    """Core subscriptions on a tenant's own subjects, one queue, as they come (what a tenant's user may read
    without a consumer). Messages a slow client misses are not repaired: nats-py reports a slow consumer."""

    def __init__(self, nc, subject_list: list[str]):
        self.nc = nc
        self.subjects = subject_list
        self.subs: list = []
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def start(self, from_seq: int | None = None) -> int:
        if from_seq is not None:
            raise ValueError("a live reader cannot start from a stream seq")
        for subject in self.subjects:
            self.subs.append(await self.nc.subscribe(subject, cb=self._put))
        await self.nc.flush()  # the server has the interest: nothing published after start() is missed
        return 0

    async def _put(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    async def next(self, timeout: float | None = None) -> Msg:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()
        self.subs = []


class LiveOnly(ValueError):
    """A replay a tenant's follow cannot make: a meeting's, or one from a time (--since)."""


Reader = OrderedReader | LiveReader | HistoryReader


def _reader(
    nc, config: ConsumerConfig, live_subjects: list[str], live: bool, tenant: str = "", session: str | None = None
) -> Reader:
    """The operator's: an ordered consumer. A tenant's (`live`): core subscriptions, after the session's stored
    messages from the gateways' history (`HistoryReader`) when it replays."""
    if not live:
        return OrderedReader(nc, dataclasses.replace(config))
    policy = config.deliver_policy
    if policy == DeliverPolicy.NEW:
        return LiveReader(nc, live_subjects)
    if session is not None and policy in (DeliverPolicy.ALL, DeliverPolicy.BY_START_SEQUENCE):
        from_seq = (config.opt_start_seq or 0) if policy == DeliverPolicy.BY_START_SEQUENCE else 0
        return HistoryReader(nc, tenant, session, LiveReader(nc, live_subjects), from_seq)
    raise LiveOnly(
        "as a tenant, follow replays one session from its start or a stream seq (the gateways' history), not a "
        "meeting nor from a time; replay that with the operator's credentials, or a reader provisioned for the "
        "tenant (`jetscribe tenant reader T NAME`)"
    )


def stream_seq(msg: Msg | StoredMessage) -> int | None:
    """The TRANSCRIPTS seq of a message a consumer delivered or the history gave; None for one a core subscription
    received."""
    if isinstance(msg, StoredMessage):
        return msg.seq
    return msg.metadata.sequence.stream if msg.reply and msg.reply.startswith("$JS.ACK.") else None


async def first_seq(nc, tenant: str, session: str) -> int | None:
    """The stream seq of the session's first segment or event in TRANSCRIPTS; None if it has none yet."""
    found = []
    for subject in (subjects.transcript(tenant, session), subjects.session_events_of(tenant, session)):
        probe = OrderedReader(nc, ConsumerConfig(filter_subject=subject, deliver_policy=DeliverPolicy.ALL))
        try:
            if await probe.start():
                found.append((await probe.next(timeout=10)).metadata.sequence.stream)
        finally:
            await probe.stop()
    return min(found, default=None)


def as_json(message: TranscriptMessage, stream_seq: int | None) -> str:
    """One line of `--format json`: the message's fields, words as objects, and its stream seq
    (resume with `--from-seq` one above it)."""
    data = msgspec.to_builtins(message)
    if isinstance(message, Segment):  # arrays on the wire (array_like), objects with their field names here
        data["words"] = [dict(zip(WORD_FIELDS, w, strict=False)) for w in data["words"]]
        data["dropped"] = [dict(zip(DroppedWord.__struct_fields__, w, strict=True)) for w in data["dropped"]]
    data["stream_seq"] = stream_seq
    return json.dumps(data, ensure_ascii=False)


def describe(event: SessionEvent) -> str:
    """A session event as one line for people (text format, on stderr)."""
    if event.event == "started":
        return (
            f"-- session {event.session_id} started (language {event.language or 'auto'}, model {event.model or '?'})"
        )
    if event.event == "utterance_end":
        return f"-- utterance end: no word since {event.last_word_end or 0.0:.2f} s"
    if event.event == "speech_started":
        return f"-- speech started at {event.timestamp or 0.0:.2f} s"
    reason = f": {event.reason}" if event.reason else ""
    return (
        f"-- session {event.session_id} {event.event}{reason} ({event.audio_seconds:.1f} s of audio, "
        f"{event.segments} segments)"
    )


async def follow(
    nc,
    tenant: str,
    session: str,
    config: ConsumerConfig,
    *,
    fmt: str = "text",
    keep: bool = False,
    live: bool = False,
    started: asyncio.Event | None = None,
    out=None,
    err=None,
) -> int:
    """Print the session's segments and events as they come. Returns 0 after its `ended` event
    (1 after `rejected`); with `keep`, follows until cancelled. `live`: as a tenant, core subscriptions
    (LiveReader), from now on only. `started` is set once it reads (what a live reader sees begins there)."""
    out, err = out or sys.stdout, err or sys.stderr
    reader = _reader(
        nc,
        config,
        [subjects.transcript(tenant, session), subjects.session_events_of(tenant, session)],
        live,
        tenant,
        session,
    )
    try:
        if isinstance(reader, OrderedReader):
            await _start(reader, nc, tenant, session, config)
        else:
            await reader.start()
        if started is not None:
            started.set()
        while True:
            msg = await reader.next()
            if session_of(msg.subject) != session:
                continue
            try:
                message = decode(msg.data, TranscriptMessage)
            except WireError as exc:
                print(f"jetscribe: skipping a message on {msg.subject}: {exc}", file=err, flush=True)
                continue
            if fmt == "json":
                print(as_json(message, stream_seq(msg)), file=out, flush=True)
            elif isinstance(message, Segment):
                show_live(message, out)
            else:
                print(describe(message), file=err, flush=True)
            if isinstance(message, SessionEvent) and message.event in ("ended", "rejected") and not keep:
                return 0 if message.event == "ended" else 1
    finally:
        await reader.stop()


async def _start(reader: OrderedReader, nc, tenant: str, session: str, config: ConsumerConfig) -> None:
    """From the start means from the session's first message (not the tenant's): found by two probes, and
    again once the reader waits for new messages, in case the session began in between."""
    if config.deliver_policy != DeliverPolicy.ALL:
        await reader.start()
        return
    first = await first_seq(nc, tenant, session)
    if first is not None:
        await reader.start(first)
        return
    reader.config.deliver_policy = DeliverPolicy.NEW
    await reader.start()
    first = await first_seq(nc, tenant, session)
    if first is not None:
        await reader.start(first)


def meeting_consumer_config(tenant: str, meeting: str, **start) -> ConsumerConfig:
    """The consumer for a meeting: every session of the tenant (a track names its meeting in its messages),
    from where `consumer_config` would start."""
    return consumer_config(tenant, meeting, **start)  # already every session of the tenant: `tenant_filter`


async def follow_meeting(
    nc,
    tenant: str,
    meeting: str,
    config: ConsumerConfig,
    *,
    fmt: str = "text",
    keep: bool = False,
    hold_s: float = 3.0,
    live: bool = False,
    out=None,
    err=None,
) -> int:
    """Print a meeting's finals, every track's, in spoken order (`MeetingMerge`), times from the first track's
    start; json: its tracks' segments and events as they come. Returns 0 once every track seen has ended."""
    out, err = out or sys.stdout, err or sys.stderr
    reader = _reader(nc, config, [f"transcript.{tenant}.>", f"session.{tenant}.>"], live)
    await reader.start()  # from the start: the tenant's whole stream (a meeting's tracks are sessions of their own)
    merge = MeetingMerge(meeting, hold_s=hold_s)
    t0: float | None = None

    def show(finals: list[Segment]) -> None:
        nonlocal t0
        for final in finals:
            t0 = final.track_start if t0 is None else min(t0, final.track_start)
            shift = final.track_start - t0
            show_live(msgspec.structs.replace(final, start=final.start + shift, end=final.end + shift), out)

    try:
        while True:
            try:
                wait = merge.wait_s(time.monotonic())
                msg = await reader.next(timeout=None if wait is None else max(wait, 0.01))
            except TimeoutError:
                show(merge.due(time.monotonic()))
                continue
            try:
                message = decode(msg.data, TranscriptMessage)
            except WireError as exc:
                print(f"jetscribe: skipping a message on {msg.subject}: {exc}", file=err, flush=True)
                continue
            if message.meeting_id != meeting:
                continue
            now = time.monotonic()
            if isinstance(message, Segment):
                due = merge.segment(message, now)
            else:
                due = merge.event(message, now)
                if fmt == "text":
                    print(describe(message), file=err, flush=True)
            if fmt == "json":
                print(as_json(message, stream_seq(msg)), file=out, flush=True)
            else:
                show(due)
            if merge.over and not keep:
                show(merge.due(math.inf))
                return 0
    finally:
        await reader.stop()
