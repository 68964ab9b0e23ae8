"""Voice activity detection: which frames of a session's audio hold speech.

A detector owns its frame size; the segmenter reads `frame_samples` and never assumes one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import webrtcvad

from jetscribe.shared.audio import SAMPLE_RATE


class VoiceDetector(Protocol):
    """Classifies fixed-size frames of 16 kHz mono int16 audio, one session's frames in order."""

    frame_samples: int

    def is_speech(self, frame: np.ndarray) -> bool:
        """True if this frame (exactly `frame_samples` int16 samples) holds speech."""
        ...


class WebrtcVoiceDetector:
    """webrtcvad on 30 ms frames. It keeps state between frames, so each session needs its own."""

    frame_samples = 480  # 30 ms at 16 kHz, a frame size webrtcvad accepts

    def __init__(self, aggressiveness: int = 2):
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: np.ndarray) -> bool:
        speech: bool = self._vad.is_speech(frame.astype("<i2", copy=False).tobytes(), SAMPLE_RATE)  # untyped module
        return speech
