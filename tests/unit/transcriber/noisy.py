"""Generated noisy dialogs for the VAD tests: piper speech (cached) in jetscribe/evaluation/conditions.py's noises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jetscribe.evaluation import conditions as C
from jetscribe.evaluation.speech import dialog, synthesize
from jetscribe.shared.audio import SAMPLE_RATE

DIALOG = [
    ("A", "Did you remember to water the plants before we left?"),
    ("B", "Yes, I watered them this morning and moved the big one near the window."),
    ("A", "Good, because the weather will be hot all week."),
    ("B", "Then we should ask the neighbors to check on them on Thursday."),
    ("A", "I will call them tonight."),
    ("B", "Thanks, and tell them the key is under the blue pot."),
]
OTHER_SPEECH = [  # the babble's talkers say something else
    "The train to the coast leaves from platform four at half past nine.",
    "She painted the fence green and then changed her mind about the colour.",
    "Our team won the match after a long and muddy second half.",
    "Please remember to bring the tickets and a warm jacket.",
    "The library closes early on Sundays during the summer months.",
    "He fixed the old radio with a spare part from the market.",
]
GAP_S = 1.0


@dataclass
class Noisy:
    audio: np.ndarray  # int16
    turns: list[tuple[float, float]]  # (start, end) seconds of each turn


def clean_dialog() -> Noisy:
    speech = dialog(DIALOG, gap_s=GAP_S, lead_s=1.0, tail_s=1.5)
    return Noisy(speech.audio, [(t.start_s, t.end_s) for t in speech.turns])


def long_turn_dialog(gap_s: float = 0.7) -> Noisy:
    """Turns of two sentences (4-6 s) with short pauses between them, as in a lively conversation: the pauses
    are a small share of the background a VAD hears."""
    turns = [(DIALOG[i][0], f"{DIALOG[i][1]} {DIALOG[(i + 2) % len(DIALOG)][1]}") for i in (0, 1, 4, 5)]
    speech = dialog(turns, gap_s=gap_s, lead_s=1.0, tail_s=1.5)
    return Noisy(speech.audio, [(t.start_s, t.end_s) for t in speech.turns])


def other_speech() -> list[np.ndarray]:
    speech = synthesize(OTHER_SPEECH, voice="joe-high", gap_s=0.0, lead_s=0.0, tail_s=0.0)
    audio = speech.audio.astype(np.float32) / 32768.0
    return [audio[int(t.start_s * SAMPLE_RATE) : int(t.end_s * SAMPLE_RATE)] for t in speech.turns]


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def degrade(clean: Noisy, condition: str, seed: int = 7, snr: float = 8.0) -> Noisy:
    """`clean` in `condition`: babble, speech_shaped, pink (at `snr` dB, through the pauses) or quiet_hum."""
    rng = np.random.default_rng(seed)
    x = clean.audio.astype(np.float32) / 32768.0
    mask = C.turn_mask(len(x), SAMPLE_RATE, [{"start": a, "end": b} for a, b in clean.turns])
    if condition == "quiet_hum":
        return Noisy(to_int16(C.quiet_with_hum(x, SAMPLE_RATE, rng, mask)), clean.turns)
    noise = noise_of(condition, len(x), rng)
    return Noisy(to_int16(C.add_noise(x, noise, snr, mask)), clean.turns)


def noise_of(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    pool = other_speech()
    if kind == "babble":
        return C.babble(n, rng, pool)
    if kind == "speech_shaped":
        return C.speech_shaped_noise(n, rng, np.concatenate(pool))
    if kind == "pink":
        return C.pink_noise(n, rng)
    raise ValueError(kind)


def noise_only(kind: str, seconds: float, level_dbfs: float = -30.0, seed: int = 3) -> np.ndarray:
    """`seconds` of one noise at `level_dbfs`, as int16."""
    noise = noise_of(kind, int(seconds * SAMPLE_RATE), np.random.default_rng(seed))
    return to_int16(noise * 10 ** (level_dbfs / 20))
