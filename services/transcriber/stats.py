"""A worker's load for whoever watches it (bench/load.py): the audio its sessions still wait on, and what decoding
costs. Pure: the shell counts each decode in `DecodeCounters` and publishes `worker_stats(...)` every second."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from jetscribe.services.transcriber.core import SessionStream
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import DecodeTotals, WorkerStats

STATS_EVERY_S = 1.0  # a worker publishes its WorkerStats this often
DECODE_KINDS = ("final", "interim", "speculative")  # speculative: a final decoded before its endpoint was certain


class DecodeCounters:
    """Decodes since the worker started: count, seconds and audio by kind, and how they were batched."""

    def __init__(self) -> None:
        self.totals = {kind: DecodeTotals() for kind in DECODE_KINDS}
        self._items_by_batch_size: Counter[int] = Counter()

    def observe(self, kind: str, speculative: bool, batch_size: int, seconds: float, audio_s: float) -> None:
        """One decoded item (a `DecodeJob` of `kind`): `seconds` is the wall time of the call that decoded it with
        `batch_size - 1` others. Each item is charged its share, so the seconds add up to the time spent decoding."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        key = "speculative" if speculative else kind
        if key not in self.totals:
            raise ValueError(f"decode kind {kind!r}: expected final or interim")
        totals = self.totals[key]
        totals.count += 1
        totals.seconds += seconds / batch_size
        totals.audio_s += audio_s
        self._items_by_batch_size[batch_size] += 1

    @property
    def items(self) -> int:
        return sum(self._items_by_batch_size.values())

    @property
    def batches(self) -> int:
        """Decode calls: the items of each batch size over that size (a batch not wholly observed yet counts)."""
        return sum(-(-items // size) for size, items in self._items_by_batch_size.items())


def backlog_samples(stream: SessionStream[Any]) -> int:
    """Audio the session received that no final covers yet: from the start of its oldest utterance without a final
    (closed and waiting, or still open) to the last sample received; 0 between utterances."""
    starts = [u.start for u in stream.closed] + ([stream.open.start] if stream.open is not None else [])
    return stream.segmenter.received - min(starts) if starts else 0


def waiting_samples(stream: SessionStream[Any]) -> int:
    """Audio of the session's ended utterances whose final is not out yet. Unlike the backlog it holds no speech
    still going on: it stays near 0 while decoding keeps up, and grows when it does not."""
    return sum(u.end - u.start for u in stream.closed if u.end is not None)


def worker_stats(
    worker_id: str,
    streams: Iterable[SessionStream[Any]],
    counters: DecodeCounters,
    *,
    at: float,
    cpu_s: float,
    rss_bytes: int,
) -> WorkerStats:
    """The message a worker publishes: its open sessions' backlog and its decode totals, stamped `at` (wall time)."""
    live = [s for s in streams if not s.gone]
    backlogs = [backlog_samples(s) / SAMPLE_RATE for s in live]
    return WorkerStats(
        worker_id=worker_id,
        at=at,
        sessions=len(live),
        speaking=sum(1 for s in live if s.open is not None),
        backlog_s=sum(backlogs),
        backlog_max_s=max(backlogs, default=0.0),
        finals_waiting_s=sum(waiting_samples(s) for s in live) / SAMPLE_RATE,
        decodes={
            kind: DecodeTotals(count=t.count, seconds=t.seconds, audio_s=t.audio_s)
            for kind, t in counters.totals.items()
        },
        batches=counters.batches,
        batch_items=counters.items,
        cpu_s=cpu_s,
        rss_bytes=rss_bytes,
    )
