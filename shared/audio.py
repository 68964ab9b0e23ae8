"""What stored audio is, once: every chunk in AUDIO is 16 kHz mono pcm_s16le, whatever the bot sent."""

from __future__ import annotations

from typing import Final

SAMPLE_RATE = 16000  # samples per second of stored audio, and what Whisper reads
STORED_ENCODING: Final = "pcm_s16le"  # Final: its type is the Literal, so it fits wire.Encoding
STORED_CHANNELS = 1
BYTES_PER_SAMPLE = 2


def seconds(samples: int) -> float:
    return samples / SAMPLE_RATE


def samples(seconds_: float) -> int:
    return int(round(seconds_ * SAMPLE_RATE))
