"""Pure measures for the streaming benchmark (bench/accuracy.py): no I/O, no servers.

Texts are compared after `jetscribe.wer.normalize` (lowercase, no punctuation, single spaces).
"""

from __future__ import annotations

import math

import jiwer
import numpy as np

from jetscribe.evaluation.wer import normalize


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation as numpy does); None for no values."""
    return float(np.percentile(values, q)) if values else None


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """WER over all texts at once: total errors / total reference words, everything normalized."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=False)]
    pairs = [(r, h) for r, h in pairs if r]  # jiwer refuses empty references
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def chunk_of(t: float, sample_rate: int, frames_per_chunk: int) -> int:
    """Index (seq) of the chunk holding the last sample before time t (seconds of the file)."""
    last_sample = max(0, math.ceil(round(t * sample_rate, 6)) - 1)
    return last_sample // frames_per_chunk


def send_time(t: float, sent_by_seq: dict[int, float], sample_rate: int, frames_per_chunk: int) -> float:
    """Wall time at which the audio up to time t had been sent: the send time of its chunk.

    A time past the end of the audio maps to the last chunk; a seq missing from `sent_by_seq`
    (never accepted) maps to the next one that was.
    """
    seq = min(chunk_of(t, sample_rate, frames_per_chunk), max(sent_by_seq))
    while seq not in sent_by_seq:
        seq += 1
    return sent_by_seq[seq]


def repeats_at_joins(texts: list[str], reference: str, max_n: int = 3) -> list[dict]:
    """Words said once but emitted twice across the join of two consecutive final segments.

    At each join the largest n (1..max_n) with last n words of one segment == first n words of
    the next counts, unless the reference itself has that n-gram twice in a row. Returns one
    example per counted join: {"join": index of the first segment, "n": n, "words": "..."}.
    """
    ref = normalize(reference).split()
    segments = [normalize(t).split() for t in texts]
    segments = [s for s in segments if s]
    found = []
    for i, (before, after) in enumerate(zip(segments, segments[1:], strict=False)):
        for n in range(min(max_n, len(before), len(after)), 0, -1):
            gram = before[-n:]
            if gram == after[:n]:
                doubled = any(ref[k : k + n] == gram and ref[k + n : k + 2 * n] == gram for k in range(len(ref)))
                if not doubled:
                    found.append({"join": i, "n": n, "words": " ".join(gram)})
                break
    return found


def repeated_passages(hypothesis: str, reference: str, min_words: int = 4, max_words: int = 40) -> list[dict]:
    """Passages published twice back to back (by two segments, or inside one) that `repeats_at_joins`
    cannot see: a run of `min_words`..`max_words` words followed at once by the same run, where the
    reference does not say it twice in a row. Returns one entry per repeat: {"at": word index, "words"}.
    A phrase that recurs later in the talk is no repeat, whatever the reference spells."""
    hyp, ref = normalize(hypothesis).split(), normalize(reference).split()
    found: list[dict] = []
    k = 0
    while k < len(hyp):
        for size in range(min(max_words, k, len(hyp) - k), min_words - 1, -1):
            block = hyp[k - size : k]
            if hyp[k : k + size] == block and not _said_twice(ref, block):
                found.append({"at": k, "words": " ".join(block)})
                k += size - 1
                break
        k += 1
    return found


def _said_twice(words: list[str], block: list[str]) -> bool:
    size = len(block)
    return any(words[i : i + size] == block and words[i + size : i + 2 * size] == block for i in range(len(words)))


def words_in_silence(words: list[tuple[str, float, float]], turns: list[dict], margin: float = 0.3) -> list[dict]:
    """Words whose middle lies more than `margin` seconds outside every speech turn ({start, end})."""
    out = []
    for word, start, end in words:
        mid = (start + end) / 2
        gap = min((max(t["start"] - mid, mid - t["end"], 0.0) for t in turns), default=0.0)
        if gap > margin:
            out.append({"word": word.strip(), "start": start, "end": end, "outside_by": round(gap, 3)})
    return out


def dropped_losses(
    dropped: list[tuple[str, float, float]],
    kept: list[tuple[str, float, float]],
    turns: list[dict],
    margin: float = 0.5,
) -> list[dict]:
    """Words the transcriber's guards dropped that the reference had at that time: losses, not inventions.

    A dropped word (word, start, end) is a loss if its normalized form occurs in the reference text of the
    turns ({start, end, text}) overlapping [start - margin, end + margin] more often than in the streamed
    (kept) words whose middle lies in those turns (± margin), counting the earlier losses of that word
    there as found. So a trimmed repeat of "hello" said once is no loss; said twice, one is. Turn texts
    carry no word times: a dropped word is only compared with its turns, never with the whole reference.
    """
    kept_norm = [(normalize(w), (s + e) / 2) for w, s, e in kept]
    taken: dict[tuple[str, tuple[int, ...]], int] = {}
    out = []
    for word, start, end in sorted(dropped, key=lambda d: d[1]):
        near = tuple(i for i, t in enumerate(turns) if t["start"] <= end + margin and t["end"] >= start - margin)
        if not near:
            continue
        lo = min(turns[i]["start"] for i in near) - margin
        hi = max(turns[i]["end"] for i in near) + margin
        reference = [w for i in near for w in normalize(turns[i]["text"]).split()]
        streamed = [w for text, mid in kept_norm if lo <= mid <= hi for w in text.split()]
        for token in normalize(word).split():
            key = (token, near)
            if streamed.count(token) + taken.get(key, 0) < reference.count(token):
                taken[key] = taken.get(key, 0) + 1
                out.append({"word": word.strip(), "start": start, "end": end})
                break
    return out
