"""One clock for the services, injectable so tests can move it.

`Clock.monotonic()` measures durations (idle timeouts, ages); `Clock.wall()` stamps what goes on the wire
(published_at, checkpoint times). `system_clock()` is the real one, its monotonic reading shifted by
`JETSCRIBE_CLOCK_OFFSET_S` seconds if that variable is set: a test aid, so that code comparing a monotonic
reading with a zero default (a session "idle since boot") fails on every test host, not only on hosts up
for a long time. Wall time is never shifted: other processes compare it with theirs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_OFFSET_ENV = "JETSCRIBE_CLOCK_OFFSET_S"


@dataclass(frozen=True)
class Clock:
    """The system clocks; `offset_s` is added to monotonic readings only."""

    offset_s: float = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s

    def wall(self) -> float:
        return time.time()


def system_clock() -> Clock:
    """The real clock, offset by $JETSCRIBE_CLOCK_OFFSET_S (tests set it; unset in production)."""
    return Clock(float(os.environ.get(CLOCK_OFFSET_ENV) or 0.0))


class ManualClock:
    """A clock that moves only when told (unit tests); starts ten days in, far from zero."""

    def __init__(self, start_s: float = 10 * 24 * 3600.0, wall_start_s: float = 1_790_000_000.0):
        self._now = start_s
        self._wall_offset = wall_start_s - start_s

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._now += seconds
