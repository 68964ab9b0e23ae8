"""When each chunk of a session arrived, and the trace it came in: what a segment's latency and trace are
measured from. No I/O.

The shell records every new chunk (`ChunkArrivals.add`) with the session sample its audio ends at, the wall time
the gateway received it (`AudioChunk.received_at`), the worker's monotonic time it arrived here, and the span
context its NATS headers carried. A segment then finds the chunk holding a word (`at`) and the chunks it covers
(`between`). Bounded: the shell drops what no segment can still need (`drop_before`), and at most `keep`
chunks are held whatever happens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from opentelemetry.trace import SpanContext

from jetscribe.shared.audio import SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Arrival:
    seq: int
    start: int  # session sample of the chunk's first sample
    end: int  # session sample after its last sample
    received_at: float  # wall time at the gateway; 0 if unknown
    arrived: float  # monotonic time at this worker
    context: SpanContext | None  # the span that stored it (the gateway's request), if its headers named one


class ChunkArrivals:
    """One session's recent chunk arrivals, in session-sample order."""

    def __init__(self, keep: int = 4096):
        self.keep = keep
        self.first_interim_seen = -1  # the last segment id whose first interim latency was measured
        self._chunks: list[Arrival] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._chunks)

    def add(self, arrival: Arrival) -> None:
        """A new chunk, after every chunk already held."""
        if self._ends and arrival.end <= self._ends[-1]:
            return  # not new audio
        self._chunks.append(arrival)
        self._ends.append(arrival.end)
        if len(self._chunks) > self.keep:
            del self._chunks[: -self.keep]
            del self._ends[: -self.keep]

    def at(self, sample: int) -> Arrival | None:
        """The chunk holding session sample `sample` (a sample on a boundary belongs to the chunk it ends)."""
        i = bisect.bisect_left(self._ends, sample)
        if i == len(self._chunks) or sample < self._chunks[i].start:
            return None  # not received yet, or forgotten
        return self._chunks[i]

    def at_time(self, seconds: float) -> Arrival | None:
        """The chunk holding session time `seconds` (a word's start or end)."""
        return self.at(round(seconds * SAMPLE_RATE))

    def of_seq(self, seq: int) -> Arrival | None:
        """Chunk `seq`, if still held."""
        for chunk in reversed(self._chunks):
            if chunk.seq == seq:
                return chunk
            if chunk.seq < seq:
                break
        return None

    def between(self, seq_first: int, seq_last: int, limit: int = 64) -> list[Arrival]:
        """The chunks of seqs `seq_first`..`seq_last` still held; the last `limit` of them."""
        chunks = [c for c in self._chunks if seq_first <= c.seq <= seq_last]
        return chunks[-limit:]

    def drop_before(self, sample: int) -> None:
        """Forget chunks ending at or before session sample `sample`."""
        i = bisect.bisect_right(self._ends, sample)
        if i:
            del self._chunks[:i]
            del self._ends[:i]
