"""Frame levels and the session's noise floor: how loud each VAD frame is, and how loud the background is.

Levels are RMS in dBFS relative to a full-scale int16 DC (32768), floored at `SILENCE_DB` so digital
silence has a number. The noise floor is a low percentile of the last few seconds' frame levels: speech
leaves gaps between words, so the quietest fifth of any few seconds is background, whatever is said.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

import numpy as np

from jetscribe.shared.audio import SAMPLE_RATE

SILENCE_DB = -100.0  # the level of digital silence (and the floor before any audio)


def level_db(samples: np.ndarray) -> float:
    """RMS level of int16 `samples` in dBFS (SILENCE_DB for none or silence)."""
    if len(samples) == 0:
        return SILENCE_DB
    power = float(np.mean(np.square(samples, dtype=np.float64))) / 32768.0**2
    return max(SILENCE_DB, 10 * math.log10(power)) if power > 0 else SILENCE_DB


class NoiseFloor:
    """A low percentile of the frame levels of the last `window_s`: steady noise (hum, line noise, babble)
    sets it, and speech, which leaves gaps between words and turns, does not lift it.

    The window is also kept sorted, so each frame costs an insertion and a removal instead of a percentile over
    the whole window (`sorted_percentile` gives np.percentile's number, to the bit)."""

    def __init__(self, frame_samples: int, window_s: float = 3.0, percentile: float = 20.0):
        self._levels: deque[float] = deque(maxlen=max(1, round(window_s * SAMPLE_RATE / frame_samples)))
        self._sorted: list[float] = []
        self.percentile = percentile
        self.db = SILENCE_DB

    def add(self, level: float) -> None:
        if len(self._levels) == self._levels.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._levels[0])]  # the level leaving the window
        self._levels.append(level)
        bisect.insort(self._sorted, level)
        self.db = sorted_percentile(self._sorted, self.percentile)


def sorted_percentile(values: list[float], percentile: float) -> float:
    """np.percentile(values, percentile) of sorted, non-empty `values`, computed as numpy does (its default
    "linear" method, the same float operations in the same order), so the result is the same number."""
    count = len(values)
    virtual = (count - 1) * (percentile / 100)
    if virtual >= count - 1:
        return values[-1]
    below = math.floor(virtual)
    weight = virtual - below
    low, high = values[below], values[below + 1]
    step = high - low
    return high - step * (1 - weight) if weight >= 0.5 else low + step * weight


class FrameLevels:
    """The level of every VAD frame still buffered, by session sample, for questions about a span."""

    def __init__(self, frame_samples: int):
        self.frame = frame_samples
        self.start = 0  # session sample where the first kept frame starts
        self._levels: deque[float] = deque()

    def restart(self, position: int) -> None:
        """Nothing kept; the next frame starts at session sample `position`."""
        self.start, self._levels = position, deque()

    def add(self, level: float) -> None:
        self._levels.append(level)

    def drop_before(self, position: int) -> None:
        while self._levels and self.start + self.frame <= position:
            self._levels.popleft()
            self.start += self.frame

    def span(self, start: int, end: int) -> list[float]:
        """Levels of the kept frames that overlap session samples [start, end)."""
        first = max(0, (start - self.start) // self.frame)
        last = min(len(self._levels), -(-(end - self.start) // self.frame))
        return [self._levels[i] for i in range(first, last)]

    def span_db(self, start: int, end: int) -> float:
        """Mean power of the kept frames overlapping [start, end), in dBFS (SILENCE_DB if none)."""
        levels = self.span(start, end)
        if not levels:
            return SILENCE_DB
        power = sum(10 ** (db / 10) for db in levels) / len(levels)
        return max(SILENCE_DB, 10 * math.log10(power))


class BackgroundTalk:
    """Whether the VAD hears the background as speech: the share of the last `window_s`'s background frames
    (within `near_db` of the noise floor) that it called speech. Steady noise, which a good VAD rejects,
    stays near 0; babble, other people talking behind the speaker, is near 1."""

    def __init__(self, frame_samples: int, window_s: float = 5.0, near_db: float = 2.0, share: float = 0.7):
        self._verdicts: deque[bool] = deque(maxlen=max(1, round(window_s * SAMPLE_RATE / frame_samples)))
        self._least = max(1, round(0.5 * SAMPLE_RATE / frame_samples))  # background heard before judging it
        self.near_db, self.share = near_db, share

    def add(self, level: float, floor: float, speech: bool) -> None:
        if level <= floor + self.near_db and level > SILENCE_DB:
            self._verdicts.append(speech)

    @property
    def heard(self) -> bool:
        """True while most of the recent background was called speech."""
        n = len(self._verdicts)
        return n >= self._least and sum(self._verdicts) >= self.share * n
