"""What goes to Whisper and what comes back: decode jobs, their results, the decode cost, and which
session decodes next."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import numpy as np

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.evidence import AudioEvidence
from jetscribe.services.transcriber.voices import VoicePiece
from jetscribe.shared.audio import SAMPLE_RATE

T = TypeVar("T")  # whatever the caller schedules (a session, its record)
JobKind = Literal["final", "interim"]

FULL_WINDOW_FRAMES = 3000
FRAMES_PER_SECOND = 100
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAMES_PER_SECOND

# Encoder windows a batch may use, in frames (10 ms each). A short-window job takes the smallest that holds
# `window_frames` of its audio, so that jobs of similar length share a call and each job's window depends on
# its own audio only, never on its neighbours in a batch.
BATCH_WINDOWS = (1000, 1500, 2000, 2500, FULL_WINDOW_FRAMES)


def window_frames(audio_samples: int, fill: float = 2 / 3, step: int = 100, least: int = 1000) -> int:
    """Encoder frames for this much audio: enough that the audio fills at most `fill` of them, and
    never fewer than `least` (10 s): on tiny windows Whisper loops more often, and saves little."""
    needed = audio_samples / SAMPLES_PER_FRAME / fill
    return min(FULL_WINDOW_FRAMES, max(least, int(-(-needed // step) * step)))


def batch_frames(audio_samples: int, window: str) -> int:
    """The encoder frames a job gets in a batch: the full 30 s window, or the smallest of `BATCH_WINDOWS`
    that holds the short window its audio needs."""
    if window == "full":
        return FULL_WINDOW_FRAMES
    needed = window_frames(audio_samples)
    return next(w for w in BATCH_WINDOWS if w >= needed)


class BatchKey(NamedTuple):
    """Jobs that can share one call: the same encoder frames, beam and language."""

    frames: int
    beam_size: int
    language: str


@dataclass
class Decoded:
    segments: list[DecodedSegment]
    language: str | None = None
    language_probability: float = 0.0
    voices: tuple[VoicePiece, ...] = ()  # voice embeddings of the job's audio (speakers from the audio), if any


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


@dataclass(frozen=True)
class JobPlan:
    """The job a session would hand out next (`SessionStream.peek_job`), described but not taken."""

    kind: JobKind
    speculative: bool
    samples: int  # audio length
    beam_size: int
    window: Literal["full", "short"]
    language: str | None
    urgency: tuple[int, float]  # lower first: (0, closed at) finals, (1, 0) early finals, (2, -backlog) interims
    prompt: str = ""  # the context words the job will carry

    @classmethod
    def of(cls, job: DecodeJob) -> JobPlan:
        """The plan of a job already handed out (its urgency no longer matters)."""
        return cls(
            job.kind, job.speculative, len(job.audio), job.beam_size, job.window, job.language, (0, 0.0), job.prompt
        )

    @property
    def key(self) -> BatchKey | None:
        """Jobs with equal keys can share one decode call; None: this job is decoded alone."""
        if self.language is None:  # its language is detected first, per job
            return None
        return BatchKey(batch_frames(self.samples, self.window), self.beam_size, self.language)


def plan_batch(
    plans: Sequence[tuple[T, JobPlan]], max_batch: int, key: Callable[[JobPlan], Hashable | None] | None = None
) -> list[T]:
    """Which sessions decode together next: the most urgent job (the oldest final, else a paused utterance's
    early final, else the most starved interim) and, up to `max_batch` in all, the next most urgent jobs that
    share its key (`JobPlan.key` unless `key` says more, as the decoder does: its prompts must be of one length
    in tokens). Finals and interims use different beams, so they never share a call: finals go first. A None
    key decodes alone."""
    if not plans:
        return []
    key_of = key or (lambda plan: plan.key)
    ordered = sorted(plans, key=lambda entry: entry[1].urgency)  # stable: ties keep the given order
    first, plan = ordered[0]
    wanted = key_of(plan)
    if wanted is None:
        return [first]
    return [who for who, other in ordered if key_of(other) == wanted][: max(1, max_batch)]
