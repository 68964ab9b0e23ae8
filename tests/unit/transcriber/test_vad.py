"""The voice detectors: Silero streamed frame by frame as faster-whisper runs it on whole files, its hysteresis,
per-session state, and how the transcriber makes them."""

import numpy as np
import pytest
from faster_whisper.vad import get_vad_model

from jetscribe.services.transcriber.vad import (
    HybridVoiceDetector,
    SileroModel,
    SileroVoiceDetector,
    WebrtcVoiceDetector,
    detector_maker,
)
from tests.unit.transcriber import noisy

FRAME = SileroModel.WINDOW


@pytest.fixture(scope="module")
def model():
    return SileroModel()


@pytest.fixture(scope="module")
def speech():
    audio = noisy.clean_dialog().audio
    return audio[: len(audio) // FRAME * FRAME]


def probabilities(detector, audio):
    out = []
    for i in range(0, len(audio) - FRAME + 1, FRAME):
        detector.is_speech(audio[i : i + FRAME])
        out.append(detector.probability)
    return np.array(out)


def test_streamed_frames_match_faster_whispers_batch_run(model, speech):
    batch = get_vad_model()(speech.astype(np.float32) / 32768.0).reshape(-1)
    streamed = probabilities(SileroVoiceDetector(model), speech)
    assert len(streamed) == len(batch)
    assert np.max(np.abs(streamed - batch)) < 1e-4


def test_sessions_keep_their_own_state(model, speech):
    a, b = SileroVoiceDetector(model), SileroVoiceDetector(model)
    other = np.roll(speech, 12345)
    interleaved_a, interleaved_b = [], []
    for i in range(0, len(speech), FRAME):
        a.is_speech(speech[i : i + FRAME])
        b.is_speech(other[i : i + FRAME])
        interleaved_a.append(a.probability)
        interleaved_b.append(b.probability)
    assert np.allclose(interleaved_a, probabilities(SileroVoiceDetector(model), speech), atol=1e-6)
    assert np.allclose(interleaved_b, probabilities(SileroVoiceDetector(model), other), atol=1e-6)


class ScriptedModel:
    """A Silero stand-in that answers with the given probabilities in turn."""

    def __init__(self, probabilities):
        self.answers = iter(probabilities)

    def speech_probability(self, window, h, c):
        return next(self.answers), h, c


def test_hysteresis_starts_at_the_threshold_and_ends_below_it_minus_0_15():
    probs = [0.3, 0.49, 0.5, 0.4, 0.36, 0.34, 0.45, 0.49, 0.7]
    detector = SileroVoiceDetector(ScriptedModel(probs), threshold=0.5)
    frame = np.zeros(FRAME, np.int16)
    assert [detector.is_speech(frame) for _ in probs] == [False, False, True, True, True, False, False, False, True]


def test_a_threshold_outside_0_1_is_refused(model):
    with pytest.raises(ValueError, match="threshold"):
        SileroVoiceDetector(model, threshold=1.5)


def test_detector_maker():
    silero = detector_maker("silero", threshold=0.6)
    one, two = silero(), silero()
    assert isinstance(one, SileroVoiceDetector) and one.threshold == 0.6 and one.frame_samples == 512
    assert one is not two and one.model is two.model  # one ONNX session, a state per session
    webrtc = detector_maker("webrtc", aggressiveness=3)()
    assert isinstance(webrtc, WebrtcVoiceDetector) and webrtc.frame_samples == 480
    with pytest.raises(ValueError, match="JETSCRIBE_VAD"):
        detector_maker("energy")


def test_the_environment_chooses_the_detector_and_the_gate(monkeypatch):
    from jetscribe.services.transcriber.app import commit_options
    from jetscribe.shared.config import TranscriberConfig

    assert TranscriberConfig().vad == "hybrid" and commit_options(TranscriberConfig()).speech_above_floor_db == 5.0
    assert isinstance(detector_maker(TranscriberConfig().vad)(), HybridVoiceDetector)
    monkeypatch.setenv("JETSCRIBE_VAD", "silero")
    monkeypatch.setenv("JETSCRIBE_VAD_ABOVE_FLOOR_DB", "0")
    config = TranscriberConfig.from_env()
    assert commit_options(config).speech_above_floor_db == 0.0
    assert isinstance(detector_maker(config.vad, threshold=config.vad_threshold)(), SileroVoiceDetector)
