"""A session's stored transcript for its tenant, page by page: what `jetscribe follow --from-start` and `jetscribe
transcript` read as a tenant, whose NATS user may create no consumer (shared/natsauth.py says why).

A tenant asks on `jetscribe.history.<tenant>.<session>`, which its permissions allow for its own tenant only; a
gateway reads the page with its own rights (an ephemeral pull consumer filtered to that session's segments and
events) and answers on the tenant's own inbox only (`check_reply_subject`), so no tenant reads another's history.
Pages are bounded (messages and bytes) and each tenant's requests are rate limited per gateway.
"""

from __future__ import annotations

import secrets

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from jetscribe.services.ingest.core import RequestRefused
from jetscribe.services.ingest.rates import RateLimited, TokenBucket
from jetscribe.shared import subjects
from jetscribe.shared.wire import HistoryPage, HistoryRequest, StoredMessage, WireError, decode

MAX_PAGE = 200  # messages in one page at most
MAX_PAGE_BYTES = 256 * 1024  # and about this many bytes: far under NATS's max payload
CONSUMER_IDLE_S = 10.0  # the page's consumer is removed by the server once idle this long
FETCH_TIMEOUT_S = 2.0


def check_request(data: bytes) -> HistoryRequest:
    """The request, its limit held to 1..MAX_PAGE; RequestRefused("malformed") for one that cannot be read."""
    try:
        request = decode(data, HistoryRequest)
    except WireError as exc:
        raise RequestRefused("malformed", f"not a history request: {exc}") from None
    if request.from_seq < 0:
        raise RequestRefused("malformed", f"from_seq {request.from_seq} is negative: 0 is the session's start")
    request.limit = max(1, min(request.limit, MAX_PAGE))
    return request


def page_of(stored: list[StoredMessage], pending: int, max_bytes: int = MAX_PAGE_BYTES) -> HistoryPage:
    """A page from the messages read (in stream order) and how many the consumer held: the first messages up to
    `max_bytes` (always one), and where the next page starts."""
    taken: list[StoredMessage] = []
    size = 0
    for message in stored:
        size += len(message.data) + len(message.subject)
        if taken and size > max_bytes:
            break
        taken.append(message)
    next_seq = taken[-1].seq + 1 if taken else 0
    return HistoryPage(ok=True, messages=taken, next_seq=next_seq, done=len(taken) >= pending)


class HistoryRates:
    """Each tenant's history pages per second at one gateway (a token bucket holding `burst_s` of its rate)."""

    def __init__(self, pages_per_s: float, burst_s: float = 5.0):
        self.pages_per_s = pages_per_s
        self.burst_s = burst_s
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, tenant: str, now: float) -> None:
        """Count one page for `tenant`; RateLimited (with the wait) when it is over its rate."""
        bucket = self.buckets.setdefault(tenant, TokenBucket.full(self.pages_per_s, self.burst_s, now))
        wait = bucket.wait_for(1, now)
        if wait > 0:
            raise RateLimited(
                f"tenant {tenant} asks for more than {self.pages_per_s:g} history pages a second; ask again in "
                f"{wait:.2f} s",
                wait,
            )
        bucket.take(1, now)


def session_filters(tenant: str, session: str) -> list[str]:
    return [subjects.transcript(tenant, session), subjects.session_events_of(tenant, session)]


async def read_page(js, tenant: str, session: str, request: HistoryRequest) -> HistoryPage:
    """Read one page of the session from TRANSCRIPTS with the gateway's rights (a pull consumer of its own)."""
    start = (
        {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": request.from_seq}
        if request.from_seq
        else {"deliver_policy": DeliverPolicy.ALL}
    )
    name = f"history_{secrets.token_hex(8)}"
    config = ConsumerConfig(
        name=name,
        filter_subjects=session_filters(tenant, session),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=CONSUMER_IDLE_S,
        mem_storage=True,
        num_replicas=1,
        **start,
    )
    info = await js.add_consumer(subjects.TRANSCRIPTS_STREAM, config=config)
    pending = int(info.num_pending or 0)
    if pending == 0:
        return HistoryPage(ok=True, next_seq=request.from_seq, done=True)
    sub = await js.pull_subscribe_bind(consumer=name, stream=subjects.TRANSCRIPTS_STREAM)
    try:
        msgs = await sub.fetch(min(request.limit, pending), timeout=FETCH_TIMEOUT_S)
    finally:
        await sub.unsubscribe()
    stored = [StoredMessage(seq=m.metadata.sequence.stream, subject=m.subject, data=m.data) for m in msgs]
    return page_of(stored, pending)
