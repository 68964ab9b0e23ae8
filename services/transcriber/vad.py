"""Voice activity detection: which frames of a session's audio hold speech.

A detector owns its frame size; the segmenter reads `frame_samples` and never assumes one.
Two detectors: `WebrtcVoiceDetector` (the default, `JETSCRIBE_VAD=webrtc`: webrtcvad, cheap and the better of the
two on clean speech and phone lines, but it hears steady noise as speech, so there the segmenter's level gate
decides) and `SileroVoiceDetector` (`JETSCRIBE_VAD=silero`: faster-whisper's copy of Silero VAD v6, a small neural
model that tells speech from hum, line noise and other steady noise, at about 30x the CPU). Neither tells the
speaker from background talk: the segmenter's noise-floor gate does that. README ("Configuration") says how to
choose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

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


class SileroModel:
    """Silero VAD v6 as one ONNX Runtime session, shared by every session's detector in the process
    (each detector keeps its own state). One thread: the VAD must not compete with Whisper for cores."""

    WINDOW = 512  # samples per call at 16 kHz, the only window the model takes
    CONTEXT = 64  # samples of the previous window given again with each call
    STATE_SHAPE = (1, 1, 128)

    def __init__(self, path: str | None = None):
        import onnxruntime

        if path is None:
            from faster_whisper.utils import get_assets_path

            path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self._session: Any = onnxruntime.InferenceSession(
            path, providers=["CPUExecutionProvider"], sess_options=options
        )

    def speech_probability(
        self, window: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """P(speech) of one (1, CONTEXT + WINDOW) float32 input, and the state after it."""
        out, h, c = self._session.run(None, {"input": window, "h": h, "c": c})
        return float(out.reshape(-1)[0]), h, c


class SileroVoiceDetector:
    """Silero VAD on 32 ms frames with Silero's own hysteresis: speech starts when the probability
    reaches `threshold` and lasts until it falls below `threshold - RELEASE`. Per session: the model's
    state, the last samples (its context) and whether speech is on."""

    frame_samples = SileroModel.WINDOW
    RELEASE = 0.15  # Silero's get_speech_timestamps uses threshold - 0.15 as the end of speech

    def __init__(self, model: SileroModel, threshold: float = 0.3):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"the Silero threshold must be between 0 and 1, not {threshold}")
        self.model = model
        self.threshold = threshold
        self.release = max(0.01, threshold - self.RELEASE)
        self.probability = 0.0  # of the last frame
        self.speaking = False
        self._h = np.zeros(SileroModel.STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(SileroModel.STATE_SHAPE, dtype=np.float32)
        self._input = np.zeros((1, SileroModel.CONTEXT + SileroModel.WINDOW), dtype=np.float32)

    def is_speech(self, frame: np.ndarray) -> bool:
        context = SileroModel.CONTEXT
        self._input[0, :context] = self._input[0, -context:]
        self._input[0, context:] = frame.astype(np.float32) / 32768.0
        self.probability, self._h, self._c = self.model.speech_probability(self._input, self._h, self._c)
        if self.probability >= self.threshold:
            self.speaking = True
        elif self.probability < self.release:
            self.speaking = False
        return self.speaking


VAD_KINDS = ("silero", "webrtc")


def detector_maker(kind: str, *, threshold: float = 0.3, aggressiveness: int = 2) -> Callable[[], VoiceDetector]:
    """What makes each new session's detector: `kind` "silero" (one model loaded now, shared by all) or
    "webrtc" (`aggressiveness` 0-3)."""
    if kind == "silero":
        model = SileroModel()
        SileroVoiceDetector(model, threshold)  # a bad threshold fails here, at start-up
        return lambda: SileroVoiceDetector(model, threshold)
    if kind == "webrtc":
        WebrtcVoiceDetector(aggressiveness)
        return lambda: WebrtcVoiceDetector(aggressiveness)
    raise ValueError(f"JETSCRIBE_VAD is {kind!r}: use one of {', '.join(VAD_KINDS)}")
