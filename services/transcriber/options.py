"""The tuning of a session: how utterances are cut and decoded, and what a worker allows a session."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from jetscribe.shared.wire import SessionOptions

CHECKPOINT_EVERY_S = 2.0  # of accounted-for silence between finals
MAX_DECODE_ATTEMPTS = 3  # then the utterance is given up (an empty final), not the session


@dataclass(frozen=True)
class CommitOptions:
    endpoint_silence_s: float | None = 0.5  # None: no silence endpoints (the length cap, a finalize, the end)
    max_utterance_s: float = 15.0
    interim_every_s: float = 1.0  # the fastest interim rate; under load it is slowed (`DecodeLoad`)
    first_interim_s: float = 0.6  # speech heard before an utterance's first interim
    speculate_after_s: float = 0.2  # pause after which the final is decoded ahead of the endpoint
    sentence_endpoint_s: float = 0.0  # >0: an early final this long that ends a sentence ends its utterance
    # >0: speech with no pause is committed at a sentence end the interims confirmed, this long after its start
    commit_sentences_after_s: float = 0.0  # off by default: bench/accuracy.py found repeats and later finals (README)
    min_speech_s: float = 0.15  # shorter bursts (clicks, breaths) are dropped without decoding
    # Where the VAD hears the background as speech (levels.BackgroundTalk), speech must also be this far above
    # the session's noise floor (levels.NoiseFloor); 0: never.
    speech_above_floor_db: float = 5.0
    preroll_s: float = 0.3  # audio kept before the first speech frame, so onsets aren't clipped
    tail_pad_s: float = 0.2  # silence kept after the last speech frame
    beam_size: int = 5
    interim_beam_size: int = 1
    final_window: Literal["full", "short"] = "full"  # bench/windows.py: short costs base accuracy, not tiny's
    prompt_words: int = 40
    interim_results: bool = True  # False: no interim decodes, no interim segments
    utterance_end_s: float | None = None  # publish `utterance_end` after this long without a new word (None: never)
    vad_events: bool = False  # publish `speech_started` where speech opens an utterance

    def for_session(self, asked: SessionOptions) -> CommitOptions:
        """These options with what a session's start asked for (`SessionControl.options`) in place of the worker's."""
        endpoint = self.endpoint_silence_s
        if asked.endpointing_ms is not None:
            endpoint = None if asked.endpointing_ms is False else asked.endpointing_ms / 1000
        utterance_end = None if asked.utterance_end_ms is None else asked.utterance_end_ms / 1000
        return replace(
            self,
            endpoint_silence_s=endpoint,
            interim_results=asked.interim_results,
            utterance_end_s=utterance_end,
            vad_events=asked.vad_events,
        )


@dataclass(frozen=True)
class SessionLimits:
    """What a worker allows a session, and how often it saves it."""

    max_sessions: int = 50  # per worker; a new session beyond it is rejected ("worker_full")
    max_buffered_s: float = 120.0  # audio held before the session is rejected ("buffer_full")
    idle_timeout_s: float = 1800.0  # no audio for this long (from its opening on): flushed and ended
    checkpoint_every_s: float = CHECKPOINT_EVERY_S
    max_decode_attempts: int = MAX_DECODE_ATTEMPTS
