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

    def headroom_db(self, loud_percentile: float = 90.0) -> float:
        """How far the loud frames of the window (speech, if any) stand above the floor."""
        return sorted_percentile(self._sorted, loud_percentile) - self.db if self._sorted else 0.0


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


class RecentPauses:
    """The pauses a VAD heard lately: runs of at least `pause_s` of frames it called no speech, each counted once
    (when it reaches `pause_s`), for `window_s` after that."""

    def __init__(self, frame_samples: int, pause_s: float, window_s: float):
        self._pause_frames = max(1, round(pause_s * SAMPLE_RATE / frame_samples))
        self._window = max(1, round(window_s * SAMPLE_RATE / frame_samples))
        self._frames = 0  # frames added
        self._no_speech_run = 0  # frames in a row the VAD called no speech
        self._ends: deque[int] = deque()  # the frame at which each recent pause became long enough

    def add(self, speech: bool, counts: bool = True) -> None:
        """One frame's verdict; `counts`: whether a pause reaching `pause_s` at this frame is counted."""
        self._frames += 1
        self._no_speech_run = 0 if speech else self._no_speech_run + 1
        if self._no_speech_run == self._pause_frames and counts:
            self._ends.append(self._frames)
        while self._ends and self._ends[0] <= self._frames - self._window:
            self._ends.popleft()

    def __len__(self) -> int:
        return len(self._ends)

    def clear(self) -> None:
        self._ends.clear()


class BackgroundTalk:
    """Whether the VAD hears the background as speech: the share of the last `window_s`'s background frames
    (within `near_db` of the noise floor) that it called speech. Steady noise, which a good VAD rejects,
    stays near 0; babble, other people talking behind the speaker, is near 1.

    At a low SNR, though, the speaker's own frames sit near the floor too, and a VAD that rightly calls them speech
    makes a talkative speaker in steady noise look like babble. `pauses_heard` tells that case apart: the VAD
    heard the background as no speech in `pauses` separate pauses (runs of at least `pause_s` of frames it called
    no speech) within the last `pauses_window_s`, so it can tell this background from speech. Babble leaves none."""

    def __init__(
        self,
        frame_samples: int,
        window_s: float = 5.0,
        near_db: float = 2.0,
        share: float = 0.7,
        pause_s: float = 0.25,
        pauses: int = 2,
        pauses_window_s: float = 15.0,
    ):
        self._verdicts: deque[bool] = deque(maxlen=max(1, round(window_s * SAMPLE_RATE / frame_samples)))
        self._least = max(1, round(0.5 * SAMPLE_RATE / frame_samples))  # background heard before judging it
        self.near_db, self.share = near_db, share
        self._pauses = RecentPauses(frame_samples, pause_s, pauses_window_s)
        self.pauses = pauses

    def add(self, level: float, floor: float, speech: bool) -> None:
        """One frame: its level, the noise floor, and the VAD's own verdict (not a gated one)."""
        self._pauses.add(speech)
        if level <= floor + self.near_db and level > SILENCE_DB:
            self._verdicts.append(speech)

    @property
    def pauses_heard(self) -> bool:
        """True if the VAD heard `pauses` pauses in the background lately."""
        return len(self._pauses) >= self.pauses

    @property
    def heard(self) -> bool:
        """True while most of the recent background was called speech."""
        n = len(self._verdicts)
        return n >= self._least and sum(self._verdicts) >= self.share * n
