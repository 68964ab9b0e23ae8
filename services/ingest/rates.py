"""Rate limits of the gateway, with no I/O: token buckets of chunks/s and bytes/s per session and per tenant.

A bucket holds up to `burst_s` seconds of its rate and refills continuously, so a bot that was away (a reconnect)
sends its backlog at full speed until the bucket is empty, then at the sustained rate. A chunk takes one token
from each chunk bucket and its payload's bytes from each byte bucket, all or nothing: a refused chunk costs nothing,
so the bot's retry after `retry_after_s` passes. Time is the caller's monotonic clock (`now`).

The tenant buckets are this gateway's: with several gateways, each limits the sessions it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jetscribe.shared.errors import CodedError

MAX_TENANTS_KEPT = 10_000  # tenant buckets beyond this are pruned when full again (an idle tenant's is)


class RateLimited(CodedError):
    """A chunk over its session's or its tenant's rate; `retry_after_s` says when the same chunk would pass."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(None, message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RateLimits:
    """Sustained rates (0 = no limit) and how many seconds of each a bucket holds."""

    session_chunks_per_s: float = 50.0
    session_bytes_per_s: float = 8 * 1024 * 1024
    tenant_chunks_per_s: float = 5000.0
    tenant_bytes_per_s: float = 128 * 1024 * 1024
    burst_s: float = 60.0


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `capacity` held; `rate` 0 means unlimited."""

    rate: float
    capacity: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst_s: float, now: float) -> TokenBucket:
        capacity = max(rate * burst_s, 1.0) if rate > 0 else 0.0
        return cls(rate, capacity, capacity, now)

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` tokens are there (0: now). A cost above the capacity waits for a full bucket."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        missing = min(cost, self.capacity) - self.tokens
        return max(0.0, missing / self.rate)

    def take(self, cost: float, now: float) -> None:
        if self.rate > 0:
            self._refill(now)
            self.tokens -= min(cost, self.capacity)

    @property
    def is_full(self) -> bool:
        return self.rate <= 0 or self.tokens >= self.capacity


@dataclass
class Allowance:
    """The chunk and byte buckets of one session or one tenant."""

    chunks: TokenBucket
    bytes: TokenBucket

    @classmethod
    def of(cls, chunks_per_s: float, bytes_per_s: float, burst_s: float, now: float) -> Allowance:
        return cls(TokenBucket.full(chunks_per_s, burst_s, now), TokenBucket.full(bytes_per_s, burst_s, now))

    def waits(self, size: int, now: float) -> tuple[float, float]:
        """(seconds until a chunk may go, seconds until `size` bytes may go)."""
        return self.chunks.wait_for(1, now), self.bytes.wait_for(size, now)

    def take(self, size: int, now: float) -> None:
        self.chunks.take(1, now)
        self.bytes.take(size, now)

    def refilled(self, now: float) -> bool:
        self.chunks.wait_for(0, now)
        self.bytes.wait_for(0, now)
        return self.chunks.is_full and self.bytes.is_full


@dataclass
class RateLimiter:
    """The per-tenant buckets; each session's buckets live in its ledger (`session_allowance`)."""

    limits: RateLimits = field(default_factory=RateLimits)
    tenants: dict[str, Allowance] = field(default_factory=dict)

    def session_allowance(self, now: float) -> Allowance:
        lim = self.limits
        return Allowance.of(lim.session_chunks_per_s, lim.session_bytes_per_s, lim.burst_s, now)

    def admit(self, tenant: str, session: Allowance, size: int, now: float) -> None:
        """Take a chunk of `size` payload bytes from the session's and the tenant's buckets, or raise RateLimited
        (taking nothing) with the wait that lets it through."""
        lim = self.limits
        tenant_allowance = self.tenants.get(tenant)
        if tenant_allowance is None:
            self._prune(now)
            tenant_allowance = self.tenants[tenant] = Allowance.of(
                lim.tenant_chunks_per_s, lim.tenant_bytes_per_s, lim.burst_s, now
            )
        session_chunks, session_bytes = session.waits(size, now)
        tenant_chunks, tenant_bytes = tenant_allowance.waits(size, now)
        wait = max(session_chunks, session_bytes, tenant_chunks, tenant_bytes)
        if wait > 0:
            over = [
                name
                for name, w in (
                    (f"the session's {lim.session_chunks_per_s:g} chunks/s", session_chunks),
                    (f"the session's {lim.session_bytes_per_s:g} bytes/s", session_bytes),
                    (f"tenant {tenant}'s {lim.tenant_chunks_per_s:g} chunks/s", tenant_chunks),
                    (f"tenant {tenant}'s {lim.tenant_bytes_per_s:g} bytes/s", tenant_bytes),
                )
                if w > 0
            ]
            raise RateLimited(
                f"over {' and '.join(over)} (bursts of {lim.burst_s:g} s allowed); "
                f"send the same chunk again in {wait:.3f} s",
                retry_after_s=wait,
            )
        session.take(size, now)
        tenant_allowance.take(size, now)

    def _prune(self, now: float) -> None:
        if len(self.tenants) < MAX_TENANTS_KEPT:
            return
        for tenant in [t for t, allowance in self.tenants.items() if allowance.refilled(now)]:
            del self.tenants[tenant]
