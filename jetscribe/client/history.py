"""A session's stored transcript read as its tenant: pages asked of the gateways on
`jetscribe.history.<tenant>.<session>` (services/ingest/history.py), since a tenant's NATS user may create no
consumer. `HistoryReader` replays them and then goes on live, as `jetscribe follow --from-start` does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import nats.errors
from nats.aio.msg import Msg

from jetscribe.services.persister.core import word_row
from jetscribe.shared import subjects
from jetscribe.shared.wire import (
    HistoryPage,
    HistoryRequest,
    Segment,
    SessionEvent,
    StoredMessage,
    TranscriptMessage,
    decode,
    encode,
)

PAGE = 100
REQUEST_TIMEOUT_S = 5.0


class HistoryRefused(RuntimeError):
    """A gateway refused the history request (its code and message), or none answered."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


async def stored_messages(
    nc, tenant: str, session: str, from_seq: int = 0, page: int = PAGE
) -> AsyncIterator[StoredMessage]:
    """The session's segments and events in TRANSCRIPTS, in stream order, from `from_seq` (0: its start) to what
    was stored when the last page was read; a rate-limited page is asked again once its wait is over."""
    while True:
        try:
            reply = await nc.request(
                subjects.history(tenant, session),
                encode(HistoryRequest(from_seq=from_seq, limit=page)),
                timeout=REQUEST_TIMEOUT_S,
            )
        except (TimeoutError, nats.errors.NoRespondersError):
            raise HistoryRefused(f"no gateway answered for the history of {tenant}/{session}", "no_answer") from None
        answer = decode(reply.data, HistoryPage)
        if not answer.ok and answer.code == "rate_limited":
            await asyncio.sleep(answer.retry_after_s)
            continue
        if not answer.ok:
            raise HistoryRefused(
                f"the gateway refused the history of {tenant}/{session}: {answer.message}", answer.code
            )
        for message in answer.messages:
            yield message
        if answer.done:
            return
        from_seq = answer.next_seq


class HistoryReader:
    """The session's stored messages, then the live ones (core subscriptions, started first so nothing published
    while the history is read is missed; what both saw is shown once)."""

    def __init__(self, nc, tenant: str, session: str, live, from_seq: int = 0):
        self.live = live  # a LiveReader on the session's subjects
        self.from_seq = from_seq
        self.history = stored_messages(nc, tenant, session, from_seq)
        self.replayed: set[bytes] = set()
        self.replaying = True

    async def start(self) -> int:
        await self.live.start()
        return 0

    async def next(self, timeout: float | None = None) -> StoredMessage | Msg:
        if self.replaying:
            try:
                message = await anext(self.history)
                self.replayed.add(message.data)
                return message
            except StopAsyncIteration:
                self.replaying = False
        while True:
            msg = await self.live.next(timeout)
            if msg.data in self.replayed:  # stored while the history was read: already shown
                self.replayed.discard(msg.data)
                continue
            return msg

    async def stop(self) -> None:
        await self.history.aclose()
        await self.live.stop()


def transcript_of(stored: list[StoredMessage]) -> tuple[SessionEvent | None, list[SimpleNamespace]]:
    """A session's closing event (ended or rejected, if stored) and its transcript from its stored messages: the
    best final of each segment (the highest revision), in spoken order, as rows `cli.formats.render` shows."""
    finals: dict[int, Segment] = {}
    closed = None
    for message in stored:
        decoded = decode(message.data, TranscriptMessage)
        if isinstance(decoded, SessionEvent) and decoded.event in ("ended", "rejected") and closed is None:
            closed = decoded
        elif isinstance(decoded, Segment) and decoded.status == "final":
            best = finals.get(decoded.segment_id)
            if best is None or decoded.revision > best.revision:
                finals[decoded.segment_id] = decoded
    rows = [
        SimpleNamespace(
            segment_id=s.segment_id,
            start_s=s.start,
            end_s=s.end,
            text=s.text,
            speaker=s.speaker,
            words=[word_row(w) for w in s.words],
        )
        for s in sorted(finals.values(), key=lambda s: (s.start, s.segment_id))
    ]
    return closed, rows
