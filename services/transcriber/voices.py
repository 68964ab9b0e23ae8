"""Speakers from the audio, with no I/O: voice embeddings in, stable speaker labels out.

The shell embeds each final's audio (`embedding.VoiceEmbedder`: the whole utterance, or windows of a
long one) and hands the pieces here. `VoiceMatcher.label` matches each piece to the session's speakers (a
centroid per speaker: the mean of the unit embeddings it was given, weighted by seconds), founds a new speaker
where nothing matches for long enough, smooths the turns so that a window that sounds a little off does not
split a final, and folds the pieces into the centroids. The centroids are the whole state: `state()` goes into
the session checkpoint and `VoiceMatcher(options, state)` carries on from it, so after a takeover the same
voice keeps its label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from jetscribe.shared.wire import SpeakerVoice, Word


@dataclass(frozen=True)
class VoiceOptions:
    """How close a voice must be to a speaker's, and how much of a new voice founds a new speaker."""

    match_similarity: float = 0.6  # cosine similarity to a centroid from which a piece is that speaker
    new_speaker_s: float = 1.0  # a voice matching nobody founds a speaker once it has this many seconds
    min_turn_s: float = 1.2  # a turn inside an utterance shorter than this joins its neighbours (no split)
    # ... and so does one of fewer windows than this, in a final embedded as several: one window that sounds off
    # (reverb) is no evidence of a turn or a new voice, whatever the seconds it owns (end-to-end windows own 1.5 s)
    min_turn_windows: int = 2
    max_speakers: int = 16  # beyond this a voice matching nobody goes to the nearest speaker
    label_prefix: str = "S"  # labels are S1, S2, ... in order of first appearance

    def __post_init__(self) -> None:
        if self.min_turn_windows < 1:
            raise ValueError(
                f"a turn needs at least 1 voice window (JETSCRIBE_SPEAKERS_TURN_WINDOWS), not {self.min_turn_windows}"
            )


@dataclass(frozen=True)
class VoicePiece:
    """One embedding of a span of a final's audio, in session seconds."""

    start: float
    end: float
    embedding: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass
class _Speaker:
    label: str
    total: list[float]  # sum of unit embeddings times seconds
    seconds: float

    def similarity(self, unit: Sequence[float]) -> float:
        norm = math.sqrt(sum(x * x for x in self.total))
        return 0.0 if norm == 0 else sum(a * b for a, b in zip(self.total, unit, strict=True)) / norm

    def add(self, unit: Sequence[float], seconds: float) -> None:
        self.total = [t + u * seconds for t, u in zip(self.total, unit, strict=True)]
        self.seconds += seconds


@dataclass
class _Turn:
    speaker: _Speaker
    pieces: list[tuple[VoicePiece, list[float], float]] = field(default_factory=list)  # piece, unit, own seconds

    @property
    def seconds(self) -> float:
        """The time only its pieces cover: overlapping windows count up to where the next one starts."""
        return sum(own for _, _, own in self.pieces)


