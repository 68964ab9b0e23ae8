"""Word error rate between a reference text and a transcript, with jiwer.

Both sides are normalized the same way first: lowercase, hyphens and slashes
made into spaces (so "twenty-three" matches "twenty three"), all other
punctuation removed (so "don't" and "dont" match), whitespace collapsed.
"""

from __future__ import annotations

import jiwer

__all__ = ["normalize", "wer"]

_NORMALIZE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.SubstituteRegexes({r"[-\u2010-\u2015/]": " "}),
        jiwer.RemovePunctuation(),
        jiwer.RemoveWhiteSpace(replace_by_space=True),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
    ]
)


def normalize(text: str) -> str:
    """``text`` lowercased, without punctuation, words separated by one space."""
    return _NORMALIZE(text)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference``, both normalized.

    0.0 is a perfect match; it can exceed 1.0 when the hypothesis inserts
    words. An empty reference gives 0.0 for an empty hypothesis and the
    number of hypothesis words otherwise (jiwer's convention).
    """
    ref = normalize(reference)
    hyp = normalize(hypothesis)
    if not ref:
        return float(len(hyp.split()))
    return float(jiwer.wer(ref, hyp))
