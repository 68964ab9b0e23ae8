"""Voice activity detection: which frames of a session's audio hold speech.

A detector owns its frame size; the segmenter reads `frame_samples` and never assumes one.
Three detectors: `WebrtcVoiceDetector` (`JETSCRIBE_VAD=webrtc`: webrtcvad, cheap and better than Silero on clean
speech and phone lines, but it hears steady noise as speech, so there the segmenter's level gate decides, and at a
low SNR cannot), `SileroVoiceDetector` (`JETSCRIBE_VAD=silero`: faster-whisper's copy of Silero VAD v6, a small
neural model that tells speech from hum, line noise and other steady noise, at about 30x the CPU) and
`HybridVoiceDetector` (the default, `JETSCRIBE_VAD=hybrid`: webrtcvad, and Silero beside it only where webrtcvad
calls every frame speech for 12 s, i.e. steady noise; elsewhere it is webrtcvad, frame for frame, and Silero's CPU
goes to the sessions that need it). None tells the speaker from background talk: the segmenter's noise-floor gate
does that. README ("Configuration") says how to choose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import webrtcvad

from jetscribe.services.transcriber.levels import RecentPauses
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


class HybridVoiceDetector:
    """webrtcvad, and Silero only where webrtcvad hears steady noise as speech: 30 ms frames (webrtcvad's).

    webrtcvad alone decides until it has called every frame speech for `enter_s`. Speech, even in a reverberant
    room, leaves frames webrtcvad calls no speech; steady noise at a low SNR (pink, speech-shaped) leaves none. Then,
    in "steady-noise mode", a frame is speech only if Silero agrees too (webrtcvad AND Silero). Silero runs on its
    own 512-sample windows over the same audio (the samples of each 480-sample frame are queued; each whole window
    is scored as it fills, and the latest verdict applies to the frame), warmed up on the last `warm_s` of audio on
    entering so its recurrent state is not cold. The mode ends when webrtcvad hears `leave_pauses` pauses
    (`pause_s` of no speech) within `enter_s` that Silero hears too (the noise stopped); one could be a fluke of the
    noise. On the devset webrtcvad called every frame speech for at most 6.7 s in clean, phone, Opus, quiet and
    crosstalk audio, 10.6 s in a room and 11.2 s in babble at 10 dB SNR, and for the whole file in steady noise at
    0.3-10 dB SNR (README, "Configuration"). Per session, like the others; `frames` and `silero_frames` count the
    frames classified and those Silero had a say in, so its CPU shows (`silero_share`)."""

    frame_samples = WebrtcVoiceDetector.frame_samples

    def __init__(
        self,
        model: SileroModel,
        threshold: float = 0.3,
        aggressiveness: int = 2,
        enter_s: float = 12.0,
        warm_s: float = 1.0,
        pause_s: float = 0.25,
        leave_pauses: int = 2,
    ):
        self.webrtc = WebrtcVoiceDetector(aggressiveness)
        self.model, self.threshold = model, threshold
        self.silero: SileroVoiceDetector | None = None  # while in steady-noise mode
        SileroVoiceDetector(model, threshold)  # a bad threshold fails here
        self._enter_frames = max(1, round(enter_s * SAMPLE_RATE / self.frame_samples))
        self.leave_pauses = leave_pauses
        # pauses both heard in the mode (one reaching `pause_s` outside it is not counted), within `enter_s`
        self._pauses = RecentPauses(self.frame_samples, pause_s, enter_s)
        self.entries = 0  # times it entered steady-noise mode
        self._warm = max(1, round(warm_s * SAMPLE_RATE / SileroModel.WINDOW)) * SileroModel.WINDOW
        self._recent = np.zeros(self._warm, dtype=np.int16)  # a ring: the last `_warm` samples heard
        self._heard = 0  # samples heard (how much of `_recent` is audio)
        self._queue = np.zeros(0, dtype=np.int16)  # samples not yet in a Silero window
        self._all_speech = 0  # webrtcvad frames in a row with speech
        self.frames = 0
        self.silero_frames = 0

    @property
    def steady_noise(self) -> bool:
        """In steady-noise mode: Silero has a say."""
        return self.silero is not None

    @property
    def silero_share(self) -> float:
        """The share of frames classified with Silero's say (its CPU: tens of times webrtcvad's per frame)."""
        return self.silero_frames / self.frames if self.frames else 0.0

    def is_speech(self, frame: np.ndarray) -> bool:
        self.frames += 1
        self._remember(frame)
        webrtc = self.webrtc.is_speech(frame)
        self._all_speech = self._all_speech + 1 if webrtc else 0
        if self.silero is None:
            if self._all_speech < self._enter_frames:
                self._pauses.add(webrtc, counts=False)
                return webrtc
            self._enter()
        else:
            self._queue = np.concatenate([self._queue, frame.astype(np.int16, copy=False)])
        silero = self._score()
        self.silero_frames += 1
        self._pauses.add(webrtc, counts=not silero)  # a pause both hear
        if len(self._pauses) >= self.leave_pauses:  # the noise is gone: webrtcvad alone again
            self.silero, self._queue = None, self._queue[:0]
            self._pauses.clear()
        return webrtc and silero

    def _remember(self, frame: np.ndarray) -> None:
        """Keep the frame in the ring of the last `_warm` samples (for a warm-up, if Silero wakes)."""
        size, n, at = len(self._recent), len(frame), self._heard % len(self._recent)
        first = min(n, size - at)
        self._recent[at : at + first] = frame[:first]
        self._recent[: n - first] = frame[first:]
        self._heard += n

    def _enter(self) -> None:
        """Silero from a fresh state, warmed up on the last `warm_s` heard (whole windows, ending now)."""
        self.silero = SileroVoiceDetector(self.model, self.threshold)
        self.entries += 1
        at = self._heard % len(self._recent)
        recent = np.concatenate([self._recent[at:], self._recent[:at]])  # oldest first
        warm = min(self._heard, self._warm) // SileroModel.WINDOW * SileroModel.WINDOW
        self._queue = recent[len(recent) - warm :]

    def _score(self) -> bool:
        """Silero's verdict after every whole window queued (its latest; the last one if none is whole yet)."""
        assert self.silero is not None
        window = SileroModel.WINDOW
        whole = len(self._queue) // window * window
        for i in range(0, whole, window):
            self.silero.is_speech(self._queue[i : i + window])
        self._queue = self._queue[whole:]
        return self.silero.speaking


VAD_KINDS = ("hybrid", "silero", "webrtc")


def detector_maker(kind: str, *, threshold: float = 0.3, aggressiveness: int = 2) -> Callable[[], VoiceDetector]:
    """What makes each new session's detector: `kind` "silero" (one model loaded now, shared by all), "webrtc"
    (`aggressiveness` 0-3) or "hybrid" (webrtcvad, and Silero where webrtcvad calls every frame speech: both)."""
    if kind == "silero":
        model = SileroModel()
        SileroVoiceDetector(model, threshold)  # a bad threshold fails here, at start-up
        return lambda: SileroVoiceDetector(model, threshold)
    if kind == "hybrid":
        model = SileroModel()
        HybridVoiceDetector(model, threshold, aggressiveness)
        return lambda: HybridVoiceDetector(model, threshold, aggressiveness)
    if kind == "webrtc":
        WebrtcVoiceDetector(aggressiveness)
        return lambda: WebrtcVoiceDetector(aggressiveness)
    raise ValueError(f"JETSCRIBE_VAD is {kind!r}: use one of {', '.join(VAD_KINDS)}")
