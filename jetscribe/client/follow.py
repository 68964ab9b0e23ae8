"""`jetscribe follow`: replay and follow one session's transcript from the TRANSCRIPTS stream.

An ordered consumer (ephemeral, no acks, the client recreates it after a gap) filtered to the
session's segments and events. The README shows the same consumer made with the `nats` CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from datetime import UTC, datetime, timedelta

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from jetscribe.cli.formats import WORD_FIELDS, show_live
from jetscribe.client.meeting import MeetingMerge
from jetscribe.shared import subjects
from jetscribe.shared.wire import Segment, SessionEvent, TranscriptMessage, WireError, decode

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class NoStream(RuntimeError):
    """The server has no TRANSCRIPTS stream: no jetscribe service ever ran against it."""


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
    config = ConsumerConfig(
        filter_subjects=[subjects.transcript(tenant, session), subjects.session_events_of(tenant, session)],
        deliver_policy=DeliverPolicy.NEW,
    )
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


def as_json(message: TranscriptMessage, stream_seq: int) -> str:
    """One line of `--format json`: the message's fields, words as objects, and its stream seq
    (resume with `--from-seq` one above it)."""
    data = msgspec.to_builtins(message)
    if isinstance(message, Segment):
        data["words"] = [dict(zip(WORD_FIELDS, w, strict=False)) for w in data["words"]]
    data["stream_seq"] = stream_seq
    return json.dumps(data, ensure_ascii=False)


def describe(event: SessionEvent) -> str:
    """A session event as one line for people (text format, on stderr)."""
    if event.event == "started":
        return (
            f"-- session {event.session_id} started (language {event.language or 'auto'}, model {event.model or '?'})"
        )
    reason = f": {event.reason}" if event.reason else ""
    return (
        f"-- session {event.session_id} {event.event}{reason} ({event.audio_seconds:.1f} s of audio, "
        f"{event.segments} segments)"
    )


async def follow(
    nc, tenant: str, session: str, config: ConsumerConfig, *, fmt: str = "text", keep: bool = False, out=None, err=None
) -> int:
    """Print the session's segments and events as they come. Returns 0 after its `ended` event
    (1 after `rejected`); with `keep`, follows until cancelled."""
    out, err = out or sys.stdout, err or sys.stderr
    config = dataclasses.replace(config)  # the client keeps and changes it
    try:
        sub = await nc.jetstream().subscribe(
            config.filter_subjects[0], stream=subjects.TRANSCRIPTS_STREAM, config=config, ordered_consumer=True
        )
    except NotFoundError:
        raise NoStream(f"NATS has no {subjects.TRANSCRIPTS_STREAM} stream; is jetscribe running there?") from None
    # nats-py recreates an ordered consumer after a gap by start sequence but keeps opt_start_time, which
    # the server refuses together (the bug nats.go fixed in #1281); the time was needed only once.
    config.opt_start_time = None
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            try:
                message = decode(msg.data, TranscriptMessage)
            except WireError as exc:
                print(f"jetscribe: skipping a message on {msg.subject}: {exc}", file=err, flush=True)
                continue
            if fmt == "json":
                print(as_json(message, msg.metadata.sequence.stream), file=out, flush=True)
            elif isinstance(message, Segment):
                show_live(message, out)
            else:
                print(describe(message), file=err, flush=True)
            if isinstance(message, SessionEvent) and message.event in ("ended", "rejected") and not keep:
                return 0 if message.event == "ended" else 1
    finally:
        await sub.unsubscribe()


def meeting_consumer_config(tenant: str, meeting: str, **start) -> ConsumerConfig:
    """The consumer for a meeting: every session of the tenant (a track names its meeting in its messages),
    from where `consumer_config` would start."""
    config = consumer_config(tenant, meeting, **start)
    config.filter_subjects = [subjects.transcript(tenant, "*"), subjects.session_events_of(tenant, "*")]
    return config


async def follow_meeting(
    nc,
    tenant: str,
    meeting: str,
    config: ConsumerConfig,
    *,
    fmt: str = "text",
    keep: bool = False,
    hold_s: float = 3.0,
    out=None,
    err=None,
) -> int:
    """Print a meeting's finals, every track's, in spoken order (`MeetingMerge`), times from the first track's
    start; json: its tracks' segments and events as they come. Returns 0 once every track seen has ended."""
    out, err = out or sys.stdout, err or sys.stderr
    config = dataclasses.replace(config)
    try:
        sub = await nc.jetstream().subscribe(
            config.filter_subjects[0], stream=subjects.TRANSCRIPTS_STREAM, config=config, ordered_consumer=True
        )
    except NotFoundError:
        raise NoStream(f"NATS has no {subjects.TRANSCRIPTS_STREAM} stream; is jetscribe running there?") from None
    config.opt_start_time = None
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
                msg = await sub.next_msg(timeout=None if wait is None else max(wait, 0.01))
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
                print(as_json(message, msg.metadata.sequence.stream), file=out, flush=True)
            else:
                show(due)
            if merge.over and not keep:
                show(merge.due(math.inf))
                return 0
    finally:
        await sub.unsubscribe()
