"""Speakers the bot knows, with no I/O: who talks when in a session's samples, and words labelled and split by it.

The bot says who talks (a track's participant on its start, a chunk's `speaker`, `speaker_changes` inside a
chunk); each saying holds from its sample until the next. A word belongs to whoever talks at its middle, and
a final whose words change speaker is split there, one segment per speaker's run (`runs`).

After a takeover the next owner replays the unacked chunks, which carry their own changes again; the one thing
it cannot hear again is who was talking where they begin, so the checkpoint keeps that (`speaker_at`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import AudioChunk, Word


class SpeakerTimeline:
    """Who the bot said talks from which session sample on; before the first saying, `speaker` at `start`."""

    def __init__(self, speaker: str | None = None, start: int = 0):
        self._samples: list[int] = [start]
        self._speakers: list[str | None] = [speaker]

    def mark(self, sample: int, speaker: str | None) -> None:
        """`speaker` talks from `sample` on, until a later mark; a mark at a sample already marked replaces it."""
        i = bisect.bisect_left(self._samples, sample)
        if i < len(self._samples) and self._samples[i] == sample:
            self._speakers[i] = speaker
        else:
            self._samples.insert(i, sample)
            self._speakers.insert(i, speaker)

    def hear(self, chunk: AudioChunk, first_sample: int, samples: int) -> None:
        """The speakers a chunk names; it covers session samples `first_sample` .. + `samples`."""
        if chunk.speaker is not None:
            self.mark(first_sample, chunk.speaker)
        for change in sorted(chunk.speaker_changes, key=lambda c: c.offset_s):
            offset = min(max(round(change.offset_s * SAMPLE_RATE), 0), samples)
            self.mark(first_sample + offset, change.speaker)

    def speaker_at(self, sample: float) -> str | None:
        i = bisect.bisect_right(self._samples, sample) - 1
        return self._speakers[max(i, 0)]

    def names_all(self, start: int, end: int) -> bool:
        """Whether the bot names who talks everywhere in samples `start` .. `end` (its labels win there: voices
        would change nothing)."""
        first = max(bisect.bisect_right(self._samples, start) - 1, 0)
        last = bisect.bisect_left(self._samples, end)
        return all(speaker is not None for speaker in self._speakers[first : max(last, first + 1)])

    def forget_before(self, sample: int) -> None:
        """Drop the marks no word at or after `sample` can need: all before the last one at or before it."""
        i = bisect.bisect_right(self._samples, sample) - 1
        if i > 0:
            del self._samples[:i]
            del self._speakers[:i]

    @property
    def marks(self) -> int:
        return len(self._samples)

    def label(self, words: Iterable[Word]) -> list[Word]:
        """The words, each with the speaker talking at its middle."""
        return [
            Word(w.word, w.start, w.end, w.probability, self.speaker_at((w.start + w.end) / 2 * SAMPLE_RATE))
            for w in words
        ]


def runs(words: list[Word]) -> list[list[Word]]:
    """Labelled words cut where the speaker changes: one list per speaker's turn, in order."""
    out: list[list[Word]] = []
    for w in words:
        if out and out[-1][-1].speaker == w.speaker:
            out[-1].append(w)
        else:
            out.append([w])
    return out
