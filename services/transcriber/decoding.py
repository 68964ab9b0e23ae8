"""What goes to Whisper and what comes back: decode jobs, their results, the decode cost, and which
session decodes next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.evidence import AudioEvidence

if TYPE_CHECKING:
    from jetscribe.services.transcriber.core import SessionStream

M = TypeVar("M")  # the message handle of the streams (see core.SessionStream)
JobKind = Literal["final", "interim"]


@dataclass
class Decoded:
    segments: list[DecodedSegment]
    language: str | None = None
    language_probability: float = 0.0


@dataclass(frozen=True)
class DecodeJob:
    kind: JobKind
    audio: np.ndarray  # float32, 16 kHz mono
    start_sample: int  # session sample index of audio[0]
    end_sample: int
    language: str | None
    prompt: str
    beam_size: int
    speech_end_sample: int = 0  # where the VAD last heard speech; words after it are suspect
    window: Literal["full", "short"] = "full"  # encoder window: short is cheaper, full is more accurate
    speculative: bool = False  # a final decoded before its endpoint is certain
    evidence: AudioEvidence | None = None  # the VAD's verdict and levels of its audio, for the word guards


class DecodeLoad:
    """Recent decode cost, to slow interims down when the worker is busy: interims of all speaking
    sessions together may take at most half of the decode loop, so finals never queue behind them."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.interim_s = 0.0

    def observe(self, job: DecodeJob, seconds: float) -> None:
        if job.kind == "interim":
            self.interim_s = (
                seconds if not self.interim_s else (self.smoothing * seconds + (1 - self.smoothing) * self.interim_s)
            )

    def interim_every(self, fastest_s: float, speaking_sessions: int) -> float:
        """Seconds of new speech between two interims of one session."""
        return max(fastest_s, 2.0 * speaking_sessions * self.interim_s)


def pick_next(streams: list[SessionStream[M]], interim_every_s: float | None = None) -> SessionStream[M] | None:
    """Which session decodes next: the oldest pending final first, then a paused utterance's
    speculative final, then the most starved interim."""
    finals = [(s.final_due_since(), i) for i, s in enumerate(streams) if s.final_due_since() is not None]
    if finals:
        return streams[min(finals)[1]]
    paused = [s for s in streams if s.speculation_due()]
    if paused:
        return paused[0]
    interims = [s for s in streams if s.interim_due(interim_every_s)]
    if interims:
        return max(interims, key=lambda s: s.interim_backlog)
    return None
