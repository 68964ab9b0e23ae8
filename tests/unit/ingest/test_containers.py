"""The incremental Opus decoder: pieces of any size give the same PCM; a stream cut short is a clear error."""

import struct
import time

import numpy as np
import pytest
import soxr

from jetscribe.evaluation.opus import encode_opus
from jetscribe.services.ingest.containers import (
    MAX_BUFFERED_BYTES,
    OPUS_RATE,
    ContainerError,
    OpusStreamDecoder,
    sniff,
)

RATE = 16_000


def tone_and_noise(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    rng = np.random.default_rng(16)
    signal = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(
        len(t)
    )
    return (signal * 32767).astype(np.int16)


def decode_in_pieces(data: bytes, size: int) -> tuple[np.ndarray, OpusStreamDecoder]:
    decoder = OpusStreamDecoder()
    pieces = [decoder.feed(data[i : i + size]) for i in range(0, len(data), size)]
    decoder.finish()
    return np.concatenate(pieces), decoder


@pytest.mark.parametrize("container", ["ogg", "webm"])
def test_any_piece_size_gives_the_same_pcm_and_it_is_the_audio(container):
    original = tone_and_noise()
    data = encode_opus(original, RATE, container, bitrate=24_000)
    whole, decoder = decode_in_pieces(data, len(data))
    assert decoder.container == container and decoder.channels == 1 and whole.dtype == np.float32
    for size in (1, 3, 100, 4096):
        pcm, _ = decode_in_pieces(data, size)
        np.testing.assert_array_equal(pcm, whole)
    # The decoded audio is the original (lossy): at 48 kHz it correlates with the original upsampled.
    reference = soxr.resample(original.astype(np.float32) / 32768.0, RATE, OPUS_RATE)
    decoded = whole[: len(reference), 0]
    assert abs(len(whole) - len(reference)) < OPUS_RATE * 0.05
    correlation = np.corrcoef(decoded[: len(reference)], reference[: len(decoded)])[0, 1]
    assert correlation > 0.9


@pytest.mark.parametrize("container", ["ogg", "webm"])
@pytest.mark.parametrize("cut", [1, 10, 200])
def test_a_stream_cut_short_is_a_clear_error(container, cut):
    data = encode_opus(tone_and_noise(0.5), RATE, container)
    decoder = OpusStreamDecoder()
    for i in range(0, len(data) - cut):
        decoder.feed(data[i : i + 1])
    with pytest.raises(ContainerError, match="cut short|ended"):
        decoder.finish()


def test_a_stream_with_no_audio_and_a_foreign_container_are_refused():
    decoder = OpusStreamDecoder()
    decoder.feed(b"Og")
    with pytest.raises(ContainerError, match="header"):
        decoder.finish()
    with pytest.raises(ContainerError, match="neither Ogg"):
        sniff(b"RIFF....WAVE")
    assert sniff(b"Og") is None


def test_garbage_after_a_good_ogg_page_is_refused_not_waited_for():
    data = encode_opus(tone_and_noise(0.5), RATE, "ogg")
    decoder = OpusStreamDecoder()
    decoder.feed(data[:4000])
    with pytest.raises(ContainerError):
        decoder.feed(b"\x00" * 64 + data[4000:])


def test_an_ogg_packet_that_never_ends_is_refused_at_once():
    """Pages whose every lacing value is 255 continue one packet forever: refused past MAX_BUFFERED_BYTES, and
    gathered in linear time (bytes += took 30 s of the event loop for 4 MiB)."""
    body = bytes(255 * 255)
    page = b"OggS" + bytes(2) + struct.pack("<QII", 0, 7, 0) + bytes(4) + bytes([255]) + bytes([255] * 255) + body
    decoder, started = OpusStreamDecoder(), time.monotonic()
    with pytest.raises(ContainerError, match="packet over"):
        for _ in range(MAX_BUFFERED_BYTES // len(page) + 2):
            decoder.feed(page)
    assert time.monotonic() - started < 5.0  # linear: milliseconds; quadratic: tens of seconds
