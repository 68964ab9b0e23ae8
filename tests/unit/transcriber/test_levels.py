"""Frame levels, the noise floor and the background-talk detector (levels.py)."""

import numpy as np
import pytest

from jetscribe.services.transcriber.levels import SILENCE_DB, BackgroundTalk, FrameLevels, NoiseFloor, level_db

FRAME = 512


def test_level_db():
    t = np.arange(16000)
    full_sine = (32767 * np.sin(2 * np.pi * 440 * t / 16000)).astype(np.int16)
    assert level_db(full_sine) == pytest.approx(-3.01, abs=0.05)
    assert level_db((full_sine / 10).astype(np.int16)) == pytest.approx(-23.01, abs=0.05)
    assert level_db(np.zeros(FRAME, np.int16)) == SILENCE_DB
    assert level_db(np.zeros(0, np.int16)) == SILENCE_DB


def test_the_noise_floor_follows_the_background_not_the_speech():
    rng = np.random.default_rng(0)
    floor = NoiseFloor(FRAME)
    assert floor.db == SILENCE_DB
    for second in range(10):  # 0.6 s of -20 dBFS "speech" and 0.4 s of -50 dBFS noise, every second
        for i in range(31):
            floor.add((-20.0 if i < 19 else -50.0) + rng.normal(0, 1))
        assert second < 1 or -53 < floor.db < -47
    for _ in range(100):  # the noise gets louder: the floor rises within the window (3 s)
        floor.add(-35.0 + rng.normal(0, 1))
    assert -38 < floor.db < -33


def test_frame_levels_answer_for_spans_of_the_buffered_frames():
    levels = FrameLevels(FRAME)
    for db in (-60.0, -20.0, -20.0, -60.0):
        levels.add(db)
    assert levels.span(FRAME, 3 * FRAME) == [-20.0, -20.0]
    assert levels.span(FRAME + 1, 2 * FRAME + 1) == [-20.0, -20.0]  # any overlap counts
    assert levels.span_db(FRAME, 3 * FRAME) == pytest.approx(-20.0)
    assert levels.span_db(0, 2 * FRAME) == pytest.approx(10 * np.log10((1e-6 + 1e-2) / 2))
    levels.drop_before(2 * FRAME + 10)
    assert levels.start == 2 * FRAME and levels.span(0, 4 * FRAME) == [-20.0, -60.0]
    assert levels.span_db(0, FRAME) == SILENCE_DB
    levels.restart(100 * FRAME)
    levels.add(-30.0)
    assert levels.span(100 * FRAME, 101 * FRAME) == [-30.0]


def test_background_talk_is_heard_when_the_vad_calls_the_floor_speech():
    talk = BackgroundTalk(FRAME)
    for _ in range(10):
        talk.add(-40.0, -40.5, True)
    assert not talk.heard  # not enough background yet to judge
    for _ in range(100):
        talk.add(-40.0, -40.5, True)  # near the floor, called speech: babble
        talk.add(-20.0, -40.5, True)  # well above the floor: not background, not counted
    assert talk.heard
    for _ in range(100):
        talk.add(-40.0, -40.5, False)  # the background went quiet for the VAD: steady noise
    assert not talk.heard
    for _ in range(200):
        talk.add(SILENCE_DB, SILENCE_DB, True)  # digital silence is nobody talking
    assert not talk.heard


def test_pauses_in_the_background_tell_a_speaker_in_steady_noise_from_babble():
    """A talkative speaker at a low SNR: most frames near the floor are the speaker's, rightly called speech, so the
    background looks like talk. A pause (0.25 s called no speech) every few seconds shows the VAD tells this
    background from speech; babble leaves none."""
    second = 16000 // FRAME

    def speaker_in_noise(talk_s: float, pause_frames: int):
        for _ in range(round(talk_s * second)):
            talk.add(-40.0, -40.5, True)  # the speaker's quiet frames, near the floor
        for _ in range(pause_frames):
            talk.add(-40.5, -40.5, False)  # the noise alone between turns

    talk = BackgroundTalk(FRAME)
    speaker_in_noise(5.0, 3)  # pauses shorter than 0.25 s: like a lull in babble
    speaker_in_noise(5.0, 3)
    assert talk.heard and not talk.pauses_heard
    speaker_in_noise(5.0, second // 3)
    assert not talk.pauses_heard  # one pause in 15 s: a lull in the crowd may do that
    speaker_in_noise(5.0, second // 3)
    assert talk.heard and talk.pauses_heard  # two: the VAD tells this background from speech
    for _ in range(16 * second):
        talk.add(-40.0, -40.5, True)  # then 16 s with no pause: babble after all
    assert talk.heard and not talk.pauses_heard


def test_headroom_is_how_far_the_loud_frames_stand_above_the_floor():
    floor = NoiseFloor(FRAME, window_s=10.0)
    assert floor.headroom_db() == 0.0
    for _ in range(20):
        for db in (-30.0,) * 6 + (-22.0,) * 4:  # speech 8 dB above the noise, 40 % of the time
            floor.add(db)
    assert floor.headroom_db() == pytest.approx(8.0)


def test_the_sorted_window_floor_equals_numpys_percentile_of_the_window():
    rng = np.random.default_rng(7)
    for frame, percentile in ((FRAME, 20.0), (480, 20.0), (480, 10.0), (1600, 50.0), (480, 100.0)):
        floor = NoiseFloor(frame, percentile=percentile)
        window = []
        size = floor._levels.maxlen
        # Levels as frames give them: continuous values, repeats (digital silence, clipping) and jumps.
        levels = np.concatenate(
            [
                rng.normal(-45, 6, 400),
                np.full(60, SILENCE_DB),
                rng.choice([-30.0, -31.5, -30.0, -60.25], 300),
                rng.uniform(-100, 0, 400),
            ]
        )
        for level in levels:
            floor.add(float(level))
            window = [*window, float(level)][-size:]
            assert floor.db == float(np.percentile(np.array(window), percentile))  # the same number, to the bit
