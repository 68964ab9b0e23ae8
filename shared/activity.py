"""What each service did lately, for its NATS micro-service `stats` endpoint and `jetscribe status`.

Pure: no I/O and no clock reads of its own (the shells pass `now` readings in). Each service keeps one tally
(`GatewayActivity`, `WorkerActivity`, `PersisterActivity`): totals since it started, plus the last minute of
what matters live (final latency, decode time, write time) in `RollingWindow`s. `report()` builds the JSON-ready
dict the `stats` endpoint answers; `jetscribe status` reads these keys (`jetscribe/cli/status.py`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from jetscribe.shared.wire import WorkerStats

WINDOW_S = 60.0  # "last minute" everywhere in the stats
MAX_WINDOW_VALUES = 100_000  # a window keeps at most this many values (the newest): bounded memory under any load
SESSIONS_LISTED = 200  # a worker lists at most this many of its sessions by id; the counts cover all

Now = Callable[[], float]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks, as numpy's default; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class RollingWindow:
    """Values observed over the last `span_s` seconds of a monotonic clock: count, total and percentiles."""

    def __init__(self, now: Now, span_s: float = WINDOW_S, max_values: int = MAX_WINDOW_VALUES):
        self.now = now
        self.span_s = span_s
        self._values: deque[tuple[float, float]] = deque(maxlen=max_values)

    def add(self, value: float) -> None:
        self._values.append((self.now(), value))

    def values(self) -> list[float]:
        self._expire()
        return [value for _, value in self._values]

    @property
    def count(self) -> int:
        self._expire()
        return len(self._values)

    @property
    def total(self) -> float:
        return sum(self.values())

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        """{"p50": ..., "p95": ...} for qs (50, 95); None when the window is empty."""
        values = self.values()
        return {f"p{q:g}": _round(percentile(values, q)) for q in qs}

    def _expire(self) -> None:
        oldest = self.now() - self.span_s
        while self._values and self._values[0][0] < oldest:
            self._values.popleft()


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _counts(counter: Mapping[str, int]) -> dict[str, int]:
    return {key: n for key, n in sorted(counter.items()) if n}


class GatewayActivity:
    """The ingest gateway: chunks and audio it accepted, refusals by error code."""

    def __init__(self, now: Now):
        self.chunks = 0
        self.audio_s = 0.0
        self.refusals: Counter[str] = Counter()
        self.chunks_last_min = RollingWindow(now)  # values: audio seconds of each chunk
        self.refusals_last_min = RollingWindow(now)

    def accepted(self, audio_s: float) -> None:
        self.chunks += 1
        self.audio_s += audio_s
        self.chunks_last_min.add(audio_s)

    def refused(self, code: str) -> None:
        self.refusals[code] += 1
        self.refusals_last_min.add(1.0)

    def report(self, open_sessions: Iterable[tuple[str, str]], **identity: object) -> dict[str, object]:
        """`open_sessions`: (tenant, session) started here and not ended; `identity`: gateway id, partitions."""
        tenants = Counter(tenant for tenant, _ in open_sessions)
        return {
            "service": "ingest",
            **identity,
            "sessions": sum(tenants.values()),
            "tenants": _counts(tenants),
            "chunks": self.chunks,
            "audio_s": round(self.audio_s, 3),
            "chunks_last_min": self.chunks_last_min.count,
            "audio_s_last_min": round(self.chunks_last_min.total, 3),
            "refusals": _counts(self.refusals),
            "refusals_last_min": self.refusals_last_min.count,
        }


@dataclass(frozen=True)
class SessionLoad:
    """One open session of a worker, as its stats list it."""

    tenant: str
    session: str
    partition: int
    backlog_s: float  # audio received and not yet covered by a final


class WorkerActivity:
    """A transcriber worker: finals and their latency, decode time by kind, errors by code, rejections."""

    def __init__(self, now: Now):
        self.now = now
        self.started = now()
        self.finals = 0
        self.finals_last_min = RollingWindow(now)
        self.errors: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.final_latency = RollingWindow(now)  # seconds from the gateway receiving its last word to its publish
        self.finals_untimed = 0  # finals with no latency: no words, or their audio came before this worker had them
        self.decode_calls = RollingWindow(now)  # wall seconds of each decode call (a batch is one call)
        self.decode_by_kind: dict[str, RollingWindow] = {}  # per job kind: each job's share of its call

    def final(self, latency_s: float | None) -> None:
        """A final went out, `latency_s` after the gateway received the chunk holding its last word (None: unknown)."""
        self.finals += 1
        self.finals_last_min.add(1.0)
        if latency_s is None:
            self.finals_untimed += 1
        else:
            self.final_latency.add(latency_s)

    def decoded(self, kinds: list[str], seconds: float) -> None:
        """One decode call of `len(kinds)` jobs (kind: final, interim or speculative) that took `seconds`."""
        self.decode_calls.add(seconds)
        for kind in kinds:
            self.decode_by_kind.setdefault(kind, RollingWindow(self.now)).add(seconds / len(kinds))

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def rejection(self, reason: str) -> None:
        self.rejected[reason or "unknown"] += 1

    def decode_busy(self) -> float:
        """Share of the last minute (or of the time since start, if shorter) the decoder spent decoding."""
        span = min(WINDOW_S, max(1e-9, self.now() - self.started))
        return round(min(1.0, self.decode_calls.total / span), 3)

    def report(
        self, load: WorkerStats, sessions: list[SessionLoad], partitions: Iterable[int], **identity: object
    ) -> dict[str, object]:
        """`load`: the worker's `WorkerStats` now (what it publishes every second: sessions, backlog, decode totals
        since start, CPU, memory); `sessions`: its open sessions; `identity`: model, device."""
        by_kind = {kind: window for kind, window in sorted(self.decode_by_kind.items()) if window.count}
        return {
            "service": "transcriber",
            "worker_id": load.worker_id,
            **identity,
            "partitions": sorted(partitions),
            "sessions": load.sessions,
            "speaking": load.speaking,
            "tenants": _counts(Counter(s.tenant for s in sessions)),
            "session_list": [
                {"tenant": s.tenant, "session": s.session, "partition": s.partition, "backlog_s": round(s.backlog_s, 2)}
                for s in sorted(sessions, key=lambda s: -s.backlog_s)[:SESSIONS_LISTED]
            ],
            "backlog_s": round(load.backlog_s, 2),
            "backlog_max_s": round(load.backlog_max_s, 2),
            "finals_waiting_s": round(load.finals_waiting_s, 2),
            "decodes": {kind: msgspec.to_builtins(totals) for kind, totals in sorted(load.decodes.items())},
            "batches": load.batches,
            "batch_items": load.batch_items,
            "cpu_s": round(load.cpu_s, 2),
            "rss_bytes": load.rss_bytes,
            "decode_busy": self.decode_busy(),
            "decode_calls_last_min": self.decode_calls.count,
            "decode_s_last_min": {kind: round(window.total, 3) for kind, window in by_kind.items()},
            "decodes_last_min": {kind: window.count for kind, window in by_kind.items()},
            "finals": self.finals,
            "finals_last_min": self.finals_last_min.count,
            "finals_untimed": self.finals_untimed,
            "final_latency_s": self.final_latency.percentiles(50, 95),
            "errors": _counts(self.errors),
            "rejected": _counts(self.rejected),
        }


class PersisterActivity:
    """The persister: messages and rows written, write time, poison messages, and how far behind it is."""

    def __init__(self, now: Now, wall: Now):
        self.wall = wall
        self.messages = 0
        self.rows = 0
        self.retries = 0
        self.dropped: Counter[str] = Counter()
        self.writes = RollingWindow(now)  # seconds of each committed transaction
        self.rows_last_min = RollingWindow(now)  # rows of each committed transaction
        self.pending = 0  # messages the consumer still had for it at its last fetch
        self._oldest_in_hand: float | None = None  # stream time of the oldest fetched message not yet written

    def fetched(self, stored_at: list[float], pending: int) -> None:
        """A batch came in: its messages' stream timestamps, and the consumer's pending count after it."""
        self.pending = pending
        if stored_at:
            self._oldest_in_hand = min(stored_at)

    def handled(self) -> None:
        """The batch in hand is written (or dropped): nothing waits any more."""
        self._oldest_in_hand = None

    def written(self, messages: int, rows: int, seconds: float) -> None:
        self.messages += messages
        self.rows += rows
        self.writes.add(seconds)
        self.rows_last_min.add(rows)

    def retried(self) -> None:
        self.retries += 1

    def poison(self, code: str) -> None:
        self.dropped[code] += 1

    def report(self, **identity: object) -> dict[str, object]:
        behind = 0.0 if self._oldest_in_hand is None else max(0.0, self.wall() - self._oldest_in_hand)
        return {
            "service": "persister",
            **identity,
            "messages": self.messages,
            "rows": self.rows,
            "rows_last_min": int(self.rows_last_min.total),
            "transactions_last_min": self.writes.count,
            "write_latency_s": self.writes.percentiles(50, 95),
            "retries": self.retries,
            "dropped": _counts(self.dropped),
            "pending": self.pending,
            "behind_s": round(behind, 3),
        }
