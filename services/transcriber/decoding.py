"""What goes to Whisper and what comes back: decode jobs, their results, and the decode cost."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.transcriber.agreement import DecodedSegment


@dataclass
class Decoded:
    segments: list[DecodedSegment]
    language: str | None = None
    language_probability: float = 0.0


@dataclass(frozen=True)
class DecodeJob:
    kind: Literal["final", "interim"]
    audio: np.ndarray  # float32, 16 kHz mono
    start_sample: int  # session sample index of audio[0]
    end_sample: int
    language: str | None
    prompt: str
    beam_size: int
    speech_end_sample: int = 0  # where the VAD last heard speech; words after it are suspect
    window: Literal["full", "short"] = "full"  # encoder window: short is cheaper, full is more accurate
    speculative: bool = False  # a final decoded before its endpoint is certain


class DecodeLoad:
    """Recent decode cost, to slow interims down when the worker is busy: interims of all speaking
    sessions together may take at most half of the decode loop, so finals never queue behind them."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.interim_s = 0.0

    def observe(self, job: DecodeJob, seconds: float) -> None:
        if job.kind == "interim":
            self.interim_s = seconds if not self.interim_s else (
                self.smoothing * seconds + (1 - self.smoothing) * self.interim_s)

    def interim_every(self, fastest_s: float, speaking_sessions: int) -> float:
        """Seconds of new speech between two interims of one session."""
        return max(fastest_s, 2.0 * speaking_sessions * self.interim_s)
