"""Utterances on generated noisy audio: endpoints come in 8 dB SNR noise (babble, speech-shaped, pink) as they
do in silence, a quiet speaker over hum is heard, and noise alone opens nothing that gets decoded.

The audio is a piper dialog (jetscribe.evaluation.speech, cached) with 1 s pauses between turns, degraded by
jetscribe/evaluation/conditions.py, the generators of the realistic benchmark; the noise runs through the pauses.
"""

import numpy as np
import pytest

from jetscribe.services.transcriber.options import CommitOptions
from jetscribe.services.transcriber.segmenter import UtteranceSegmenter
from jetscribe.services.transcriber.vad import SileroModel, SileroVoiceDetector, WebrtcVoiceDetector
from jetscribe.shared.audio import SAMPLE_RATE
from tests.unit.transcriber import noisy

OPTIONS = CommitOptions()
SLACK_S = 0.3  # the bound: a final closes within the endpoint silence + 0.3 s of its turn's end
CHUNK = SAMPLE_RATE // 50  # 20 ms, as a bot sends


@pytest.fixture(scope="module")
def model():
    return SileroModel()


@pytest.fixture(scope="module")
def clean():
    return noisy.clean_dialog()


def utterances(audio, vad, options=OPTIONS):
    """(start, speech_end, end, closed_at) in seconds of every utterance kept, the audio fed as a bot sends it."""
    seg = UtteranceSegmenter(vad, options)
    for i in range(0, len(audio), CHUNK):
        seg.add(audio[i : i + CHUNK], min(len(audio), i + CHUNK) / SAMPLE_RATE)
    seg.close_open(len(audio) / SAMPLE_RATE)
    return [(u.start / SAMPLE_RATE, u.speech_end / SAMPLE_RATE, u.end / SAMPLE_RATE, u.closed_at) for u in seg.closed]


def overlapping(utts, turn):
    start, end = turn
    return [u for u in utts if u[0] < end and u[2] > start]


def assert_turns_endpointed(utts, turns, early_s=0.0):
    """Each turn ends in an endpoint within the endpoint silence + 0.3 s, its utterances cover it (their
    last cut no more than `early_s` before its end), and no utterance spans two turns or runs on."""
    bound = OPTIONS.endpoint_silence_s + SLACK_S
    for turn in turns:
        mine = overlapping(utts, turn)
        assert mine, f"turn {turn} opened no utterance"
        closed, cut = max(u[3] for u in mine), max(u[2] for u in mine)
        assert closed <= turn[1] + bound, f"turn {turn}: its last utterance closed at {closed:.2f} s"
        assert cut >= turn[1] - early_s, f"turn {turn}: its end after {cut:.2f} s is in no utterance"
        heard = sum(min(u[2], turn[1]) - max(u[0], turn[0]) for u in mine)
        assert heard >= 0.85 * (turn[1] - turn[0]), f"turn {turn}: only {heard:.2f} s of it inside utterances"
    for u in utts:
        turns_in = overlapping([(a, None, b, None) for a, b in turns], (u[0], u[2]))
        assert len(turns_in) == 1, f"utterance {u} spans {len(turns_in)} turns: no endpoint between them"
        assert u[2] <= turns_in[0][2] + bound


@pytest.mark.parametrize("condition", ["clean", "speech_shaped", "pink", "quiet_hum"])
def test_every_turn_ends_in_an_endpoint_in_noise_as_in_silence(model, clean, condition):
    audio = clean if condition == "clean" else noisy.degrade(clean, condition, snr=8.0)
    assert_turns_endpointed(utterances(audio.audio, SileroVoiceDetector(model)), audio.turns)


@pytest.mark.parametrize("seed", [7, 1, 2])
def test_every_turn_ends_in_an_endpoint_in_8_db_babble(model, clean, seed):
    """Silero hears babble as speech; the noise-floor gate finds the pauses. Its cost: the quiet end of a
    turn (within 5 dB of the crowd) may fall outside the utterance, up to 0.4 s on these seeds."""
    audio = noisy.degrade(clean, "babble", seed=seed, snr=8.0)
    assert_turns_endpointed(utterances(audio.audio, SileroVoiceDetector(model)), audio.turns, early_s=0.4)


