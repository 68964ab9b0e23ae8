"""One session's live transcription, with no I/O: messages in, one `Step` of things to do out.

The shell hands the session each audio message (`receive`), each decode result or failure (`complete`)
and the passing of time (`tick`); every call returns a `Step` saying all the shell must do, in the one
order `Step` documents. The parts: `segmenter` (utterances from the VAD), `evidence` (what the VAD heard
under each job), `transcript` (decode results into segments, with `agreement`'s word guards and
LocalAgreement; the guard totals; the messages that report the session), `ledger` (which message is acked
when). Decisions live here: admission, the buffer limit, the idle timeout, the decode retry budget, which
decode comes next, and the checkpoint cadence.

Latency: a final is decoded speculatively once the speaker has paused for `speculate_after_s`, on exactly
the audio the endpoint will cut; if the pause becomes an endpoint, that result is the final and no second
decode is needed. Interims mark the words two consecutive hypotheses agree on as stable.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np

from jetscribe.services.transcriber.decoding import Decoded, DecodeJob, JobKind, JobPlan
from jetscribe.services.transcriber.ledger import AckLedger, Receipt
from jetscribe.services.transcriber.options import CommitOptions, SessionLimits
from jetscribe.services.transcriber.segmenter import Utterance, UtteranceSegmenter
from jetscribe.services.transcriber.speakers import SpeakerTimeline
from jetscribe.services.transcriber.transcript import Clock, FinalAudit, Transcript
from jetscribe.services.transcriber.vad import VoiceDetector
from jetscribe.services.transcriber.voices import VoiceMatcher
from jetscribe.shared import subjects
from jetscribe.shared.audio import SAMPLE_RATE, STORED_CHANNELS, STORED_ENCODING
from jetscribe.shared.wire import (
    WHISPER_LANGUAGES,
    AudioChunk,
    ErrorEvent,
    OptionRefused,
    OptionValue,
    Segment,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    end_reason,
    session_options,
)

M = TypeVar("M")


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
        speaker: str | None = None,
        meeting_id: str | None = None,
        track_start: float = 0.0,
        voices: VoiceMatcher | None = None,
        asked: Mapping[str, OptionValue] | None = None,
    ):
        """`speaker`, `meeting_id`, `track_start`: the bot's start of a participant's track (a checkpoint's win).
        `voices`: speakers from the audio (its finals' jobs come back with voice embeddings), or None.
        `asked`: the options of the session's start (checked by the gateway); None: the checkpoint's, if any."""
        self.tenant, self.session_id = tenant, session_id
        if asked is None:
            asked = checkpoint.options if checkpoint is not None else {}
        options = options.for_session(session_options(asked))
        self.options, self.limits, self.clock = options, limits, clock
        self.segmenter = UtteranceSegmenter(vad, options)
        self.ledger: AckLedger[M] = AckLedger()
        if checkpoint is not None:  # replayed chunks up to its acked_seq are acked at once
            self.ledger = AckLedger(checkpoint.acked_seq, checkpoint.acked_samples, checkpoint.chunks_received)
        self.transcript = Transcript(
            self.segmenter,
            self.ledger,
            clock,
            tenant=tenant,
            session_id=session_id,
            language=language,
            model=model,
            worker_id=worker_id,
            speakers=SpeakerTimeline(speaker),
            meeting_id=meeting_id,
            track_start=track_start,
            voices=voices,
            asked=dict(asked),
        )
        self.last_audio_at = clock.monotonic()  # the idle clock starts when the session opens here
        self.ending = False
        self.end_reason = ""  # "" (the bot ended it), the reason its end gave (`refused: <code>`) or "idle_timeout"
        self.handing_over = False
        self.busy = False  # a decode job is out
        self.gone = False  # closed here (ended, rejected, handed over, lost): nothing more to do
        self._after_close: Literal["ack", "nak", "drop"] = "ack"
        self._failures = 0
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
            if message.action == "finalize":
                # Acked now: a worker taking over before this final is out cuts the utterance at its endpoint.
                step.ack.append(handle)
                self.segmenter.finalize(self.clock.monotonic())
                return self._settle(step)
            self.ledger.hold_end(handle)
            self.end(end_reason(message.reason))
            return self._settle(step)
        samples = np.frombuffer(message.payload, dtype="<i2")
        expected = self.ledger.last_seq + 1
        receipt = self.ledger.receive(message.seq, len(samples), handle)
        if receipt in (Receipt.ACK_NOW, Receipt.LATE):
            step.ack.append(handle)
        if receipt is Receipt.LATE:
            step.errors.append(
                self.transcript.error(
                    "late_seq", f"chunk seq {message.seq} arrived after seq {self.ledger.last_seq}; it was skipped"
                )
            )
        if receipt is not Receipt.NEW:
            return step
        if message.seq > expected:
            step.errors.append(
                self.transcript.error(
                    "seq_gap", f"seqs {expected}..{message.seq - 1} are missing; transcribing on from seq {message.seq}"
                )
            )
        self.last_audio_at = self.clock.monotonic()
        self.transcript.speakers.hear(message, self.segmenter.received, len(samples))
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
                self.transcript.error(
                    "decode_failed",
                    f"utterance at {job.start_sample / SAMPLE_RATE:.2f} s could not be decoded: {result}",
                )
            )
            result = Decoded([])
        self._failures = 0
        step.segments += self.transcript.apply(job, result, commit_sentences=not self.handing_over)
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
    def settled(self) -> bool:
        """Handing over: every closed utterance has its final out."""
        return not self.closed and not self.busy

    @property
    def finished(self) -> bool:
        return self.ending and self.open is None and not self.closed and not self.busy

    def end(self, reason: str = "") -> None:
        """The bot ended the session, giving `reason` or not (or it was idle too long): close what is open, so
        everything left gets a final. A reason once given stays: an end during an idle end keeps `idle_timeout`."""
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
        if not self.options.interim_results:
            return False  # the session asked for none: no decode spent on them
        # In a pause the early final is coming, and an interim would only delay it; with no endpoints none comes, so
        # the speech heard since the last interim still gets one.
        if seg.silence_s >= 0.09 and (self.options.endpoint_silence_s is not None or utt.speech_end <= utt.interim_at):
            return False
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

    def _due(self, interim_every_s: float | None) -> tuple[Utterance, JobKind, int, bool] | None:
        """The decode this session needs most, without taking it: (utterance, kind, end sample, speculative)."""
        if self.busy or self.gone:
            return None
        if self.closed:
            utt = self.closed[0]
            assert utt.end is not None  # a closed utterance has its end
            return utt, "final", utt.end, False
        if self.speculation_due():
            assert self.open is not None and self.open.speculate_end is not None  # speculation_due() checked them
            return self.open, "final", self.open.speculate_end, True
        if self.interim_due(interim_every_s):
            assert self.open is not None  # interim_due() checked it
            return self.open, "interim", self.segmenter.vad_pos, False
        return None

    def peek_job(self, interim_every_s: float | None = None) -> JobPlan | None:
        """What `next_job` would return now, described but not taken (the batch scheduler groups sessions by it)."""
        due = self._due(interim_every_s)
        if due is None:
            return None
        utt, kind, end, speculative = due
        interim = kind == "interim"
        if kind == "final" and not speculative:
            urgency: tuple[int, float] = (0, utt.closed_at)  # the oldest final first
        elif speculative:
            urgency = (1, 0.0)  # paused sessions in the order given
        else:
            urgency = (2, -float(self.interim_backlog))  # the most starved interim first
        return JobPlan(
            kind=kind,
            speculative=speculative,
            samples=end - utt.start,
            beam_size=self.options.interim_beam_size if interim else self.options.beam_size,
            window="short" if interim else self.options.final_window,
            language=self.transcript.language,
            urgency=urgency,
            prompt=self.transcript.prompt,
        )

    def next_job(self, interim_every_s: float | None = None) -> DecodeJob | None:
        """The decode this session needs most: its oldest final, else a speculative final of a paused
        utterance, else an interim of the open one. Its result goes back through `complete`."""
        due = self._due(interim_every_s)
        if due is None:
            return None
        utt, kind, end, speculative = due
        interim = kind == "interim"
        if interim:
            utt.interim_at = end
            utt.interim_jobs += 1
        audio = self.segmenter.samples(utt.start, end).astype(np.float32) / 32768.0
        self.busy = True
        return DecodeJob(
            kind=kind,
            audio=audio,
            start_sample=utt.start,
            end_sample=end,
            language=self.transcript.language,
            prompt=self.transcript.prompt,
            beam_size=self.options.interim_beam_size if interim else self.options.beam_size,
            # an interim's words run to its end; a final's after the last speech frame are suspect
            speech_end_sample=end if interim else min(utt.speech_end, end),
            speculative=speculative,
            window="short" if interim else self.options.final_window,
            evidence=self.segmenter.record.evidence(utt.start, end),
        )

    # --- acks, checkpoints and the session's end -------------------------------------------------
    def _settle(self, step: Step[M]) -> Step[M]:
        """Account for what is done, and say whether a checkpoint (and so which acks) is due."""
        if not self.busy:
            step.segments += self.transcript.ready_finals()
        step.audits += self.transcript.take_audits()  # the finals above, and any before them
        step.events += self._speech_events()
        if self.finished:
            return self._finish(step)
        pending = [u.start for u in self.closed] + ([self.open.start] if self.open is not None else [])
        boundary = min(pending, default=self.segmenter.vad_pos - int(self.options.preroll_s * SAMPLE_RATE))
        self.ledger.account(boundary)
        self.segmenter.buffer.drop_before(min(boundary, self.segmenter.vad_pos))
        self.segmenter.record.drop_before(min(boundary, self.segmenter.vad_pos))
        if self.handing_over and self.settled:
            return self._give_back(step)
        if self.ledger.checkpoint_due(self.transcript.finals_published, self.limits.checkpoint_every_s):
            step.ack += self.ledger.take_accounted(self.transcript.finals_published)
            step.checkpoint = self.transcript.checkpoint()
        self.transcript.speakers.forget_before(self.ledger.acked_samples)  # no word before it is decoded again
        return step

    def _speech_events(self) -> list[SessionEvent]:
        """The `speech_started` and `utterance_end` events the session asked for, due now by the audio heard."""
        events = []
        starts, self.segmenter.speech_starts = self.segmenter.speech_starts, []
        if self.options.vad_events:
            events += [self.transcript.event("speech_started", timestamp=s / SAMPLE_RATE) for s in starts]
        gap, owed = self.options.utterance_end_s, self.transcript.owed_word_end
        if gap is None or owed is None or self.closed:
            return events  # a final still to come may hold a new word
        word_end, speech_end = owed
        if self.open is not None and self.open.speech_end > speech_end:
            return events  # speech heard since that word: its words are coming
        if self.segmenter.vad_pos >= round((word_end + gap) * SAMPLE_RATE):
            events.append(self.transcript.event("utterance_end", last_word_end=word_end))
            self.transcript.owed_word_end = None
        return events

    def _finish(self, step: Step[M]) -> Step[M]:
        step.ack += self.ledger.take_all()
        step.events.append(self.transcript.event("ended", self.end_reason))
        step.checkpoint = self.transcript.checkpoint(finished=True)
        step.closed = self.gone = True
        return step

    def _reject(self, step: Step[M], code: str, message: str) -> Step[M]:
        step.ack += self.ledger.take_all()  # nobody will transcribe it: don't let it come back
        step.errors.append(self.transcript.error(code, message))
        step.events.append(self.transcript.event("rejected", code))
        step.checkpoint = self.transcript.checkpoint(finished=True)
        step.closed = self.gone = True
        return step

    def _give_back(self, step: Step[M]) -> Step[M]:
        if self.ledger.checkpoint_due(self.transcript.finals_published, self.limits.checkpoint_every_s, force=True):
            step.ack += self.ledger.take_accounted(self.transcript.finals_published)
            step.checkpoint = self.transcript.checkpoint()
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
        step.events.append(self.transcript.event("started"))
        step.checkpoint = self.transcript.checkpoint()  # the language is known to whoever takes over
        return True

    def _restore(self, checkpoint: SessionCheckpoint) -> None:
        """Continue from a checkpoint (the ledger starts at its acks): the next chunk lands at the session
        sample where it was, so times, ids, totals and context carry on."""
        self._admission = None
        self.segmenter.restore(checkpoint.acked_samples)
        self.transcript.restore(checkpoint)


MAX_SEQ = 2**63 - 1  # seqs are stored as 64-bit integers


def stored_message_problem(message: AudioChunk | SessionControl) -> tuple[str, str] | None:
    """(code, message) if a message taken from AUDIO is one the gateway would never have stored, else None: the
    worker refuses it (reports and terminates it) rather than open a session for it or let it move one's seqs."""
    for name in ("tenant", "session_id"):
        if not subjects.is_valid_token(getattr(message, name)):
            return "bad_id", f"{name} must be 1-64 letters, digits, '_' or '-'"
    if not math.isfinite(message.sent_at):
        return "malformed", "sent_at must be a finite number"
    if isinstance(message, SessionControl):
        if message.language not in ("", "auto") and message.language not in WHISPER_LANGUAGES:
            return "bad_language", f"language {message.language[:64]!r} is not a Whisper language code or 'auto'"
        try:
            session_options(message.options)
        except OptionRefused as refused:
            return refused.code, refused.message
        return None
    if (message.sample_rate, message.channels, message.encoding, len(message.payload) % 2) != (
        SAMPLE_RATE,
        STORED_CHANNELS,
        STORED_ENCODING,
        0,
    ):
        return "malformed", "stored audio must be 16 kHz mono pcm_s16le (did the gateway store it?)"
    if not 0 <= message.seq <= MAX_SEQ:
        return "bad_seq", f"seq {message.seq} is outside 0..{MAX_SEQ}"
    if not math.isfinite(message.received_at):
        return "malformed", "received_at must be a finite number"
    return None


def is_reused(message: AudioChunk | SessionControl) -> bool:
    """A message for a finished session is a new use of its id if it starts the session again; audio
    stored after the session ended or was rejected (before the gateway heard so) is only late."""
    return isinstance(message, SessionControl) and message.action == "start"
