"""Which decoded words to trust and when an interim word is stable: pure functions over `Word`s.

The guards drop what Whisper invents (text for silence, loops, stock phrases after speech);
`agree` is LocalAgreement-2 over an utterance's consecutive interim hypotheses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jetscribe.shared.wire import Word


@dataclass
class DecodedSegment:
    """One Whisper segment: words with times relative to the decoded audio, plus its quality signals."""

    words: list[Word]
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 1.0


@dataclass
class Hypotheses:
    """An utterance's interim words so far: agreed by consecutive hypotheses (stable), and the rest."""

    stable: list[Word] = field(default_factory=list)
    unstable: list[Word] = field(default_factory=list)


def keep_trustworthy(segments: list[DecodedSegment]) -> list[Word]:
    """Drop what Whisper makes up: text for silence/noise, and looping output."""
    words: list[Word] = []
    for seg in segments:
        # Whisper's own rule is no_speech > 0.6; a trailing "Thank you." after a prompt scores ~0.55.
        if seg.avg_logprob < -1.0 and seg.no_speech_prob > 0.3:
            continue
        if seg.compression_ratio > 2.4 or has_loop(seg.words):
            continue
        words.extend(seg.words)
    return words


def drop_trailing_inventions(words: list[Word], speech_end_s: float) -> list[Word]:
    """Whisper fills the silence after speech with stock phrases ("Thanks for watching!"): drop words
    that begin after the VAD heard the last speech, or right at its end with low confidence; and
    words that are only sentence punctuation."""
    kept = []
    for w in words:
        if w.start >= speech_end_s + 0.1 or (w.start >= speech_end_s - 0.15 and w.probability < 0.5):
            break
        if w.word.strip(" .,!?;:…-"):  # "%", "$" or "&" alone still mean something
            kept.append(w)
    return kept


def has_loop(words: list[Word], max_repeats: int = 3) -> bool:
    """True if some 1-4 word phrase repeats back to back more than `max_repeats` times."""
    tokens = [norm(w.word) for w in words]
    for n in range(1, 5):
        run = 1
        for i in range(n, len(tokens) - n + 1, n):
            if tokens[i : i + n] == tokens[i - n : i]:
                run += 1
                if run > max_repeats:
                    return True
            else:
                run = 1
    return False


def norm(word: str) -> str:
    """A word as compared between hypotheses: lower case, letters, digits and apostrophes only."""
    return re.sub(r"[^\w']", "", word.lower())


def agree(hyp: Hypotheses, words: list[Word]) -> tuple[list[Word], int]:
    """LocalAgreement-2 over an utterance's interim hypotheses: a word becomes stable once two
    consecutive hypotheses agree on it (and on everything before it). Stable words stay as they
    are; returns the words to show (stable, then the newest guesses) and how many are stable."""
    stable = hyp.stable
    n = _common_prefix(stable, words)
    if n == len(stable):
        fresh = words[n:]
    else:  # the model revised a stable word: keep ours, take its guesses after them
        fresh = [w for w in words if w.start >= stable[-1].end - 0.05]
        while fresh and stable and norm(fresh[0].word) == norm(stable[-1].word):
            fresh = fresh[1:]  # the stable word itself, timed a little early
    agreed = _common_prefix(hyp.unstable, fresh)
    stable.extend(fresh[:agreed])
    hyp.unstable = fresh[agreed:]
    return stable + hyp.unstable, len(stable)


def ends_sentence(words: list[Word]) -> bool:
    """The last word closes a sentence."""
    return bool(words) and words[-1].word.rstrip().endswith((".", "?", "!"))


def _common_prefix(a: list[Word], b: list[Word]) -> int:
    n = 0
    while n < len(a) and n < len(b) and norm(a[n].word) == norm(b[n].word):
        n += 1
    return n
