"""Which decoded words to trust and when an interim word is stable: pure functions over `Word`s.

The guards remove what Whisper invents (text for silence or noise, the repeats of a loop, stock phrases
after speech), judged by the audio as well as by Whisper's scores, and say what they removed and why;
`agree` is LocalAgreement-2 over an utterance's consecutive interim hypotheses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jetscribe.services.transcriber.evidence import AudioEvidence
from jetscribe.shared.wire import DroppedWord, DropReason, Word


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


# A segment is in doubt when Whisper itself doubts it (no_speech above this, or avg_logprob below that),
# when it looped, or when its text compresses too well (Whisper's own 2.4). Doubt alone drops nothing.
DOUBT_NO_SPEECH = 0.5
DOUBT_LOGPROB = -1.0
LOOP_COMPRESSION = 2.4
# Audio holds speech under words when the VAD heard speech in this share of their frames (widened by
# EVIDENCE_PAD_S: word times are only good to ~0.1 s) and their loud frames stand this far above the floor.
MIN_SPEECH_COVERAGE = 0.3
MIN_SPEECH_SNR_DB = 5.0
EVIDENCE_PAD_S = 0.1
MAX_REPEATS = 3  # a phrase said more often than this back to back is a loop
MAX_LOOP_WORDS = 8  # the longest phrase looked for


@dataclass
class Verdict:
    """What the guards made of some words: those kept, and those removed with their reason."""

    kept: list[Word] = field(default_factory=list)
    dropped: list[DroppedWord] = field(default_factory=list)


def keep_trustworthy(segments: list[DecodedSegment], evidence: AudioEvidence | None = None) -> Verdict:
    """Remove what Whisper makes up, never more: a loop loses its repeats (its first occurrence and the
    rest of the segment stay); a whole segment goes only if it is in doubt (`DOUBT_*`, a loop, a high
    compression ratio) and the audio under it holds no speech (`holds_speech`). Without `evidence`
    (no VAD record), Whisper's scores alone decide, by the older rule: avg_logprob < -1 and no_speech > 0.3.
    Times of `segments` and `evidence` must be on the same clock."""
    verdict = Verdict()
    for seg in segments:
        kept, repeats = trim_loops(seg.words)
        doubtful = (
            seg.no_speech_prob > DOUBT_NO_SPEECH
            or seg.avg_logprob < DOUBT_LOGPROB
            or bool(repeats)
            or seg.compression_ratio > LOOP_COMPRESSION
        )
        if evidence is None:
            silent = seg.avg_logprob < DOUBT_LOGPROB and seg.no_speech_prob > 0.3
        else:
            span = (seg.words[0].start, seg.words[-1].end) if seg.words else (0.0, 0.0)
            silent = doubtful and bool(seg.words) and not holds_speech(evidence, *span)
        if silent:
            verdict.dropped += dropped(seg.words, "silence")
            continue
        verdict.kept += kept
        verdict.dropped += dropped(repeats, "loop")
    verdict.kept, squeezed = trim_squeezed_repeats(verdict.kept)  # across segments: a copy may straddle two
    verdict.dropped += dropped(squeezed, "loop")
    return verdict


def holds_speech(evidence: AudioEvidence, t0: float, t1: float, min_coverage: float = MIN_SPEECH_COVERAGE) -> bool:
    """The audio of [t0, t1] (widened by `EVIDENCE_PAD_S`) is speech: the VAD heard it in `min_coverage` of
    its frames, and it is louder than the session's noise (so a VAD that hears steady line noise as speech
    is overruled by the level; an unknown floor is no evidence against speech)."""
    t0, t1 = t0 - EVIDENCE_PAD_S, t1 + EVIDENCE_PAD_S
    if evidence.coverage(t0, t1) < min_coverage:
        return False
    snr = evidence.snr_db(t0, t1)
    return snr is None or snr >= MIN_SPEECH_SNR_DB


MIN_SPOKEN_S_PER_WORD = 0.05  # words timed into less audio than this each were not spoken


def drop_trailing_inventions(words: list[Word], speech_end_s: float) -> Verdict:
    """Whisper fills the silence after speech with stock phrases ("Thanks for watching!"): drop words
    that begin after the VAD heard the last speech, or right at its end with low confidence; and
    words that are only sentence punctuation (not counted: they are no words)."""
    verdict = Verdict()
    for i, w in enumerate(words):
        if w.start >= speech_end_s + 0.1 or (w.start >= speech_end_s - 0.15 and w.probability < 0.5):
            verdict.dropped += dropped(words[i:], "trailing")
            break
        if is_word(w):
            verdict.kept.append(w)
    squeezed = squeezed_tail(verdict.kept)
    if squeezed:
        verdict.dropped = dropped(verdict.kept[-squeezed:], "trailing") + verdict.dropped
        del verdict.kept[-squeezed:]
    return verdict


def squeezed_tail(words: list[Word]) -> int:
    """How many words at the end form a sentence nobody could have said: several words Whisper timed
    into almost no audio (under `MIN_SPOKEN_S_PER_WORD` each) with little confidence. That is how a
    stock phrase it appends after the last real word looks ("arrives. Thank you for watching." with
    "Thank you for" at zero length); spoken words, however fast, take time."""
    start = len(words)
    while start > 0 and not (start < len(words) and words[start - 1].word.rstrip().endswith((".", "?", "!"))):
        start -= 1
    tail = words[start:]
    if start == 0 or len(tail) < 2:
        return 0  # the whole final, or one word: not a tail after real speech
    spoken_s = tail[-1].end - tail[0].start
    confidence = sum(w.probability for w in tail) / len(tail)
    if spoken_s < MIN_SPOKEN_S_PER_WORD * len(tail) and confidence < 0.6:
        return len(tail)
    return 0


def is_word(w: Word) -> bool:
    """Not only sentence punctuation: "%", "$" or "&" alone still mean something."""
    return bool(w.word.strip(" .,!?;:…-"))


def dropped(words: list[Word], reason: DropReason) -> list[DroppedWord]:
    """`words` as removed for `reason`; punctuation alone is no word, and is left out."""
    return [DroppedWord(w.word, w.start, w.end, w.probability, reason) for w in words if is_word(w)]


def trim_loops(words: list[Word], max_repeats: int = MAX_REPEATS) -> tuple[list[Word], list[Word]]:
    """(kept, removed): where a 1-`MAX_LOOP_WORDS` word phrase repeats back to back more than `max_repeats`
    times, its first occurrence stays and the repeats go; shorter runs ("no, no, no") are speech and stay.
    The first occurrence, not `max_repeats` of them: a decoder loop usually repeats something said once,
    and a removed repeat is counted and published, while a kept invention reads like speech."""
    tokens = [norm(w.word) for w in words]
    kept: list[Word] = []
    removed: list[Word] = []
    i = 0
    while i < len(words):
        for n in range(1, MAX_LOOP_WORDS + 1):
            phrase = tokens[i : i + n]
            if len(phrase) < n or not any(phrase):
                continue
            run = 1
            while tokens[i + run * n : i + (run + 1) * n] == phrase:
                run += 1
            if run > max_repeats:
                kept += words[i : i + n]
                removed += words[i + n : i + run * n]
                i += run * n
                break
        else:
            kept.append(words[i])
            i += 1
    return kept, removed


MIN_SQUEEZED_REPEAT_WORDS = 2  # one word twice is left to `trim_loops`: a stammer often is timed that way


def trim_squeezed_repeats(words: list[Word]) -> tuple[list[Word], list[Word]]:
    """(kept, removed): Whisper sometimes writes a phrase twice where it was said once, and its word timing then
    crams one copy into almost no audio ("We order 3,000 ... last year. We order 3,000 ... last year." with the
    twelve words from the first "3,000" to the second "order" at one instant). Where a phrase of at least
    `MIN_SQUEEZED_REPEAT_WORDS` repeats back to back and a run of as many words inside the two copies spans under
    `MIN_SPOKEN_S_PER_WORD` each, that run was never said: it goes, and the rest reads the phrase once, each word
    where it was heard. A phrase said twice takes the time of two, and stays."""
    tokens = [norm(w.word) for w in words]
    kept, removed = list(words), []
    i = 0
    while i < len(kept):
        run = _squeezed_copy(kept, tokens, i)
        if run is None:
            i += 1
            continue
        first, n = run
        removed += kept[first : first + n]
        del kept[first : first + n], tokens[first : first + n]
    return kept, sorted(removed, key=lambda w: w.start)


def _squeezed_copy(words: list[Word], tokens: list[str], i: int) -> tuple[int, int] | None:
    """(first index, length) of a run timed into no audio that is one copy of a phrase repeated from `i`, or None."""
    for n in range((len(words) - i) // 2, MIN_SQUEEZED_REPEAT_WORDS - 1, -1):
        if tokens[i] != tokens[i + n] or tokens[i : i + n] != tokens[i + n : i + 2 * n] or not any(tokens[i : i + n]):
            continue
        first = min(range(i, i + n + 1), key=lambda f: words[f + n - 1].end - words[f].start)  # the most squeezed
        if words[first + n - 1].end - words[first].start < MIN_SPOKEN_S_PER_WORD * n:
            return first, n
    return None


def has_loop(words: list[Word], max_repeats: int = MAX_REPEATS) -> bool:
    """True if some 1-`MAX_LOOP_WORDS` word phrase repeats back to back more than `max_repeats` times."""
    return bool(trim_loops(words, max_repeats)[1])


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
