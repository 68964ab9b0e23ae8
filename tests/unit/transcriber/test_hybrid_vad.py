"""The hybrid detector (`JETSCRIBE_VAD=hybrid`): webrtcvad alone wherever it hears some no speech, and webrtcvad
AND Silero where it calls every frame speech for a while (steady noise): on clean speech with pauses it is webrtcvad,
frame for frame, and Silero never runs; in steady noise Silero wakes, warmed up on the last second, and the pauses
between turns that webrtcvad does not hear are heard. Scripted audio: a piper dialog (1 s pauses), twice, and
jetscribe/evaluation/conditions.py's noises, as in test_segmenter_noise."""

import numpy as np
import pytest

from jetscribe.services.transcriber.vad import (
    HybridVoiceDetector,
    SileroModel,
    WebrtcVoiceDetector,
    detector_maker,
)
from jetscribe.shared.audio import SAMPLE_RATE
from tests.unit.transcriber import noisy
from tests.unit.transcriber.test_segmenter_noise import overlapping, utterances

FRAME = HybridVoiceDetector.frame_samples
ENTER_S = 12.0  # the default: webrtcvad called every frame speech for this long


@pytest.fixture(scope="module")
def model():
    return SileroModel()


@pytest.fixture(scope="module")
def clean():
    """The dialog twice (44 s): turns enough after Silero wakes."""
    once = noisy.clean_dialog()
    n = len(once.audio) / SAMPLE_RATE
    return noisy.Noisy(np.concatenate([once.audio, once.audio]), once.turns + [(a + n, b + n) for a, b in once.turns])


def verdicts(detector, audio):
    return [detector.is_speech(audio[i : i + FRAME]) for i in range(0, len(audio) - FRAME + 1, FRAME)]


def longest_pause_s(speech, start_s, end_s):
    """The longest run of no-speech frames within [start_s, end_s)."""
    run = best = 0
    for said in speech[int(start_s * SAMPLE_RATE / FRAME) : int(end_s * SAMPLE_RATE / FRAME)]:
        run = 0 if said else run + 1
        best = max(best, run)
    return best * FRAME / SAMPLE_RATE


class CountingModel:
    """A Silero stand-in: always this probability; counts the windows it is asked about."""

    def __init__(self, probability):
        self.probability, self.windows = probability, []

    def speech_probability(self, window, h, c):
        self.windows.append(window[0, 64:].copy())
        return self.probability, h, c


def test_clean_speech_with_pauses_is_webrtcvad_alone_and_never_wakes_silero(clean):
    model = CountingModel(1.0)
    hybrid = HybridVoiceDetector(model)
    assert verdicts(hybrid, clean.audio) == verdicts(WebrtcVoiceDetector(2), clean.audio)
    assert hybrid.silero_frames == 0 and model.windows == [] and hybrid.entries == 0


@pytest.mark.parametrize(("condition", "snr"), [("speech_shaped", 8.0), ("speech_shaped", 3.0), ("pink", 1.5)])
@pytest.mark.parametrize("seed", [7, 1])
def test_steady_noise_wakes_silero_and_its_pauses_are_heard(model, clean, condition, snr, seed):
    """webrtcvad calls every frame of the noise speech; after ENTER_S of that, Silero has its say on every frame,
    and the pauses between turns from then on hold no speech: most of them for the endpoint's 0.5 s."""
    audio = noisy.degrade(clean, condition, snr=snr, seed=seed)
    hybrid = HybridVoiceDetector(model)
    heard = verdicts(hybrid, audio.audio)
    webrtc = verdicts(WebrtcVoiceDetector(2), audio.audio)
    assert hybrid.entries == 1 and hybrid.steady_noise
    assert hybrid.silero_frames == len(heard) - round(ENTER_S * SAMPLE_RATE / FRAME) + 1
    pauses = [(end, start) for (_, end), (start, _) in zip(audio.turns, audio.turns[1:], strict=False) if end > ENTER_S]
    assert len(pauses) >= 7
    assert all(longest_pause_s(webrtc, end, start) < 0.1 for end, start in pauses)
    assert all(longest_pause_s(heard, end, start) >= 0.25 for end, start in pauses)
    assert sum(longest_pause_s(heard, end, start) >= 0.5 for end, start in pauses) >= len(pauses) - 2


