"""Utterance segmentation: a session's audio cut into utterances by the VAD's frames.

Speech opens an utterance (with some pre-roll); trailing silence, or the maximum length, closes it.
Utterances never overlap, so no word can be decoded twice. Frame sizes come from the detector.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from jetscribe.services.transcriber.agreement import Hypotheses
from jetscribe.services.transcriber.evidence import SpeechRecord
from jetscribe.services.transcriber.levels import BackgroundTalk, FrameLevels, NoiseFloor, level_db
from jetscribe.services.transcriber.sentences import Seam, SentenceCut
from jetscribe.services.transcriber.vad import VoiceDetector
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word

if TYPE_CHECKING:
    from jetscribe.services.transcriber.options import CommitOptions


@dataclass
class Utterance:
    start: int
    end: int | None = None  # set when closed
    speech_frames: int = 0
    speech_end: int = 0  # session sample where the last speech frame ended
    segment_id: int | None = None  # given when its first text is published
    revision: int = 0
    closed_at: float = 0.0
    interim_jobs: int = 0
    interim_at: int = 0  # VAD position at its last interim job (or its opening)
    speculate_end: int | None = None  # where the endpoint will cut if the current pause lasts
    speculation: tuple[Any, Any] | None = None  # (DecodeJob, Decoded): a final decoded ahead of the endpoint
    words: Hypotheses = field(default_factory=Hypotheses)  # its interim words, stable and not
    last_hypothesis: list[Word] = field(default_factory=list)  # what its latest interim said
    seam_before: Seam | None = None  # it began at a sentence cut
    seam_after: Seam | None = None  # it ended at one
    onset: int | None = None  # where its speech began, if speech after silence opened it (not a cut)

    def own(self, words: list[Word]) -> list[Word]:
        """Its decoded words without those heard across a sentence cut that the other side says."""
        if self.seam_before is not None:
            words = self.seam_before.trim_start(words)
        if self.seam_after is not None:
            words = self.seam_after.trim_end(words)
        return words


class SampleBuffer:
    """int16 samples addressed by session sample index; appends are amortised O(chunk), not O(buffer)."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE * 4, dtype=np.int16)
        self.start = 0  # session index of the first kept sample
        self.end = 0  # session index after the last sample

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, samples: np.ndarray) -> None:
        used = self.end - self.start
        if used + len(samples) > len(self._data):
            grown = np.zeros(max(2 * len(self._data), used + len(samples)), dtype=np.int16)
            grown[:used] = self._data[:used]
            self._data = grown
        self._data[used : used + len(samples)] = samples
        self.end += len(samples)

    def slice(self, start: int, end: int) -> np.ndarray:
        return self._data[start - self.start : end - self.start]

    def drop_before(self, index: int) -> None:
        cut = min(max(index, self.start), self.end) - self.start
        if cut:
            used = self.end - self.start
            self._data[: used - cut] = self._data[cut:used]
            self.start += cut

    def reset_to(self, index: int) -> None:
        """Empty, with the next sample at session index `index` (a restored session)."""
        self.start = self.end = index


