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