def test_pink_noise_at_8_db_leaves_webrtcvad_some_no_speech_so_it_decides_alone(clean):
    """Not steady enough to wake Silero: webrtcvad hears no speech in a frame or a few now and then (not the 0.25 s
    pauses, so the level gate decides, as with webrtcvad alone)."""
    audio = noisy.degrade(clean, "pink", snr=8.0)
    hybrid = HybridVoiceDetector(CountingModel(1.0))
    assert verdicts(hybrid, audio.audio) == verdicts(WebrtcVoiceDetector(2), audio.audio)
    assert hybrid.entries == 0


@pytest.mark.parametrize(("condition", "snr"), [("speech_shaped", 3.0), ("pink", 1.5)])
def test_in_steady_noise_the_turns_after_it_woke_end_in_endpoints_and_stay_whole(model, clean, condition, snr):
    """Through the segmenter: once Silero has its say, each turn is one utterance, ending before the next turn."""
    audio = noisy.degrade(clean, condition, snr=snr)
    utts = utterances(audio.audio, HybridVoiceDetector(model))
    later = [turn for turn in audio.turns if turn[0] > ENTER_S + 1.0]
    assert len(later) >= 7
    for turn in later:
        mine = overlapping(utts, turn)
        assert len(mine) == 1, f"turn {turn}: {mine}"
        heard = min(mine[0][2], turn[1]) - max(mine[0][0], turn[0])
        assert heard >= 0.97 * (turn[1] - turn[0])
        assert mine[0][2] < turn[1] + 1.0


def test_silero_is_warmed_up_on_the_last_second_and_then_runs_on_its_own_512_sample_windows():
    """On entering, Silero gets the last whole 512-sample windows of the last second (ending with the frame that
    woke it); then each 480-sample frame's samples are queued and every whole window is scored, so Silero hears
    the same audio, once, in order."""
    noise = noisy.noise_only("speech_shaped", ENTER_S + 3.0)  # webrtcvad hears it as speech throughout
    model = CountingModel(0.9)
    hybrid = HybridVoiceDetector(model)
    frames = len(noise) // FRAME
    heard = verdicts(hybrid, noise)
    woke = round(ENTER_S * SAMPLE_RATE / FRAME)  # the frame (1-based) that woke it
    assert hybrid.entries == 1 and heard[: woke - 1] == [True] * (woke - 1)
    warm = SAMPLE_RATE // 512 * 512  # 31 windows
    assert len(model.windows) == warm // 512 + (frames - woke) * FRAME // 512
    fed = np.concatenate(model.windows)
    start = woke * FRAME - warm
    expected = noise[start : start + len(fed)].astype(np.float32) / 32768.0
    assert np.array_equal(fed, expected)


def test_the_mode_ends_when_webrtcvad_and_silero_hear_two_pauses_and_webrtcvad_alone_decides_again():
    noise = noisy.noise_only("speech_shaped", ENTER_S + 2.0)  # webrtcvad hears it as speech throughout
    silence = np.zeros(int(0.5 * SAMPLE_RATE), np.int16)
    model = CountingModel(0.0)  # Silero: no speech anywhere
    hybrid, webrtc = HybridVoiceDetector(model), WebrtcVoiceDetector(2)

    def both(audio):
        return verdicts(hybrid, audio), verdicts(webrtc, audio)

    heard, _ = both(noise)
    assert hybrid.steady_noise and not any(heard[round(ENTER_S * SAMPLE_RATE / FRAME) :])  # AND: Silero says no
    both(silence)
    assert hybrid.steady_noise  # one pause: a fluke of the noise, maybe
    both(noise[: SAMPLE_RATE // 2])
    both(silence)
    assert not hybrid.steady_noise  # two: the noise is gone
    asked = len(model.windows)
    heard, alone = both(noise[: 2 * SAMPLE_RATE])
    assert heard == alone and any(heard) and len(model.windows) == asked


def test_once_silero_woke_steady_noise_alone_opens_nothing(model):
    """Before the background is known (its first 0.5 s) webrtcvad opens an utterance, as alone; nothing later."""
    noise = noisy.noise_only("speech_shaped", 20.0, level_dbfs=-30.0)
    hybrid = HybridVoiceDetector(model)
    utts = utterances(noise, hybrid)
    assert hybrid.entries == 1 and utts == utterances(noise, WebrtcVoiceDetector(2))
    assert all(u[2] < 1.5 for u in utts)


def test_detector_maker_shares_one_silero_model(model):
    hybrid = detector_maker("hybrid", threshold=0.4, aggressiveness=3)
    one, two = hybrid(), hybrid()
    assert isinstance(one, HybridVoiceDetector) and one.frame_samples == 480 and one.threshold == 0.4
    assert one is not two and one.model is two.model
    with pytest.raises(ValueError, match="threshold"):
        detector_maker("hybrid", threshold=1.5)