class UtteranceSegmenter:
    """One session's audio, the VAD's verdict per frame, and the utterances it makes."""

    LEVEL_WINDOW_S = 0.2  # speech must stand above the noise floor over this long, not in one frame
    # Speech whose loud frames stand less than this many gates above the floor would lose much of itself to the gate;
    # judged over a longer window than the floor's, so that a reverberant room's quiet tails don't count as noise.
    NEAR_FLOOR_GATES = 2.0
    HEADROOM_WINDOW_S = 10.0

    def __init__(self, vad: VoiceDetector, options: CommitOptions):
        self.vad = vad
        self.frame = vad.frame_samples
        self.options = options
        self.buffer = SampleBuffer()
        self.record = SpeechRecord(self.frame)  # each frame's verdict and level, for the word guards
        self.vad_pos = 0  # samples classified so far
        self.open: Utterance | None = None
        self.closed: deque[Utterance] = deque()
        self.silence_frames = 0
        self.levels = FrameLevels(self.frame)  # each buffered frame's level, for questions about a span
        self.noise_floor = NoiseFloor(self.frame)
        self.background_talk = BackgroundTalk(self.frame)
        self.long_levels = NoiseFloor(self.frame, window_s=self.HEADROOM_WINDOW_S)  # for the speech's headroom
        self._last_speech_end = 0
        self._last_cut = 0
        self.speech_starts: list[int] = []  # onsets of utterances that held speech (not clicks), until taken

    def restore(self, position: int) -> None:
        """Continue at session sample `position`, as if everything before it was heard and cut. The frames stay on
        the session's grid (from sample 0): a worker re-hearing audio after a takeover hears the frames its first
        worker heard, so an onset (`speech_started`, its Nats-Msg-Id) comes out the same, not once more."""
        on_grid = -(-position // self.frame) * self.frame  # the samples before it: the next utterance's preroll
        self.buffer.reset_to(position)
        self.record.restore(on_grid)
        self.levels.restart(on_grid)
        self.vad_pos = on_grid
        self._last_cut = self._last_speech_end = position

    @property
    def received(self) -> int:
        """Session samples received so far."""
        return self.buffer.end

    @property
    def noise_floor_db(self) -> float:
        """The session's background level now, in dBFS (`levels.NoiseFloor`)."""
        return self.noise_floor.db

    @property
    def silence_s(self) -> float:
        """Length of the current pause inside an open utterance."""
        return self.silence_frames * self.frame / SAMPLE_RATE

    def add(self, samples: np.ndarray, now: float) -> None:
        """Append audio and classify every whole frame of it."""
        self.buffer.append(samples)
        while self.received - self.vad_pos >= self.frame:
            self._classify_frame(now)

    def close_open(self, now: float) -> None:
        """Close the open utterance at the end of the audio (the session ends)."""
        if self.open is not None:
            self._close(self.received, now)

    def finalize(self, now: float) -> None:
        """Close the open utterance where the audio received so far ends (a finalize): its final comes now."""
        if self.open is not None:
            self._close(max(self.received, self.open.start), now)

    def close_at(self, end: int, now: float) -> None:
        """Close the open utterance at session sample `end` (a sentence ended in a pause)."""
        self._close(end, now)

    def samples(self, start: int, end: int) -> np.ndarray:
        return self.buffer.slice(start, end)

    def _frames(self, seconds: float) -> float:
        return seconds * SAMPLE_RATE / self.frame

    @property
    def _min_speech_frames(self) -> float:
        """Speech frames an utterance needs to be more than a click or a breath."""
        return self._frames(self.options.min_speech_s)

    def _classify_frame(self, now: float) -> None:
        opts = self.options
        # No endpoint (the session asked for none): no pause ends an utterance, so none is decoded ahead either.
        endpoint_frames = 0 if opts.endpoint_silence_s is None else max(1, round(self._frames(opts.endpoint_silence_s)))
        # The cut is known once the pause is longer than the tail kept after speech.
        speculate_frames = round(self._frames(max(opts.speculate_after_s, opts.tail_pad_s))) + 1
        frame_start = self.vad_pos
        self.vad_pos += self.frame
        frame = self.samples(frame_start, self.vad_pos)
        speech = self._is_speech(frame)
        self.record.add(frame, speech)
        if speech:
            self._speech(frame_start)
        elif self.open is not None:
            self.silence_frames += 1
            cut = min(self.vad_pos, self._last_speech_end + int(opts.tail_pad_s * SAMPLE_RATE))
            if endpoint_frames and self.silence_frames >= endpoint_frames:
                self._close(cut, now)
            elif endpoint_frames and self.silence_frames == min(speculate_frames, endpoint_frames - 1):
                self.open.speculate_end = cut
        if self.open is not None and self.vad_pos - self.open.start >= int(opts.max_utterance_s * SAMPLE_RATE):
            self._force_cut(now)

    def _is_speech(self, frame: np.ndarray) -> bool:
        """The detector's verdict; but where it hears the background as speech (babble), only the speaker
        being transcribed counts, who is louder than the crowd: the last moment must stand out from the floor.
        Not where the speaker stands near the floor of a background the detector hears pauses in (a low SNR in
        steady noise, not babble): there the gate would cut words, and the detector tells speech from noise."""
        level = level_db(frame)
        self.levels.drop_before(self.buffer.start)
        self.levels.add(level)
        self.noise_floor.add(level)
        self.long_levels.add(level)
        speech = self.vad.is_speech(frame)  # always called: a detector's state follows every frame
        self.background_talk.add(level, self.noise_floor.db, speech)
        gate = self.options.speech_above_floor_db
        talk = self.background_talk
        if not speech or gate <= 0 or not talk.heard:
            return speech
        if talk.pauses_heard and self.long_levels.headroom_db() < self.NEAR_FLOOR_GATES * gate:
            return speech
        frames = max(1, round(self._frames(self.LEVEL_WINDOW_S)))
        recent = self.levels.span_db(self.vad_pos - frames * self.frame, self.vad_pos)
        return recent >= self.noise_floor.db + gate

    def _speech(self, frame_start: int) -> None:
        self.silence_frames = 0
        self._last_speech_end = self.vad_pos
        if self.open is None:
            start = max(self.buffer.start, frame_start - int(self.options.preroll_s * SAMPLE_RATE))
            start = max(start, self._last_cut)  # never re-read audio an earlier utterance owns
            self.open = Utterance(start=start, interim_at=self.vad_pos, onset=frame_start)
        self.open.speculate_end = None
        self.open.speech_frames += 1
        if self.open.onset is not None and self.open.speech_frames == max(1, math.ceil(self._min_speech_frames)):
            self.speech_starts.append(self.open.onset)  # speech, not a click or a breath: it began at its onset
        self.open.speech_end = self.vad_pos

    def _force_cut(self, now: float) -> None:
        """A long run of speech with no pause: cut between the last two stable words if the interims
        agreed on some lately, else in the quietest frame of the last few seconds."""
        utt, frame = self.open, self.frame
        assert utt is not None
        search_from = max(utt.start + frame, self.vad_pos - 4 * SAMPLE_RATE)
        search_to = self.vad_pos
        boundary = stable_boundary(utt)
        if boundary is not None and boundary > search_from:
            search_from, search_to = self._around(utt, boundary)
        best = self._quietest(search_from, search_to)
        self._close(best, now)
        self.open = Utterance(start=best, speech_frames=1, speech_end=self.vad_pos, interim_at=self.vad_pos)

    def cut_at_sentence(self, cut: SentenceCut, now: float) -> None:
        """Commit the open utterance at a confirmed sentence end: close it in the quietest frame near the
        boundary, and open the next one there, holding the words the interims heard after it."""
        utt = self.open
        assert utt is not None
        end = self._quietest(*self._around(utt, int(cut.boundary_s * SAMPLE_RATE)))
        seam = Seam(end / SAMPLE_RATE, cut.committed, cut.carried)
        utt.seam_after = seam
        self._close(end, now)
        self.open = Utterance(
            start=end,
            speech_frames=max(1, (self.vad_pos - end) // self.frame),  # heard already: speech up to now
            speech_end=max(end, utt.speech_end),
            interim_at=self.vad_pos,
            speculate_end=utt.speculate_end if (utt.speculate_end or 0) > end else None,  # in a pause: it goes on
            words=cut.carried,
            seam_before=seam,
        )

    def _around(self, utt: Utterance, boundary: int) -> tuple[int, int]:
        """Where to cut near a word boundary: word times are only good to ~0.1 s."""
        reach = int(0.15 * SAMPLE_RATE)
        return max(utt.start + self.frame, boundary - reach), min(self.vad_pos, boundary + reach + self.frame)

    def _quietest(self, search_from: int, search_to: int) -> int:
        """The middle of the quietest frame in [search_from, search_to)."""
        frame = self.frame
        best, best_energy = search_to, None
        for pos in range(search_from, search_to - frame + 1, frame // 2):
            energy = float(np.mean(self.samples(pos, pos + frame).astype(np.float32) ** 2))
            if best_energy is None or energy <= best_energy:  # ties: the latest, for the longest window
                best, best_energy = pos + frame // 2, energy
        return best

    def _close(self, end: int, now: float) -> None:
        utt, self.open = self.open, None
        assert utt is not None
        utt.end = end
        utt.closed_at = now
        self._last_cut = end
        if utt.speech_frames < self._min_speech_frames and utt.segment_id is None:
            return  # a click or a breath: nothing to say, and its audio gets acked as silence
        self.closed.append(utt)


def stable_boundary(utt: Utterance) -> int | None:
    """Session sample between the last stable word and the word after it, if both are known."""
    stable, unstable = utt.words.stable, utt.words.unstable
    if not stable or not unstable:
        return None
    gap_start, gap_end = stable[-1].end, max(stable[-1].end, unstable[0].start)
    return int((gap_start + gap_end) / 2 * SAMPLE_RATE)
