"""Audio evidence for the word guards: which frames the VAD heard as speech, and how loud they were
against the session's noise floor.

The segmenter records every frame as it classifies it (`SpeechRecord.add`); a decode job carries the
`AudioEvidence` of its span, so the guards can ask "is there speech under these words?" of the audio as
well as of Whisper's own scores.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice

import numpy as np

from jetscribe.shared.audio import SAMPLE_RATE

SILENT_DB = -90.0  # dBFS given to digital silence, so differences stay finite
FLOOR_WINDOW_S = 30.0  # the noise floor is taken over this much recent audio
FLOOR_PERCENTILE = 10.0  # the quietest tenth of the frames: the pauses, even in a talkative stretch
MIN_FLOOR_S = 1.5  # with less audio heard (a new or restored session) the floor is unknown
LOUD_PERCENTILE = 90.0  # a span's level: its loud frames, as speech is bursty


def frame_db(frame: np.ndarray) -> float:
    """The level of int16 samples in dBFS."""
    power = float(np.mean(frame.astype(np.float32) ** 2)) / 32768.0**2 if len(frame) else 0.0
    return max(SILENT_DB, 10.0 * float(np.log10(power))) if power > 0 else SILENT_DB


@dataclass(frozen=True)
class AudioEvidence:
    """The VAD's verdict and the level of each frame of a stretch of session audio, and the session's
    noise floor when it was taken. Times are seconds of session audio."""

    start: int  # session sample where frame 0 begins
    frame_samples: int
    speech: tuple[bool, ...]
    level_db: tuple[float, ...]
    noise_floor_db: float | None  # None: too little audio heard to know it

    def _frames(self, t0: float, t1: float) -> slice:
        first = int((t0 * SAMPLE_RATE - self.start) // self.frame_samples)
        last = int(-((self.start - t1 * SAMPLE_RATE) // self.frame_samples))  # ceil: frames overlapping t1
        first, last = max(first, 0), min(max(last, first + 1), len(self.speech))
        return slice(first, max(first, last))

    def coverage(self, t0: float, t1: float) -> float:
        """The share of the frames overlapping [t0, t1] that the VAD heard as speech (0 if none known)."""
        flags = self.speech[self._frames(t0, t1)]
        return sum(flags) / len(flags) if flags else 0.0

    def snr_db(self, t0: float, t1: float) -> float | None:
        """How far the loud frames of [t0, t1] stand above the noise floor; None if either is unknown."""
        levels = self.level_db[self._frames(t0, t1)]
        if not levels or self.noise_floor_db is None:
            return None
        return float(np.percentile(levels, LOUD_PERCENTILE)) - self.noise_floor_db


class SpeechRecord:
    """Per frame of the buffered audio: did the VAD hear speech, and how loud was it. Also the levels of
    the last `FLOOR_WINDOW_S` of audio, buffered or not, for the session's noise floor."""

    def __init__(self, frame_samples: int):
        self.frame_samples = frame_samples
        self.start = 0  # session sample where the first recorded frame begins
        self._speech: deque[bool] = deque()
        self._level: deque[float] = deque()
        self._recent: deque[float] = deque(maxlen=int(FLOOR_WINDOW_S * SAMPLE_RATE / frame_samples))

    def add(self, frame: np.ndarray, speech: bool) -> None:
        """The next frame, as the VAD classified it."""
        level = frame_db(frame)
        self._speech.append(speech)
        self._level.append(level)
        self._recent.append(level)

    def restore(self, position: int) -> None:
        """Empty, with the next frame at session sample `position` (a restored session)."""
        self.start = position
        self._speech.clear()
        self._level.clear()
        self._recent.clear()

    def drop_before(self, index: int) -> None:
        """Forget the frames that end at or before session sample `index`."""
        while self._speech and self.start + self.frame_samples <= index:
            self._speech.popleft()
            self._level.popleft()
            self.start += self.frame_samples

    def noise_floor_db(self) -> float | None:
        if len(self._recent) * self.frame_samples < MIN_FLOOR_S * SAMPLE_RATE:
            return None
        return float(np.percentile(np.fromiter(self._recent, dtype=np.float64), FLOOR_PERCENTILE))

    def evidence(self, start: int, end: int) -> AudioEvidence:
        """The evidence for session samples [start, end): every recorded frame overlapping it."""
        first = max(0, (start - self.start) // self.frame_samples)
        last = min(len(self._speech), max(first, -(-(end - self.start) // self.frame_samples)))
        return AudioEvidence(
            start=self.start + first * self.frame_samples,
            frame_samples=self.frame_samples,
            speech=tuple(islice(self._speech, first, last)),
            level_db=tuple(islice(self._level, first, last)),
            noise_floor_db=self.noise_floor_db(),
        )
