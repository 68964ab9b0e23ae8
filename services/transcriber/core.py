"""One session's live transcription, with no I/O: audio in, decode jobs out, segments back.

The flow per session: audio is appended and classified in 30 ms VAD frames; speech opens an
utterance; trailing silence (or the maximum length) closes it. A closed utterance becomes a
"final" decode job, an open one an occasional "interim" job. Utterances never overlap, so a
word can't be emitted twice, and audio is acknowledged only once the segment covering it is out.

Latency: a final is decoded speculatively once the speaker has paused for `speculate_after_s`,
on exactly the audio the endpoint will cut; if the pause becomes an endpoint, that result is the
final and no second decode is needed. Interims mark the words two consecutive hypotheses agree on
as stable (LocalAgreement); a long utterance is cut at a stable word boundary.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from shared.wire import Segment, SessionCheckpoint, Word

SAMPLE_RATE = 16000
FRAME_SAMPLES = 480  # 30 ms, a frame size webrtcvad accepts


@dataclass(frozen=True)
class CommitOptions:
    endpoint_silence_s: float = 0.5
    max_utterance_s: float = 15.0
    interim_every_s: float = 1.0  # the fastest interim rate; under load it is slowed (`DecodeLoad`)
    first_interim_s: float = 0.6  # speech heard before an utterance's first interim
    speculate_after_s: float = 0.2  # pause after which the final is decoded ahead of the endpoint
    sentence_endpoint_s: float = 0.0  # >0: an early final this long that ends a sentence ends its utterance
    min_speech_s: float = 0.15  # shorter bursts (clicks, breaths) are dropped without decoding
    preroll_s: float = 0.3  # audio kept before the first speech frame, so onsets aren't clipped
    tail_pad_s: float = 0.2  # silence kept after the last speech frame
    beam_size: int = 5
    interim_beam_size: int = 1
    final_window: Literal["full", "short"] = "full"  # bench/windows.py: short costs base accuracy, not tiny's
    prompt_words: int = 40


@dataclass
class DecodedSegment:
    """One Whisper segment: words with times relative to the decoded audio, plus its quality signals."""

    words: list[Word]
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 1.0


@dataclass
class Decoded:
    segments: list[DecodedSegment]
    language: str | None = None
    language_probability: float = 0.0


@dataclass(frozen=True)
class DecodeJob:
    kind: Literal["final", "interim"]
    audio: np.ndarray  # float32, 16 kHz mono
    start_sample: int  # session sample index of audio[0]
    end_sample: int
    language: str | None
    prompt: str
    beam_size: int
    speech_end_sample: int = 0  # where the VAD last heard speech; words after it are suspect
    window: Literal["full", "short"] = "full"  # encoder window: short is cheaper, full is more accurate
    speculative: bool = False  # a final decoded before its endpoint is certain
    ready: Decoded | None = None  # decoded already (by a speculative job): no model call needed


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
    speculate_end: int | None = None  # where the endpoint will cut if the current pause lasts
    speculation: tuple[DecodeJob, Decoded] | None = None  # a final decoded ahead of the endpoint
    stable: list[Word] = field(default_factory=list)  # interim words agreed by consecutive hypotheses
    unstable: list[Word] = field(default_factory=list)  # the rest of the latest hypothesis


class SampleBuffer:
    """int16 samples addressed by session sample index; appends are amortised O(chunk), not O(buffer)."""

    def __init__(self):
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
        self._data[used:used + len(samples)] = samples
        self.end += len(samples)

    def slice(self, start: int, end: int) -> np.ndarray:
        return self._data[start - self.start:end - self.start]

    def drop_before(self, index: int) -> None:
        cut = min(max(index, self.start), self.end) - self.start
        if cut:
            used = self.end - self.start
            self._data[:used - cut] = self._data[cut:used]
            self.start += cut


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
    tokens = [_norm(w.word) for w in words]
    for n in range(1, 5):
        run = 1
        for i in range(n, len(tokens) - n + 1, n):
            if tokens[i:i + n] == tokens[i - n:i]:
                run += 1
                if run > max_repeats:
                    return True
            else:
                run = 1
    return False


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


class SessionStream:
    """The live state of one session on the worker that owns it."""

    def __init__(self, tenant: str, session_id: str, *, language: str | None, model: str, worker_id: str,
                 options: CommitOptions, is_speech: Callable[[bytes], bool]):
        self.tenant = tenant
        self.session_id = session_id
        self.language = language
        self.model = model
        self.worker_id = worker_id
        self.options = options
        self._is_speech = is_speech

        self.buffer = SampleBuffer()
        self.vad_pos = 0  # samples classified by VAD so far
        self.chunks: deque[tuple[int, int, int]] = deque()  # (seq, first sample, end sample), not yet acked
        self.last_seq = -1
        self.chunks_received = 0
        self.acked_through = -1
        self.acked_samples = 0  # where the chunk after acked_through begins
        self.last_audio_at = 0.0

        self.open: Utterance | None = None
        self.closed: deque[Utterance] = deque()
        self._silence_frames = 0
        self._last_speech_end = 0
        self._last_cut = 0
        self._interim_at = 0  # vad_pos at the last interim job
        self.next_segment_id = 0
        self.committed_words: deque[str] = deque(maxlen=options.prompt_words)
        self.finals_published = 0
        self.ending = False
        self.end_reason = ""  # "" (the bot ended it) or "idle_timeout"
        self.handing_over = False
        self.busy = False  # a decode job is in flight, or its segments are not yet published
        self._publishing = False  # applied, segments not yet published

    # --- checkpoints ------------------------------------------------------------------------
    def restore(self, checkpoint: SessionCheckpoint) -> None:
        """Continue from a checkpoint: replayed chunks up to its acked_seq are skipped, and the next
        one lands at the session sample where it was, so times, ids and context carry on."""
        self.last_seq = self.acked_through = checkpoint.acked_seq
        self.acked_samples = checkpoint.acked_samples
        self.chunks_received = checkpoint.chunks_received
        self.buffer.start = self.buffer.end = self.vad_pos = self._last_cut = checkpoint.acked_samples
        self._last_speech_end = self._interim_at = checkpoint.acked_samples
        self.next_segment_id = checkpoint.next_segment_id
        self.committed_words.extend(checkpoint.committed_tail)
        self.language = self.language or checkpoint.language

    def checkpoint(self, acked_seq: int, acked_samples: int, now: float, finished: bool = False) -> SessionCheckpoint:
        """The state to save once the chunks up to `acked_seq` (from `take_ackable`) are acked."""
        pending = [u.segment_id for u in [*self.closed, self.open] if u is not None and u.segment_id is not None]
        return SessionCheckpoint(
            tenant=self.tenant, session_id=self.session_id, acked_seq=acked_seq, acked_samples=acked_samples,
            chunks_received=self.chunks_received, next_segment_id=min(pending, default=self.next_segment_id),
            committed_tail=list(self.committed_words), language=self.language, finished=finished,
            worker_id=self.worker_id, updated_at=now,
        )

    # --- audio in -------------------------------------------------------------------------
    def add_audio(self, seq: int, samples: np.ndarray, now: float) -> bool:
        """Append a chunk; False if this seq was already seen (a redelivery)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        self.last_audio_at = now
        self.chunks_received += 1
        self.chunks.append((seq, self.received, self.received + len(samples)))
        self.buffer.append(samples)
        self._classify(now)
        return True

    @property
    def received(self) -> int:
        """Samples received so far."""
        return self.buffer.end

    def end(self, now: float, reason: str = "") -> None:
        """The bot ended the session (or it was idle too long): close what is open, so everything
        left gets a final."""
        self.ending = True
        self.end_reason = self.end_reason or reason
        if self.open is not None:
            self._close(self.received, now)

    def hand_over(self) -> None:
        """This worker gives the session up (drain, rebalance): finish the finals of closed utterances
        and stop there. An utterance still open is not cut mid-word: its audio stays unacked, and the
        next owner decodes it whole from the checkpoint."""
        self.handing_over = True

    @property
    def settled(self) -> bool:
        """Handing over: every closed utterance has its final out."""
        return not self.closed and not self.busy

    def _classify(self, now: float) -> None:
        opts = self.options
        endpoint_frames = max(1, round(opts.endpoint_silence_s * SAMPLE_RATE / FRAME_SAMPLES))
        # The cut is known once the pause is longer than the tail kept after speech.
        speculate_frames = round(max(opts.speculate_after_s, opts.tail_pad_s) * SAMPLE_RATE / FRAME_SAMPLES) + 1
        max_len = int(opts.max_utterance_s * SAMPLE_RATE)
        while self.received - self.vad_pos >= FRAME_SAMPLES:
            frame_start = self.vad_pos
            frame = self._samples(frame_start, frame_start + FRAME_SAMPLES)
            self.vad_pos += FRAME_SAMPLES
            speech = self._is_speech(frame.tobytes())
            if speech:
                self._silence_frames = 0
                self._last_speech_end = self.vad_pos
                if self.open is not None:
                    self.open.speculate_end = None
                if self.open is None:
                    start = max(self.buffer.start, frame_start - int(opts.preroll_s * SAMPLE_RATE))
                    start = max(start, self._last_cut)  # never re-read audio an earlier utterance owns
                    self.open = Utterance(start=start)
                    self._interim_at = self.vad_pos
                self.open.speech_frames += 1
                self.open.speech_end = self.vad_pos
            elif self.open is not None:
                self._silence_frames += 1
                cut = min(self.vad_pos, self._last_speech_end + int(opts.tail_pad_s * SAMPLE_RATE))
                if self._silence_frames >= endpoint_frames:
                    self._close(cut, now)
                elif self._silence_frames == min(speculate_frames, endpoint_frames - 1):
                    self.open.speculate_end = cut
            if self.open is not None and self.vad_pos - self.open.start >= max_len:
                self._force_cut(now)

    def _force_cut(self, now: float) -> None:
        """A long run of speech with no pause: cut between the last two stable words if the interims
        agreed on some lately, else in the quietest frame of the last few seconds."""
        utt = self.open
        search_from = max(utt.start + FRAME_SAMPLES, self.vad_pos - 4 * SAMPLE_RATE)
        search_to = self.vad_pos
        boundary = self._stable_boundary(utt)
        if boundary is not None and boundary > search_from:
            # Word times are only good to ~0.1 s: take the quietest frame around the boundary.
            search_from = max(utt.start + FRAME_SAMPLES, boundary - int(0.15 * SAMPLE_RATE))
            search_to = min(self.vad_pos, boundary + int(0.15 * SAMPLE_RATE) + FRAME_SAMPLES)
        best, best_energy = search_to, None
        for pos in range(search_from, search_to - FRAME_SAMPLES + 1, FRAME_SAMPLES // 2):
            energy = float(np.mean(self._samples(pos, pos + FRAME_SAMPLES).astype(np.float32) ** 2))
            if best_energy is None or energy <= best_energy:  # ties: the latest, for the longest window
                best, best_energy = pos + FRAME_SAMPLES // 2, energy
        self._close(best, now)
        self.open = Utterance(start=best, speech_frames=1, speech_end=self.vad_pos)
        self._interim_at = self.vad_pos

    @staticmethod
    def _stable_boundary(utt: Utterance) -> int | None:
        """Session sample between the last stable word and the word after it, if both are known."""
        if not utt.stable or not utt.unstable:
            return None
        gap_start, gap_end = utt.stable[-1].end, max(utt.stable[-1].end, utt.unstable[0].start)
        return int((gap_start + gap_end) / 2 * SAMPLE_RATE)

    def _close(self, end: int, now: float) -> None:
        utt, self.open = self.open, None
        utt.end = end
        utt.closed_at = now
        self._last_cut = end
        min_frames = self.options.min_speech_s * SAMPLE_RATE / FRAME_SAMPLES
        if utt.speech_frames < min_frames and utt.segment_id is None:
            return  # a click or a breath: nothing to say, and its audio gets acked as silence
        self.closed.append(utt)

    def _samples(self, start: int, end: int) -> np.ndarray:
        return self.buffer.slice(start, end)

    # --- scheduling -----------------------------------------------------------------------
    def final_due_since(self) -> float | None:
        """When the oldest utterance waiting for its final closed, or None."""
        if self.busy or not self.closed:
            return None
        return self.closed[0].closed_at

    def speculation_due(self) -> bool:
        """The speaker paused: decode the final now, on the audio the endpoint would cut."""
        utt = self.open
        if self.busy or self.closed or utt is None or utt.speculate_end is None or self.handing_over:
            return False
        return utt.speculation is None or utt.speculation[0].end_sample != utt.speculate_end

    def interim_due(self, every_s: float | None = None) -> bool:
        utt = self.open
        if self.busy or self.closed or utt is None or self.ending or self.handing_over:
            return False
        if self._silence_frames >= 3:
            return False  # in a pause the early final is coming; an interim would only delay it
        if self.vad_pos - utt.start < self.options.first_interim_s * SAMPLE_RATE:
            return False
        if not utt.interim_jobs:
            return True
        every = self.options.interim_every_s if every_s is None else every_s
        return self.vad_pos - self._interim_at >= every * SAMPLE_RATE - FRAME_SAMPLES  # VAD frames are 30 ms

    @property
    def interim_backlog(self) -> int:
        """Samples heard since the last interim."""
        return self.vad_pos - self._interim_at

    def next_job(self, interim_every_s: float | None = None) -> DecodeJob | None:
        """The decode this session needs most: its oldest final, else a speculative final of a
        paused utterance, else an interim of the open one."""
        if self.busy:
            return None
        prompt = " ".join(self.committed_words)
        if self.closed:
            utt = self.closed[0]
            if utt.speculation is not None and utt.speculation[0].end_sample == utt.end:
                job, decoded = utt.speculation  # the pause became an endpoint: the final is decoded
                self.busy = True
                return DecodeJob(kind="final", audio=job.audio, start_sample=job.start_sample,
                                 end_sample=job.end_sample, language=job.language, prompt=job.prompt,
                                 beam_size=job.beam_size, speech_end_sample=job.speech_end_sample, ready=decoded)
            kind, end, speculative = "final", utt.end, False
        elif self.speculation_due():
            utt, kind, end, speculative = self.open, "final", self.open.speculate_end, True
        elif self.interim_due(interim_every_s):
            utt, kind, end, speculative = self.open, "interim", self.vad_pos, False
            self._interim_at = end
            utt.interim_jobs += 1
        else:
            return None
        audio = self._samples(utt.start, end).astype(np.float32) / 32768.0
        self.busy = True
        if kind == "interim":
            return DecodeJob(kind="interim", audio=audio, start_sample=utt.start, end_sample=end,
                             language=self.language, prompt=prompt, beam_size=self.options.interim_beam_size,
                             speech_end_sample=end, window="short")
        return DecodeJob(kind="final", audio=audio, start_sample=utt.start, end_sample=end, language=self.language,
                         prompt=prompt, beam_size=self.options.beam_size,
                         speech_end_sample=min(utt.speech_end, end), speculative=speculative,
                         window=self.options.final_window)

    @property
    def finished(self) -> bool:
        return self.ending and self.open is None and not self.closed and not self.busy

    # --- decode results -------------------------------------------------------------------
    def apply(self, job: DecodeJob, decoded: Decoded, now: float) -> list[Segment]:
        """Turn a decode result into the segments to publish (possibly none).

        The session stays busy, and acks nothing, until `published()` says those segments are out.
        """
        self._publishing = True
        if self.language is None and decoded.language and decoded.language_probability >= 0.5:
            self.language = decoded.language
        words = self._session_words(job, keep_trustworthy(decoded.segments))
        words = drop_trailing_inventions(words, job.speech_end_sample / SAMPLE_RATE)
        if job.speculative:
            closed = self.closed[0] if self.closed else None
            if closed is not None and (closed.start, closed.end) == (job.start_sample, job.end_sample):
                return self._final(words, job, now)  # the endpoint came while it decoded: it is the final
            utt = self.open
            if utt is None or utt.start != job.start_sample:
                return []  # cut elsewhere meanwhile; that utterance gets its own final
            utt.speculation = (job, decoded)  # the final, if this pause becomes an endpoint
            if (self.options.sentence_endpoint_s > 0 and utt.speculate_end == job.end_sample and ends_sentence(words)
                    and job.end_sample - job.start_sample >= self.options.sentence_endpoint_s * SAMPLE_RATE):
                # Still in the same pause, after a whole sentence: end the utterance here rather than
                # wait for 0.5 s of silence that a quick speaker never leaves.
                self._close(job.end_sample, now)
                return self._final(words, job, now)
        if job.kind == "interim" or job.speculative:
            utt = self.open
            if utt is None or utt.start != job.start_sample or not words:
                return []  # that utterance closed meanwhile; its final is coming
            words, stable = agree(utt, words)
            return [self._segment(utt, "interim", words, job, now, stable)]
        return self._final(words, job, now)

    def _final(self, words: list[Word], job: DecodeJob, now: float) -> list[Segment]:
        utt = self.closed.popleft()
        self.finals_published += 1
        if not words and utt.segment_id is None:
            return []
        self.committed_words.extend(w.word.strip() for w in words)
        return [self._segment(utt, "final", words, job, now)]

    def _session_words(self, job: DecodeJob, words: list[Word]) -> list[Word]:
        offset = job.start_sample / SAMPLE_RATE
        limit = job.end_sample / SAMPLE_RATE
        out = []
        for w in words:
            start = min(offset + float(w.start), limit)
            end = min(max(offset + float(w.end), start), limit)
            out.append(Word(w.word, round(start, 3), round(end, 3), round(float(w.probability), 3)))
        return out

    def _segment(self, utt: Utterance, status: str, words: list[Word], job: DecodeJob, now: float,
                 stable_words: int = 0) -> Segment:
        if utt.segment_id is None:
            utt.segment_id = self.next_segment_id
            self.next_segment_id += 1
        utt.revision += 1
        start = words[0].start if words else job.start_sample / SAMPLE_RATE
        end = words[-1].end if words else job.end_sample / SAMPLE_RATE
        seqs = [seq for seq, first, last in self.chunks if first < job.end_sample and last > job.start_sample]
        return Segment(
            tenant=self.tenant, session_id=self.session_id, segment_id=utt.segment_id, revision=utt.revision,
            status=status, start=start, end=end, text="".join(w.word for w in words).strip(), words=words,
            stable_words=stable_words, language=self.language, model=self.model, seq_first=seqs[0] if seqs else self.last_seq,
            seq_last=seqs[-1] if seqs else self.last_seq, worker_id=self.worker_id, published_at=now,
        )

    def published(self) -> None:
        """The segments of the last `apply` are in the stream: their audio may be acked now."""
        self.busy = self._publishing = False

    def decode_failed(self) -> None:
        """The job raised; it will be offered again by `next_job`."""
        self.busy = False

    def abandon(self, job: DecodeJob, now: float) -> list[Segment]:
        """Give up on a job that cannot be decoded: an interim is skipped; a final becomes empty, so
        its audio is accounted for and any interims of it are retracted."""
        return self.apply(job, Decoded([]), now)

    # --- acknowledgement ------------------------------------------------------------------
    def take_ackable(self) -> list[int]:
        """Seqs whose audio is fully accounted for (published as segments, or silence); trims the buffer."""
        if self._publishing:
            return []  # the applied job's utterance is gone from `closed` but its segments aren't out yet
        if self.finished:
            boundary = self.received
        else:
            pending = [u.start for u in self.closed]
            if self.open is not None:
                pending.append(self.open.start)
            boundary = min(pending, default=self.vad_pos - int(self.options.preroll_s * SAMPLE_RATE))
        seqs = []
        while self.chunks and self.chunks[0][2] <= boundary:
            seq, _, self.acked_samples = self.chunks.popleft()
            seqs.append(seq)
        if seqs:
            self.acked_through = seqs[-1]
        self.buffer.drop_before(min(boundary, self.vad_pos))
        return seqs


def agree(utt: Utterance, words: list[Word]) -> tuple[list[Word], int]:
    """LocalAgreement-2 over an utterance's interim hypotheses: a word becomes stable once two
    consecutive hypotheses agree on it (and on everything before it). Stable words stay as they
    are; returns the words to show (stable, then the newest guesses) and how many are stable."""
    stable = utt.stable
    n = _common_prefix(stable, words)
    if n == len(stable):
        fresh = words[n:]
    else:  # the model revised a stable word: keep ours, take its guesses after them
        fresh = [w for w in words if w.start >= stable[-1].end - 0.05]
        while fresh and stable and _norm(fresh[0].word) == _norm(stable[-1].word):
            fresh = fresh[1:]  # the stable word itself, timed a little early
    agreed = _common_prefix(utt.unstable, fresh)
    stable.extend(fresh[:agreed])
    utt.unstable = fresh[agreed:]
    return stable + utt.unstable, len(stable)


def ends_sentence(words: list[Word]) -> bool:
    return bool(words) and words[-1].word.rstrip().endswith((".", "?", "!"))


def _common_prefix(a: list[Word], b: list[Word]) -> int:
    n = 0
    while n < len(a) and n < len(b) and _norm(a[n].word) == _norm(b[n].word):
        n += 1
    return n


class DecodeLoad:
    """Recent decode cost, to slow interims down when the worker is busy: interims of all speaking
    sessions together may take at most half of the decode loop, so finals never queue behind them."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.interim_s = 0.0

    def observe(self, job: DecodeJob, seconds: float) -> None:
        if job.kind == "interim":
            self.interim_s = seconds if not self.interim_s else (
                self.smoothing * seconds + (1 - self.smoothing) * self.interim_s)

    def interim_every(self, fastest_s: float, speaking_sessions: int) -> float:
        return max(fastest_s, 2.0 * speaking_sessions * self.interim_s)


def pick_next(streams: list[SessionStream], interim_every_s: float | None = None) -> SessionStream | None:
    """Which session decodes next: the oldest pending final first, then a paused utterance's
    speculative final, then the most starved interim."""
    finals = [(s.final_due_since(), i) for i, s in enumerate(streams) if s.final_due_since() is not None]
    if finals:
        return streams[min(finals)[1]]
    paused = [s for s in streams if s.speculation_due()]
    if paused:
        return paused[0]
    interims = [s for s in streams if s.interim_due(interim_every_s)]
    if interims:
        return max(interims, key=lambda s: s.interim_backlog)
    return None
