"""services/transcriber/model.py's pure helpers: the encoder window, the token rule, when a short window is
redone, and where model folders and the cache are. No model is loaded."""

from pathlib import Path

import pytest

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.decoding import Decoded
from jetscribe.services.transcriber.model import (
    FULL_WINDOW_FRAMES,
    MAX_TOKENS_PER_CALL,
    TOKENS_PER_AUDIO_SECOND,
    TOKENS_PER_CALL,
    ModelNotFound,
    default_cache_dir,
    max_new_tokens,
    model_folder,
    needs_full_window,
    window_frames,
)
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word


def seconds(s):
    return int(s * SAMPLE_RATE)


@pytest.mark.parametrize(
    "audio_s, frames",
    [
        (0.0, 1000),  # never fewer than 10 s of frames
        (2.0, 1000),
        (6.6, 1000),  # 660 frames of audio fill 2/3 of 990 -> 1000
        (6.8, 1100),  # 680 / (2/3) = 1020 -> rounded up to the next 100
        (10.0, 1500),  # 1000 frames of audio in 1500: exactly 2/3
        (19.9, 3000),
        (20.0, 3000),  # 2000 / (2/3) = 3000: the full window
        (29.0, 3000),  # capped at 30 s
        (60.0, 3000),
    ],
)
def test_window_frames_leave_a_third_of_the_window_empty(audio_s, frames):
    assert window_frames(seconds(audio_s)) == frames


def test_window_frames_options():
    assert window_frames(seconds(5), least=0) == 800  # 500 frames / (2/3) = 750 -> 800
    assert window_frames(seconds(5), fill=1.0, least=0, step=1) == 500
    assert window_frames(seconds(100), least=0) == FULL_WINDOW_FRAMES


def test_window_frames_never_shrink_as_audio_grows():
    frames = [window_frames(n) for n in range(0, seconds(31), 797)]
    assert frames == sorted(frames)


def test_the_token_rule():
    assert (TOKENS_PER_CALL, TOKENS_PER_AUDIO_SECOND, MAX_TOKENS_PER_CALL) == (20, 8, 200)
    assert max_new_tokens(0) == 20
    assert max_new_tokens(seconds(1)) == 28
    assert max_new_tokens(seconds(2.5)) == 40
    assert max_new_tokens(seconds(1) - 1) == 27  # whole tokens, rounded down
    assert max_new_tokens(seconds(22.5)) == 200  # 20 + 180: the cap exactly
    assert max_new_tokens(seconds(30)) == 200  # never above the cap
    assert all(max_new_tokens(n) <= max_new_tokens(n + 1600) for n in range(0, seconds(30), 1600))


def words(*texts):
    return [Word(t, i * 0.3, i * 0.3 + 0.25, 0.9) for i, t in enumerate(texts)]


def test_a_clean_decode_keeps_its_short_window():
    assert not needs_full_window(Decoded([DecodedSegment(words(" hello", " there", " how", " are", " you"))]))
    assert not needs_full_window(Decoded([]))


def test_a_loop_or_a_runaway_decode_is_redone_on_the_full_window():
    looping = words(*[" see", " you", " next", " time"] * 5)
    assert needs_full_window(Decoded([DecodedSegment(looping)]))
    assert needs_full_window(Decoded([DecodedSegment(words(" a"), compression_ratio=2.5)]))
    many = [Word(f" w{i}", i * 0.01, i * 0.01 + 0.01, 0.9) for i in range(200)]
    assert needs_full_window(Decoded([DecodedSegment(many)]))
    # A loop split across segments still counts.
    half = words(" go", " go", " go")
    assert needs_full_window(Decoded([DecodedSegment(half), DecodedSegment(half)]))


def test_a_local_model_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    assert model_folder(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="model.bin"):
        model_folder(str(empty))
    with pytest.raises(ModelNotFound, match="unknown model"):
        model_folder("large-v9")


def test_the_cache_follows_jetscribe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JETSCRIBE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("JETSCRIBE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "jetscribe"