class VoiceMatcher:
    """One session's speakers by voice."""

    def __init__(self, options: VoiceOptions | None = None, state: Sequence[SpeakerVoice] = ()):
        self.options = options or VoiceOptions()
        self._speakers = [_Speaker(v.label, list(v.centroid), v.seconds) for v in state]
        self._next = 1 + max((_number(v.label, self.options.label_prefix) for v in state), default=0)

    @property
    def speakers(self) -> list[str]:
        return [s.label for s in self._speakers]

    def state(self) -> list[SpeakerVoice]:
        """The centroids, for the checkpoint (each a unit vector, rounded: a checkpoint stays small)."""
        out = []
        for s in self._speakers:
            norm = math.sqrt(sum(x * x for x in s.total)) or 1.0
            out.append(SpeakerVoice(s.label, [round(x / norm, 5) for x in s.total], round(s.seconds, 3)))
        return out

    def label(self, pieces: Sequence[VoicePiece]) -> list[tuple[float, float, str]]:
        """Who talks in a final, as (start, end, speaker) turns in time order; the pieces are folded into the
        speakers' centroids. Empty for no pieces."""
        if not pieces:
            return []
        ordered = sorted(pieces, key=lambda p: p.start)
        provisional: list[_Speaker] = []
        turns: list[_Turn] = []
        owns = [min(p.seconds, max(q.start - p.start, 0.0)) for p, q in zip(ordered, ordered[1:], strict=False)]
        owns.append(ordered[-1].seconds)
        for piece, own in zip(ordered, owns, strict=True):
            unit = _unit(piece.embedding)
            speaker = self._best(unit, provisional)
            if speaker is None:
                speaker = _Speaker("", [0.0] * len(unit), 0.0)
                provisional.append(speaker)
            if provisional and speaker in provisional:
                speaker.add(unit, piece.seconds)  # a new voice's pieces compare with each other as they come
            if turns and turns[-1].speaker is speaker:
                turns[-1].pieces.append((piece, unit, own))
            else:
                turns.append(_Turn(speaker, [(piece, unit, own)]))
        turns = self._smooth(turns, provisional)
        out: list[tuple[float, float, str]] = []
        for k, turn in enumerate(turns):
            speaker = turn.speaker
            if speaker in provisional:
                speaker.label = f"{self.options.label_prefix}{self._next}"
                self._next += 1
                speaker.total, speaker.seconds = [0.0] * len(speaker.total), 0.0
                self._speakers.append(speaker)
                provisional.remove(speaker)
            for piece, unit, _ in turn.pieces:
                speaker.add(unit, piece.seconds)
            # Turns meet halfway through the overlap of their windows.
            start, end = turn.pieces[0][0].start, turn.pieces[-1][0].end
            if k > 0:
                start = (turns[k - 1].pieces[-1][0].end + start) / 2
            if k + 1 < len(turns):
                end = (end + turns[k + 1].pieces[0][0].start) / 2
            if out and out[-1][2] == speaker.label:
                out[-1] = (out[-1][0], end, speaker.label)
            else:
                out.append((start, end, speaker.label))
        return out

    def _best(self, unit: Sequence[float], provisional: list[_Speaker]) -> _Speaker | None:
        known = [*self._speakers, *provisional]
        if not known:
            return None
        best = max(known, key=lambda s: s.similarity(unit))
        if best.similarity(unit) >= self.options.match_similarity:
            return best
        if len(self._speakers) + len(provisional) >= self.options.max_speakers:
            return best
        return None

    def _smooth(self, turns: list[_Turn], provisional: list[_Speaker]) -> list[_Turn]:
        """Short turns join a neighbour, shortest first: under `min_turn_s`, or of fewer than `min_turn_windows`
        windows. A new voice shorter than `new_speaker_s` founds no speaker, except as the session's first words (no
        speaker yet): then it goes to the nearest speaker. A final that is one turn founds as its seconds say (a short
        utterance, embedded whole, is one piece)."""
        opts = self.options
        while len(turns) > 1:
            short = [
                i
                for i, t in enumerate(turns)
                if t.seconds < opts.min_turn_s
                or len(t.pieces) < opts.min_turn_windows
                or (t.speaker in provisional and t.seconds < opts.new_speaker_s)
            ]
            if not short:
                break
            i = min(short, key=lambda k: turns[k].seconds)
            turns = _merge_into_neighbour(turns, i)
        if len(turns) == 1 and turns[0].speaker in provisional and self._speakers:
            turn = turns[0]
            if turn.seconds < opts.new_speaker_s:  # too little of an unknown voice: the nearest speaker
                mean = _unit([sum(u[k] for _, u, _ in turn.pieces) for k in range(len(turn.pieces[0][1]))])
                turn.speaker = max(self._speakers, key=lambda s: s.similarity(mean))
        return turns


def _merge_into_neighbour(turns: list[_Turn], i: int) -> list[_Turn]:
    """Turn i's pieces go to the neighbour whose speaker is nearer its voice; equal neighbours become one turn."""
    turn = turns[i]
    neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(turns)]
    mean = _unit([sum(u[k] for _, u, _ in turn.pieces) for k in range(len(turn.pieces[0][1]))])
    j = max(neighbours, key=lambda k: turns[k].speaker.similarity(mean))
    target = turns[j]
    target.pieces = sorted([*target.pieces, *turn.pieces], key=lambda p: p[0].start)
    rest = [t for k, t in enumerate(turns) if k != i]
    merged: list[_Turn] = []
    for t in rest:
        if merged and merged[-1].speaker is t.speaker:
            merged[-1].pieces += t.pieces
        else:
            merged.append(t)
    return merged


def label_words(words: Sequence[Word], turns: Sequence[tuple[float, float, str]]) -> list[Word]:
    """Words without a speaker take the turn at their middle (the nearest turn between turns); a word that has
    a speaker (the bot said it) keeps it."""
    if not turns:
        return list(words)
    out = []
    for w in words:
        if w.speaker is not None:
            out.append(w)
            continue
        middle = (w.start + w.end) / 2
        turn = min(turns, key=lambda t: 0.0 if t[0] <= middle <= t[1] else min(abs(middle - t[0]), abs(middle - t[1])))
        out.append(Word(w.word, w.start, w.end, w.probability, turn[2]))
    return out


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(float(x) * float(x) for x in vector)) or 1.0
    return [float(x) / norm for x in vector]


def _number(label: str, prefix: str) -> int:
    tail = label[len(prefix) :] if label.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else 0
