"""Long speech committed at sentence ends: where a run of speech with no pause may be cut, and which side
of the cut owns the words Whisper hears across it. Pure functions over `Word`s, in session seconds.

A sentence end is a commit point once the interims have confirmed it (LocalAgreement-2): the last two
hypotheses both end a sentence at the same word, agree with the stable words up to it and on the word
after it, so it is neither a guess nor the tail Whisper punctuates because the audio stops there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jetscribe.services.transcriber.agreement import Hypotheses, norm
from jetscribe.shared.wire import Word

SENTENCE_MARKS = (".", "?", "!")
# Whisper writes these with a period mid-sentence ("Mr. Smith"); "..." trails off rather than ends.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "eg", "ie", "etc"})
NEAR_CUT_S = 0.3  # Whisper's word times at a window edge are good to about this


@dataclass
class SentenceCut:
    """A confirmed sentence end to commit at: `boundary_s` lies between `committed[-1]` and `carried.stable[0]`."""

    boundary_s: float
    committed: list[Word]  # the stable words up to and including the sentence end
    carried: Hypotheses  # the stable words after it: the next utterance starts with them


def confirmed_sentence_end(
    hyp: Hypotheses, previous: list[Word], latest: list[Word], start_s: float, min_commit_s: float
) -> SentenceCut | None:
    """The latest sentence end that `previous` and `latest` (consecutive hypotheses of the utterance that
    began at `start_s`, `hyp` its words after `latest` was agreed) confirm, if it comes at least
    `min_commit_s` after the start; `min_commit_s` = 0: never."""
    if min_commit_s <= 0:
        return None
    stable = hyp.stable
    agreed = min(_common_prefix(stable, latest), _common_prefix(previous, latest))
    for i in range(agreed - 2, -1, -1):  # word i ends the sentence; word i + 1 must be agreed too
        if not (ends_sentence(previous[i]) and ends_sentence(latest[i]) and _opens_sentence(stable[i + 1])):
            continue
        boundary = (stable[i].end + max(stable[i].end, stable[i + 1].start)) / 2
        if boundary - start_s < min_commit_s:
            return None  # any earlier sentence end is earlier still
        # The guesses after the stable words are not carried: the next hypothesis, on about the same audio,
        # would agree with them, cut-off tail word and all.
        return SentenceCut(boundary, stable[: i + 1], Hypotheses(stable[i + 1 :], []))
    return None


def ends_sentence(word: Word) -> bool:
    text = word.word.strip()
    return text.endswith(SENTENCE_MARKS) and not text.endswith("...") and norm(text) not in ABBREVIATIONS


@dataclass
class Seam:
    """Where a sentence cut split a run of speech. Word times are only good to ~0.1 s, so Whisper may hear
    a word that straddles the cut from both sides. The final before the cut keeps every whole word it
    says (it is published first, and nothing after the cut can restore a word it drops); the part after
    drops a head that repeats it."""

    cut_s: float
    committed: list[Word]  # the stable words before the cut, as the interims had them
    after: Hypotheses  # the words of the utterance after the cut (at first the stable words heard there)
    published: list[Word] | None = None  # the final before the cut, once it is out
    carried: list[Word] = field(init=False)  # the words after the cut, as they were when it was made

    def __post_init__(self) -> None:
        self.carried = list(self.after.stable)

    def publish(self, final: list[Word]) -> None:
        """The final before the cut is out: the words after it no longer begin with what it said."""
        self.published = final
        self.after.stable = self.trim_start(self.after.stable)  # its first interim has yet to come

    def trim_end(self, words: list[Word]) -> list[Word]:
        """The final before the cut, without a last word that is only the start of a carried word."""
        if not words or self._ends_the_sentence(words) or words[-1].start < self.cut_s - NEAR_CUT_S:
            return words
        for n in range(1, min(len(words), len(self.carried), 3) + 1):
            whole, part = self.carried[n - 1], words[-1]
            if _same(words[-n:-1], self.carried[: n - 1]) and _begins(whole, part) and not _same([whole], [part]):
                return words[:-1]  # "Th" of "Then": the part after says it whole
        return words

    def trim_start(self, words: list[Word]) -> list[Word]:
        """A hypothesis or final after the cut, without a head that repeats the end of the final before
        it, unless that final ended at the sentence end and the next sentence does begin with those words
        ("It was good. Good morning")."""
        before = self.published if self.published is not None else self.committed
        genuine_possible = self._ends_the_sentence(before)
        for n in range(min(len(words), len(before), 3), 0, -1):
            head, rest = words[:n], words[n:]
            if head[0].start > self.cut_s + NEAR_CUT_S or not _same(head, before[-n:]):
                continue
            if genuine_possible and _same(head[:1], self.carried[:1]) and not _same(rest[:1], self.carried[:1]):
                continue
            return rest
        return words

    def _ends_the_sentence(self, words: list[Word]) -> bool:
        """`words` end as the committed words do, at the sentence end the interims confirmed."""
        k = min(2, len(self.committed), len(words))
        return k > 0 and _same(words[-k:], self.committed[-k:])


def _opens_sentence(word: Word) -> bool:
    """Whisper capitalises a sentence's first word; "5 p.m. and" is no sentence end."""
    return not word.word.strip()[:1].islower()


def _same(a: list[Word], b: list[Word]) -> bool:
    return len(a) == len(b) and all(norm(x.word) == norm(y.word) for x, y in zip(a, b, strict=True))


def _begins(word: Word, fragment: Word) -> bool:
    """`fragment` is `word`, or its start cut off by the window's end."""
    whole, part = norm(word.word), norm(fragment.word)
    return bool(part) and whole.startswith(part)


def _common_prefix(a: list[Word], b: list[Word]) -> int:
    n = 0
    while n < len(a) and n < len(b) and norm(a[n].word) == norm(b[n].word):
        n += 1
    return n