@pytest.mark.parametrize(("condition", "snr"), [("pink", 1.5), ("speech_shaped", 3.0)])
@pytest.mark.parametrize("seed", [7, 1])
def test_long_turns_in_loud_steady_noise_stay_whole(model, condition, snr, seed):
    """At a low SNR the speaker's quiet frames are near the noise floor and Silero rightly calls them speech;
    that is no babble (Silero hears the pauses between turns as no speech), so no level gate may cut the turns."""
    audio = noisy.degrade(noisy.long_turn_dialog(), condition, seed=seed, snr=snr)
    utts = utterances(audio.audio, SileroVoiceDetector(model))
    for turn in audio.turns:
        heard = sum(min(u[2], turn[1]) - max(u[0], turn[0]) for u in overlapping(utts, turn))
        assert heard >= 0.97 * (turn[1] - turn[0]), f"turn {turn}: only {heard:.2f} s of it inside utterances"


def test_without_the_gate_babble_hides_the_pauses(model, clean):
    audio = noisy.degrade(clean, "babble", snr=8.0)
    utts = utterances(audio.audio, SileroVoiceDetector(model), CommitOptions(speech_above_floor_db=0.0))
    assert len(utts) < len(audio.turns) - 1 and max(u[2] - u[0] for u in utts) > 10


@pytest.mark.parametrize("condition", ["speech_shaped", "pink"])
def test_webrtcvad_hears_steady_noise_as_speech(clean, condition):
    """Why Silero is offered (`JETSCRIBE_VAD=silero`, and in steady noise by the default hybrid): with webrtcvad
    the pauses in 8 dB noise end no utterance by the VAD alone; the level gate (off here) has to."""
    audio = noisy.degrade(clean, condition, snr=8.0)
    utts = utterances(audio.audio, WebrtcVoiceDetector(2), CommitOptions(speech_above_floor_db=0.0))
    assert len(utts) <= 2 and max(u[2] - u[0] for u in utts) > 10


@pytest.mark.parametrize("kind", ["speech_shaped", "pink"])
def test_steady_noise_alone_opens_nothing_to_decode(model, kind):
    assert utterances(noisy.noise_only(kind, 12.0, level_dbfs=-30.0), SileroVoiceDetector(model)) == []


def test_babble_alone_opens_only_a_few_short_utterances(model):
    """Babble is speech: until the background is known (the first ~0.5 s) and where the crowd swells, an
    utterance opens. Whisper's no-speech score and the guards judge those."""
    utts = utterances(noisy.noise_only("babble", 12.0, level_dbfs=-30.0), SileroVoiceDetector(model))
    assert len(utts) <= 2 and all(u[2] - u[0] <= 2.0 for u in utts)


def test_hum_alone_opens_nothing_to_decode(model, clean):
    hum = noisy.degrade(noisy.Noisy(np.zeros_like(clean.audio), clean.turns), "quiet_hum")
    assert utterances(hum.audio, SileroVoiceDetector(model)) == []


def test_the_noise_floor_is_the_noise_level(model, clean):
    audio = noisy.degrade(clean, "pink", snr=8.0)
    seg = UtteranceSegmenter(SileroVoiceDetector(model), OPTIONS)
    seg.add(audio.audio, 0.0)
    pause = audio.audio[int(audio.turns[-1][1] * SAMPLE_RATE) + 1600 :]
    noise_db = 10 * np.log10(np.mean(pause.astype(np.float64) ** 2) / 32768.0**2)
    assert noise_db - 3 < seg.noise_floor_db < noise_db + 1
    start, end = (int(t * SAMPLE_RATE) for t in audio.turns[-1])
    assert seg.levels.span_db(start, end) > seg.noise_floor_db + 6  # a guard can ask: speech or noise?
