"""Speakers against a dialog's script: what a bot that knows who talks would send, and whether finals agree.

A bot hears a platform's active-speaker change when a turn begins; `bot_turns` places each change halfway
through the pause before the turn, so a word Whisper times a little early or late still lands in its turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def bot_turns(turns: Sequence[Any], into_pause: float = 0.5) -> list[tuple[float, str]]:
    """(seconds into the audio, speaker) for each change of speaker in a dialog's turns (`DialogTurn`s), placed
    `into_pause` of the way through the pause before the turn (0.5: halfway)."""
    out: list[tuple[float, str]] = []
    for before, turn in zip([None, *turns], turns, strict=False):
        if before is not None and before.speaker == turn.speaker:
            continue
        at = 0.0 if before is None else before.end_s + (turn.start_s - before.end_s) * into_pause
        out.append((round(at, 3), turn.speaker))
    return out


def script_speaker(turns: Sequence[Any], start: float, end: float) -> str:
    """Who the script says talks in [start, end]: the turn overlapping it most, else the nearest turn."""

    def overlap(t: Any) -> float:
        return min(end, t.end_s) - max(start, t.start_s)

    best = max(turns, key=overlap)
    if overlap(best) > 0:
        return str(best.speaker)
    middle = (start + end) / 2
    return str(min(turns, key=lambda t: min(abs(middle - t.start_s), abs(middle - t.end_s))).speaker)


def speaker_errors(turns: Sequence[Any], finals: Iterable[tuple[float, float, str | None, str]]) -> list[str]:
    """Finals, as (start, end, speaker, text) in the script's seconds, whose speaker is not the script's."""
    return [
        f"{start:.2f}-{end:.2f} {text!r}: {speaker!r}, the script says {expected!r}"
        for start, end, speaker, text in finals
        if text and speaker != (expected := script_speaker(turns, start, end))
    ]


def words_split_wrongly(turns: Sequence[Any], finals: Iterable[tuple[str | None, list[Any]]]) -> list[str]:
    """Words (as [word, start, end, probability, speaker]) whose speaker differs from their segment's or from
    the script's at the word: a final that should have been split at a change and was not."""
    problems = []
    for speaker, words in finals:
        for w in words:
            said = w[4] if len(w) > 4 else None
            expected = script_speaker(turns, w[1], w[2])
            if said != speaker or said != expected:
                problems.append(f"{w[0]!r} at {w[1]:.2f}: {said!r} in a segment of {speaker!r}, script {expected!r}")
    return problems


# --- speakers from the audio: how well the labels fit the script (bench/speakers.py) ---------------------------
def speaker_spans(finals: Iterable[tuple[float, float, str | None, list[Any]]], pause: float = 0.3) -> list[Any]:
    """Who talks when, from finals (start, end, speaker, words as [word, start, end, probability, speaker]): each
    word's span under its speaker (else the final's), words of one speaker less than `pause` apart joined. As
    (start, end, speaker), sorted."""
    spans: list[tuple[float, float, str]] = []
    for _, _, speaker, words in finals:
        for w in words:
            who = w[4] if len(w) > 4 and w[4] is not None else speaker
            if who is None:
                continue
            spans.append((float(w[1]), max(float(w[2]), float(w[1]) + 0.01), str(who)))
    return _joined(spans, pause)


def segment_spans(finals: Iterable[tuple[float, float, str | None, Any]], pause: float = 0.3) -> list[Any]:
    """Who talks when, as the transcriber's segments say it (a final is split where its speaker changes): each
    labelled final's (start, end) under its speaker, finals of one speaker less than `pause` apart joined. Unlike
    `speaker_spans`, the pauses inside a final and the time Whisper's word timings leave out count as its
    speaker's. As (start, end, speaker), sorted."""
    return _joined([(float(a), float(b), str(who)) for a, b, who, _ in finals if who is not None], pause)


def _joined(spans: list[tuple[float, float, str]], pause: float) -> list[Any]:
    merged: list[tuple[float, float, str]] = []
    for start, end, who in sorted(spans):
        if merged and merged[-1][2] == who and start - merged[-1][1] < pause:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), who)
        else:
            merged.append((start, end, who))
    return merged


def diarization_error(turns: Sequence[Any], spans: Sequence[tuple[float, float, str]], collar: float = 0.25) -> float:
    """DER of `spans` against the script's turns (dicts or objects with speaker, start, end), pyannote.metrics
    with a `collar` (seconds, total, around each reference boundary), overlap counted."""
    return diarization_errors(turns, spans, collar)["diarization error rate"]


def diarization_errors(
    turns: Sequence[Any], spans: Sequence[tuple[float, float, str]], collar: float = 0.25
) -> dict[str, float]:
    """`diarization_error` and its parts, in seconds: "confusion" (the wrong speaker), "missed detection" (speech
    with no label), "false alarm" (a label where the script has nobody), "total" (the script's speech)."""
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = Annotation(), Annotation()
    for i, t in enumerate(turns):
        start, end, who = _turn(t)
        reference[Segment(start, end), i] = who
    for i, (start, end, who) in enumerate(spans):
        hypothesis[Segment(start, end), i] = who
    parts = DiarizationErrorRate(collar=collar, skip_overlap=False)(reference, hypothesis, detailed=True)
    return {k: float(v) for k, v in parts.items()}


def cp_wer(turns: Sequence[Any], said: Sequence[tuple[str | None, str]]) -> float:
    """Concatenated minimum-permutation WER: each speaker's words in the script against one hypothesis speaker's
    (`said`: (speaker, text) in order), the pairing that makes fewest errors; extra speakers on either side are
    compared with nothing. Total errors over the script's words."""
    import jiwer
    from scipy.optimize import linear_sum_assignment

    from jetscribe.evaluation.wer import normalize

    ref: dict[str, list[str]] = {}
    for t in turns:
        who = str(t["speaker"] if isinstance(t, dict) else t.speaker)
        ref.setdefault(who, []).append(str(t["text"] if isinstance(t, dict) else t.text))
    hyp: dict[str, list[str]] = {}
    for who, text in said:
        hyp.setdefault(str(who), []).append(text)
    refs = [normalize(" ".join(v)) for v in ref.values()]
    hyps = [normalize(" ".join(v)) for v in hyp.values()]
    n = max(len(refs), len(hyps))
    refs += [""] * (n - len(refs))
    hyps += [""] * (n - len(hyps))

    def errors(r: str, h: str) -> int:
        if not r:
            return len(h.split())
        if not h:
            return len(r.split())
        out = jiwer.process_words(r, h)
        return int(out.substitutions + out.deletions + out.insertions)

    cost = [[errors(r, h) for h in hyps] for r in refs]
    rows, cols = linear_sum_assignment(cost)
    words = sum(len(r.split()) for r in refs)
    return sum(cost[i][j] for i, j in zip(rows, cols, strict=True)) / max(words, 1)


def _turn(t: Any) -> tuple[float, float, str]:
    if isinstance(t, dict):
        return float(t["start"]), float(t["end"]), str(t["speaker"])
    return float(t.start_s), float(t.end_s), str(t.speaker)
