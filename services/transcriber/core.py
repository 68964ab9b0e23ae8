"""One session's live transcription, with no I/O: messages in, one `Step` of things to do out.

The shell hands the session each audio message (`receive`), each decode result or failure (`complete`)
and the passing of time (`tick`); every call returns a `Step` saying all the shell must do, in the one
order `Step` documents. The parts: `segmenter` (utterances from the VAD), `evidence` (what the VAD heard
under each job), `agreement` (word guards and LocalAgreement), `ledger` (which message is acked when).
Decisions live here: admission, the buffer limit, the idle timeout, the decode retry budget, the checkpoint
cadence, and the totals of what the guards removed.

Latency: a final is decoded speculatively once the speaker has paused for `speculate_after_s`, on exactly
the audio the endpoint will cut; if the pause becomes an endpoint, that result is the final and no second
decode is needed. Interims mark the words two consecutive hypotheses agree on as stable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np

from jetscribe.services.transcriber.agreement import (
    agree,
    drop_trailing_inventions,
    ends_sentence,
    holds_speech,
    keep_trustworthy,
)
from jetscribe.services.transcriber.decoding import Decoded, DecodeJob, JobKind
from jetscribe.services.transcriber.ledger import AckLedger, Receipt
from jetscribe.services.transcriber.options import CommitOptions, SessionLimits
from jetscribe.services.transcriber.segmenter import Utterance, UtteranceSegmenter
from jetscribe.services.transcriber.sentences import confirmed_sentence_end
from jetscribe.services.transcriber.vad import VoiceDetector
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import (
    AudioChunk,
    DroppedWord,
    ErrorEvent,
    Segment,
    SegmentStatus,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    SessionEventKind,
    Word,
)

M = TypeVar("M")
EventKind = SessionEventKind
EMPTY_FINAL_COVERAGE = 0.4  # a final with no words over audio the VAD heard this much speech in is a loss


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


@dataclass
class FinalAudit:
    """What the guards did to one final, for the shell's log: the words they removed, and whether it came
    out empty over audio that held speech (`empty_over_speech`). `segment_id` is None if nothing was published."""

    segment_id: int | None
    start: float  # seconds of session audio: the utterance
    end: float
    dropped: list[DroppedWord]
    empty_over_speech: bool


@dataclass
class Step(Generic[M]):
    """Everything the shell must do after one call, in this order: report `errors`, publish `segments`,
    then `events`, save `checkpoint` (retrying until it is stored), ack `ack`, nak `nak`; if `closed`,
    forget the session (it ended, was rejected or was handed over)."""

    errors: list[ErrorEvent] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    events: list[SessionEvent] = field(default_factory=list)
    checkpoint: SessionCheckpoint | None = None
    ack: list[M] = field(default_factory=list)
    nak: list[M] = field(default_factory=list)
    closed: bool = False
    notes: list[str] = field(default_factory=list)  # lines for the shell's log
    audits: list[FinalAudit] = field(default_factory=list)  # finals the guards removed words from, to log

    @property
    def empty(self) -> bool:
        return not (
            self.errors
            or self.segments
            or self.events
            or self.checkpoint
            or self.ack
            or self.nak
            or self.closed
            or self.audits
        )


class SessionStream(Generic[M]):
    """The live state of one session on the worker that owns it."""

    def __init__(
        self,
        tenant: str,
        session_id: str,
        *,
        language: str | None,
        model: str,
        worker_id: str,
        options: CommitOptions,
        vad: VoiceDetector,
        clock: Clock,
        limits: SessionLimits = SessionLimits(),
        checkpoint: SessionCheckpoint | None = None,
        sessions_before: int = 0,
    ):
        self.tenant, self.session_id = tenant, session_id
        self.language, self.model, self.worker_id = language, model, worker_id
        self.options, self.limits, self.clock = options, limits, clock
        self.segmenter = UtteranceSegmenter(vad, options)
        self.ledger: AckLedger[M] = AckLedger()
        self.next_segment_id = 0
        self.committed_words: deque[str] = deque(maxlen=options.prompt_words)
        self.finals_published = 0
        self.words_dropped = 0  # by the guards, from this session's finals
        self.empty_finals = 0  # finals with no words over audio that held speech
        self.last_audio_at = clock.monotonic()  # the idle clock starts when the session opens here
        self.ending = False
        self.end_reason = ""  # "" (the bot ended it) or "idle_timeout"
        self.handing_over = False
        self.busy = False  # a decode job is out
        self.gone = False  # closed here (ended, rejected, handed over, lost): nothing more to do
        self._after_close: Literal["ack", "nak", "drop"] = "ack"
        self._failures = 0
        self._audits: list[FinalAudit] = []
        self._admission: int | None = sessions_before  # None once decided
        if checkpoint is not None:
            self._restore(checkpoint)

    # --- inputs: each returns the Step to carry out ------------------------------------------------
    def receive(self, message: AudioChunk | SessionControl, handle: M) -> Step[M]:
        """A message of this session from AUDIO (`handle` is what the shell acks)."""
        step: Step[M] = Step()
        if self.gone:
            return self._after_closing(step, handle)
        if self._admission is not None and not self._admit(step):
            step.ack.append(handle)
            return step
        if self.handing_over:
            step.nak.append(handle)  # the next owner takes it
            return step
        if isinstance(message, SessionControl):
            if message.action == "start":
                step.ack.append(handle)  # nothing to keep: the session is open
                return self._settle(step)
            self.ledger.hold_end(handle)
            self.end()
            return self._settle(step)
        samples = np.frombuffer(message.payload, dtype="<i2")
        receipt = self.ledger.receive(message.seq, len(samples), handle)
        if receipt is Receipt.ACK_NOW:
            step.ack.append(handle)
        if receipt is not Receipt.NEW:
            return step
        self.last_audio_at = self.clock.monotonic()
        self.segmenter.add(samples, self.last_audio_at)
        if len(self.segmenter.buffer) > self.limits.max_buffered_s * SAMPLE_RATE:
            return self._reject(
                step,
                "buffer_full",
                f"more than {self.limits.max_buffered_s:g} s of audio "
                "waiting to be transcribed: the worker cannot keep up",
            )
        return self._settle(step)

    def complete(self, job: DecodeJob, result: Decoded | BaseException) -> Step[M]:
        """The result of `job` from `next_job`, or the exception its decode raised."""
        step: Step[M] = Step()
        if self.gone:
            return step
        self.busy = False
        if isinstance(result, BaseException):
            self._failures += 1
            if self._failures < self.limits.max_decode_attempts:
                return step  # offered again by `next_job`
            # Give up on this utterance rather than block the session (and every session behind it).
            step.errors.append(
                self._error(
                    "decode_failed",
                    f"utterance at {job.start_sample / SAMPLE_RATE:.2f} s could not be decoded: {result}",
                )
            )
            result = Decoded([])
        self._failures = 0
        step.segments += self._apply(job, result)
        return self._settle(step)

    def tick(self) -> Step[M]:
        """Time passed: end the session if it has had no audio for the idle timeout."""
        step: Step[M] = Step()
        if self.gone or self.ending:
            return step
        if self.clock.monotonic() - self.last_audio_at > self.limits.idle_timeout_s:
            step.notes.append(
                f"{self.tenant}/{self.session_id}: no audio for {self.limits.idle_timeout_s:.0f} s; ending it"
            )
            self.end("idle_timeout")
            return self._settle(step)
        return step

    def hand_over(self, force: bool = False) -> Step[M]:
        """This worker gives the session up (drain, rebalance): finish the finals of closed utterances
        and stop there. An open utterance is not cut mid-word: its audio stays unacked, and the next owner
        decodes it whole. With `force`, stop now; the next owner redoes what was not finished."""
        self.handing_over = True
        if self.gone or not (self.settled or force):
            return Step()  # the step completing the job in flight hands it over
        return self._give_back(Step())

    def drop(self) -> None:
        """The partition was lost: someone else owns this audio now; ack nothing, nak nothing."""
        self.ledger.forget()
        self.gone, self._after_close = True, "drop"

    # --- state ---------------------------------------------------------------------------------
    @property
    def open(self) -> Utterance | None:
        return self.segmenter.open

    @property
    def closed(self) -> deque[Utterance]:
        return self.segmenter.closed

    @property
    def received(self) -> int:
        """Samples received so far."""
        return self.segmenter.received

    @property
    def settled(self) -> bool:
        """Handing over: every closed utterance has its final out."""
        return not self.closed and not self.busy

    @property
    def finished(self) -> bool:
        return self.ending and self.open is None and not self.closed and not self.busy

    def end(self, reason: str = "") -> None:
        """The bot ended the session (or it was idle too long): close what is open, so everything left
        gets a final."""
        self.ending = True
        self.end_reason = self.end_reason or reason
        self.segmenter.close_open(self.clock.monotonic())

    # --- scheduling ----------------------------------------------------------------------------
    def final_due_since(self) -> float | None:
        """When the oldest utterance waiting for its final closed, or None."""
        if self.busy or self.gone or not self.closed:
            return None
        return self.closed[0].closed_at

    def speculation_due(self) -> bool:
        """The speaker paused: decode the final now, on the audio the endpoint would cut."""
        utt = self.open
        if self.busy or self.gone or self.closed or utt is None or utt.speculate_end is None or self.handing_over:
            return False
        return utt.speculation is None or utt.speculation[0].end_sample != utt.speculate_end

    def interim_due(self, every_s: float | None = None) -> bool:
        utt, seg = self.open, self.segmenter
        if self.busy or self.gone or self.closed or utt is None or self.ending or self.handing_over:
            return False
        if seg.silence_s >= 0.09:
            return False  # in a pause the early final is coming; an interim would only delay it
        if seg.vad_pos - utt.start < self.options.first_interim_s * SAMPLE_RATE:
            return False
        if not utt.interim_jobs:
            return True
        every = self.options.interim_every_s if every_s is None else every_s
        return seg.vad_pos - utt.interim_at >= every * SAMPLE_RATE - seg.frame  # VAD positions move by frames

    @property
    def interim_backlog(self) -> int:
        """Samples heard since the last interim."""
        return self.segmenter.vad_pos - self.open.interim_at if self.open is not None else 0

    def next_job(self, interim_every_s: float | None = None) -> DecodeJob | None:
        """The decode this session needs most: its oldest final, else a speculative final of a paused
        utterance, else an interim of the open one. Its result goes back through `complete`."""
        if self.busy or self.gone:
            return None
        kind: JobKind
        end: int | None
        if self.closed:
            utt, kind, end, speculative = self.closed[0], "final", self.closed[0].end, False
        elif self.speculation_due():
            assert self.open is not None  # speculation_due() checked it, and its speculate_end
            utt, kind, end, speculative = self.open, "final", self.open.speculate_end, True
        elif self.interim_due(interim_every_s):
            assert self.open is not None  # interim_due() checked it
            utt, kind, end, speculative = self.open, "interim", self.segmenter.vad_pos, False
            utt.interim_at = end
            utt.interim_jobs += 1
        else:
            return None
        assert end is not None  # a closed utterance has its end; speculation_due() checked speculate_end
        audio = self.segmenter.samples(utt.start, end).astype(np.float32) / 32768.0
        prompt = " ".join(self.committed_words)
        self.busy = True
        interim = kind == "interim"
        return DecodeJob(
            kind=kind,
            audio=audio,
            start_sample=utt.start,
            end_sample=end,
            language=self.language,
            prompt=prompt,
            beam_size=self.options.interim_beam_size if interim else self.options.beam_size,
            # an interim's words run to its end; a final's after the last speech frame are suspect
            speech_end_sample=end if interim else min(utt.speech_end, end),
            speculative=speculative,
            window="short" if interim else self.options.final_window,
            evidence=self.segmenter.record.evidence(utt.start, end),
        )

    # --- decode results --------------------------------------------------------------------------
    def _apply(self, job: DecodeJob, decoded: Decoded) -> list[Segment]:
        if self.language is None and decoded.language and decoded.language_probability >= 0.5:
            self.language = decoded.language
        timed = [replace(seg, words=self._session_words(job, seg.words)) for seg in decoded.segments]
        trusted = keep_trustworthy(timed, job.evidence)
        said = drop_trailing_inventions(trusted.kept, job.speech_end_sample / SAMPLE_RATE)
        words, dropped = said.kept, sorted(trusted.dropped + said.dropped, key=lambda w: w.start)
        if job.speculative:
            closed = self.closed[0] if self.closed else None
            if closed is not None and (closed.start, closed.end) == (job.start_sample, job.end_sample):
                return self._final(words, dropped, job)  # the endpoint came while it decoded: it is the final
            utt = self.open
            if utt is None or utt.start != job.start_sample:
                return []  # cut elsewhere meanwhile; that utterance gets its own final
            utt.speculation = (job, decoded)  # the final, if this pause becomes an endpoint
            if (
                self.options.sentence_endpoint_s > 0
                and utt.speculate_end == job.end_sample
                and ends_sentence(words)
                and job.end_sample - job.start_sample >= self.options.sentence_endpoint_s * SAMPLE_RATE
            ):
                # Still in the same pause, after a whole sentence: end the utterance here rather than
                # wait for 0.5 s of silence that a quick speaker never leaves.
                self.segmenter.close_at(job.end_sample, self.clock.monotonic())
                return self._final(words, dropped, job)
        if job.kind == "interim" or job.speculative:
            utt = self.open
            if utt is None or utt.start != job.start_sample or not (words := utt.own(words)):
                return []  # that utterance closed meanwhile (its final is coming), or nothing new was said
            shown, stable = agree(utt.words, words)
            segments = [self._segment(utt, "interim", shown, job, stable)]
            if job.kind == "interim":
                self._commit_sentence(utt, words)
            utt.last_hypothesis = words
            return segments
        return self._final(words, dropped, job)

    def _commit_sentence(self, utt: Utterance, hypothesis: list[Word]) -> None:
        """Speech with no pause is cut at a sentence end the interims confirmed (`sentences`); the part
        before gets its final as at any cut, and the part after goes on as a new utterance."""
        if self.handing_over:
            return  # the next owner decodes the open utterance whole
        start_s, after_s = utt.start / SAMPLE_RATE, self.options.commit_sentences_after_s
        cut = confirmed_sentence_end(utt.words, utt.last_hypothesis, hypothesis, start_s, after_s)
        if cut is not None:
            self.segmenter.cut_at_sentence(cut, self.clock.monotonic())

    def _ready_finals(self) -> list[Segment]:
        """Closed utterances whose final was decoded early, on exactly their audio: publish it now."""
        segments: list[Segment] = []
        while not self.busy and self.closed and self.closed[0].speculation is not None:
            job, decoded = self.closed[0].speculation
            if job.end_sample != self.closed[0].end:
                break
            self.closed[0].speculation = None
            segments += self._apply(replace(job, speculative=False), decoded)
        return segments

    def _final(self, words: list[Word], dropped: list[DroppedWord], job: DecodeJob) -> list[Segment]:
        """Publish an utterance's final; count what the guards removed from it (only finals count: an
        interim's words are decoded again). A final with removed words is published even if empty, to
        show them."""
        utt = self.closed.popleft()
        self.finals_published += 1
        words = utt.own(words)
        if utt.seam_after is not None:
            utt.seam_after.publish(words)  # the next utterance drops a head that repeats it
        self.words_dropped += len(dropped)
        start, end = job.start_sample / SAMPLE_RATE, job.end_sample / SAMPLE_RATE
        empty_over_speech = (
            not words and job.evidence is not None and holds_speech(job.evidence, start, end, EMPTY_FINAL_COVERAGE)
        )
        self.empty_finals += empty_over_speech
        segments = []
        if words or dropped or utt.segment_id is not None:
            self.committed_words.extend(w.word.strip() for w in words)
            segments.append(self._segment(utt, "final", words, job, dropped=dropped))
        if dropped or empty_over_speech:
            segment_id = segments[0].segment_id if segments else None
            self._audits.append(FinalAudit(segment_id, start, end, dropped, empty_over_speech))
        return segments

    @staticmethod
    def _session_words(job: DecodeJob, words: list[Word]) -> list[Word]:
        offset, limit = job.start_sample / SAMPLE_RATE, job.end_sample / SAMPLE_RATE
        out = []
        for w in words:
            start = min(offset + float(w.start), limit)
            end = min(max(offset + float(w.end), start), limit)
            out.append(Word(w.word, round(start, 3), round(end, 3), round(float(w.probability), 3)))
        return out

    def _segment(
        self,
        utt: Utterance,
        status: SegmentStatus,
        words: list[Word],
        job: DecodeJob,
        stable_words: int = 0,
        dropped: list[DroppedWord] | None = None,
    ) -> Segment:
        if utt.segment_id is None:
            utt.segment_id = self.next_segment_id
            self.next_segment_id += 1
        utt.revision += 1
        start = words[0].start if words else job.start_sample / SAMPLE_RATE
        end = words[-1].end if words else job.end_sample / SAMPLE_RATE
        seqs = self.ledger.seqs_overlapping(job.start_sample, job.end_sample) or [self.ledger.last_seq]
        return Segment(
            tenant=self.tenant,
            session_id=self.session_id,
            segment_id=utt.segment_id,
            revision=utt.revision,
            status=status,
            start=start,
            end=end,
            text="".join(w.word for w in words).strip(),
            words=words,
            stable_words=stable_words,
            language=self.language,
            model=self.model,
            seq_first=seqs[0],
            seq_last=seqs[-1],
            worker_id=self.worker_id,
            published_at=self.clock.wall(),
            dropped=dropped or [],
        )

    # --- acks, checkpoints and the session's end -------------------------------------------------
    def _settle(self, step: Step[M]) -> Step[M]:
        """Account for what is done, and say whether a checkpoint (and so which acks) is due."""
        step.segments += self._ready_finals()
        step.audits, self._audits = step.audits + self._audits, []  # the finals above, and any before them
        if self.finished:
            return self._finish(step)
        pending = [u.start for u in self.closed] + ([self.open.start] if self.open is not None else [])
        boundary = min(pending, default=self.segmenter.vad_pos - int(self.options.preroll_s * SAMPLE_RATE))
        self.ledger.account(boundary)
        self.segmenter.buffer.drop_before(min(boundary, self.segmenter.vad_pos))
        self.segmenter.record.drop_before(min(boundary, self.segmenter.vad_pos))
        if self.handing_over and self.settled:
            return self._give_back(step)
        if self.ledger.checkpoint_due(self.finals_published, self.limits.checkpoint_every_s):
            step.ack += self.ledger.take_accounted(self.finals_published)
            step.checkpoint = self._checkpoint()
        return step

    def _finish(self, step: Step[M]) -> Step[M]:
        step.ack += self.ledger.take_all()
        step.events.append(self._event("ended", self.end_reason))
        step.checkpoint = self._checkpoint(finished=True)
        step.closed = self.gone = True
        return step

    def _reject(self, step: Step[M], code: str, message: str) -> Step[M]:
        step.ack += self.ledger.take_all()  # nobody will transcribe it: don't let it come back
        step.errors.append(self._error(code, message))
        step.events.append(self._event("rejected", code))
        step.checkpoint = self._checkpoint(finished=True)
        step.closed = self.gone = True
        return step

    def _give_back(self, step: Step[M]) -> Step[M]:
        if self.ledger.checkpoint_due(self.finals_published, self.limits.checkpoint_every_s, force=True):
            step.ack += self.ledger.take_accounted(self.finals_published)
            step.checkpoint = self._checkpoint()
        step.nak += self.ledger.give_back()  # the next owner gets them at once
        step.closed = self.gone = True
        self._after_close = "nak"
        return step

    def _after_closing(self, step: Step[M], handle: M) -> Step[M]:
        if self._after_close == "ack":
            step.ack.append(handle)  # a late redelivery of a session that is over
        elif self._after_close == "nak":
            step.nak.append(handle)
        return step

    def _admit(self, step: Step[M]) -> bool:
        """A new session (no checkpoint): take it if the worker has room, announcing it; else reject it."""
        others, self._admission = self._admission, None
        if others is not None and others >= self.limits.max_sessions:
            self._reject(
                step,
                "worker_full",
                f"this worker already has {self.limits.max_sessions} sessions (JETSCRIBE_MAX_SESSIONS_PER_WORKER)",
            )
            return False
        step.events.append(self._event("started"))
        step.checkpoint = self._checkpoint()  # the language is known to whoever takes over
        return True

    def _restore(self, checkpoint: SessionCheckpoint) -> None:
        """Continue from a checkpoint: replayed chunks up to its acked_seq are acked at once, and the next
        one lands at the session sample where it was, so times, ids, totals and context carry on."""
        self._admission = None
        self.ledger = AckLedger(checkpoint.acked_seq, checkpoint.acked_samples, checkpoint.chunks_received)
        self.segmenter.restore(checkpoint.acked_samples)
        self.next_segment_id = checkpoint.next_segment_id
        self.committed_words.extend(checkpoint.committed_tail)
        self.language = self.language or checkpoint.language
        self.words_dropped, self.empty_finals = checkpoint.words_dropped, checkpoint.empty_finals

    def _checkpoint(self, finished: bool = False) -> SessionCheckpoint:
        pending = [u.segment_id for u in [*self.closed, self.open] if u is not None and u.segment_id is not None]
        return SessionCheckpoint(
            tenant=self.tenant,
            session_id=self.session_id,
            acked_seq=self.ledger.acked_seq,
            acked_samples=self.ledger.acked_samples,
            chunks_received=self.ledger.acked_chunks,
            next_segment_id=min(pending, default=self.next_segment_id),
            committed_tail=list(self.committed_words),
            language=self.language,
            finished=finished,
            worker_id=self.worker_id,
            updated_at=self.clock.wall(),
            words_dropped=self.words_dropped,
            empty_finals=self.empty_finals,
        )

    def _event(self, event: EventKind, reason: str = "") -> SessionEvent:
        return SessionEvent(
            tenant=self.tenant,
            session_id=self.session_id,
            event=event,
            at=self.clock.wall(),
            reason=reason,
            language=self.language,
            model=self.model,
            chunks_received=self.ledger.chunks_received,
            audio_seconds=self.received / SAMPLE_RATE,
            segments=self.next_segment_id,
            worker_id=self.worker_id,
            words_dropped=self.words_dropped,
            empty_finals=self.empty_finals,
        )

    def _error(self, code: str, message: str) -> ErrorEvent:
        return ErrorEvent(
            tenant=self.tenant, session_id=self.session_id, code=code, message=message, at=self.clock.wall()
        )


def is_reused(message: AudioChunk | SessionControl) -> bool:
    """A message for a finished session is a new use of its id if it starts the session again; audio
    stored after the session ended or was rejected (before the gateway heard so) is only late."""
    return isinstance(message, SessionControl) and message.action == "start"
