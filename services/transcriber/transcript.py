"""One session's transcript as published, with no I/O: decode results in, segments out.

`Transcript.apply` times a decode result's words to the session, runs the word guards (`agreement`) and
decides what the result is: an interim of the open utterance, the final of the oldest closed one, or an
early final kept for the pause it was decoded in. The transcript keeps what the published segments
imply: segment ids and revisions, the committed words (the next decode's prompt), the session's language,
how many finals are out, and the totals of what the guards removed. It builds every message that reports
the session (segments, events, errors, checkpoints), so they all name it and count it the same way.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Protocol

from jetscribe.services.transcriber.agreement import (
    agree,
    drop_trailing_inventions,
    ends_sentence,
    holds_speech,
    keep_trustworthy,
)
from jetscribe.services.transcriber.decoding import Decoded, DecodeJob
from jetscribe.services.transcriber.ledger import AckLedger
from jetscribe.services.transcriber.segmenter import Utterance, UtteranceSegmenter
from jetscribe.services.transcriber.sentences import confirmed_sentence_end
from jetscribe.services.transcriber.speakers import SpeakerTimeline, runs
from jetscribe.services.transcriber.voices import VoiceMatcher, VoicePiece, label_words
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import (
    DroppedWord,
    ErrorEvent,
    OptionValue,
    Segment,
    SegmentStatus,
    SessionCheckpoint,
    SessionEvent,
    SessionEventKind,
    SpeakerSource,
    Word,
)

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


class Transcript:
    """What one session has published, and the decisions that turn its decode results into segments."""

    def __init__(
        self,
        segmenter: UtteranceSegmenter,  # its utterances, and the options they are cut and decoded with
        ledger: AckLedger[Any],  # read only: which chunks a segment covers, and where the acks stand
        clock: Clock,
        *,
        tenant: str,
        session_id: str,
        language: str | None,
        model: str,
        worker_id: str,
        speakers: SpeakerTimeline | None = None,
        meeting_id: str | None = None,
        track_start: float = 0.0,
        voices: VoiceMatcher | None = None,
        asked: dict[str, OptionValue] | None = None,
    ):
        """`asked`: the session's options as its start gave them, kept in its checkpoints."""
        self.segmenter, self.ledger, self.clock = segmenter, ledger, clock
        self.asked = asked or {}
        # (end of the last final word, its utterance's last speech sample), while owed an `utterance_end`
        self.owed_word_end: tuple[float, int] | None = None
        self.speakers = speakers or SpeakerTimeline()  # who the bot said talks when: words are labelled from it
        self.voices = voices  # speakers from the audio: labels the words the bot says nothing about
        self.meeting_id, self.track_start = meeting_id, track_start
        self.options = segmenter.options
        self.tenant, self.session_id = tenant, session_id
        self.language, self.model, self.worker_id = language, model, worker_id
        self.next_segment_id = 0
        self.committed_words: deque[str] = deque(maxlen=self.options.prompt_words)
        self.finals_published = 0
        self.words_dropped = 0  # by the guards, from this session's finals
        self.empty_finals = 0  # finals with no words over audio that held speech
        self._audits: list[FinalAudit] = []

    def restore(self, checkpoint: SessionCheckpoint) -> None:
        """Carry on from a checkpoint: segment ids, the prompt's context, the language and the totals."""
        self.next_segment_id = checkpoint.next_segment_id
        self.committed_words.extend(checkpoint.committed_tail)
        self.language = self.language or checkpoint.language
        self.words_dropped, self.empty_finals = checkpoint.words_dropped, checkpoint.empty_finals
        self.speakers = SpeakerTimeline(checkpoint.speaker, checkpoint.acked_samples)
        self.meeting_id = self.meeting_id or checkpoint.meeting_id
        self.track_start = self.track_start or checkpoint.track_start
        if checkpoint.last_word_end is not None:  # no speech since it reached the checkpoint unaccounted
            self.owed_word_end = (checkpoint.last_word_end, round(checkpoint.last_word_end * SAMPLE_RATE))
        if self.voices is not None and checkpoint.voices:
            self.voices = VoiceMatcher(self.voices.options, checkpoint.voices)

    @property
    def prompt(self) -> str:
        """The words committed last, as context for the next decode."""
        return " ".join(self.committed_words)

    # --- decode results ----------------------------------------------------------------------------
    def apply(self, job: DecodeJob, decoded: Decoded, *, commit_sentences: bool = True) -> list[Segment]:
        """The segments to publish for the result of `job`. Without `commit_sentences` (handing over), an
        interim never cuts the open utterance at a sentence end: the next owner decodes it whole."""
        if self.language is None and decoded.language and decoded.language_probability >= 0.5:
            self.language = decoded.language
        timed = [replace(seg, words=session_words(job, seg.words)) for seg in decoded.segments]
        trusted = keep_trustworthy(timed, job.evidence)
        said = drop_trailing_inventions(trusted.kept, job.speech_end_sample / SAMPLE_RATE)
        words, dropped = said.kept, sorted(trusted.dropped + said.dropped, key=lambda w: w.start)
        closed, utt = self.segmenter.closed, self.segmenter.open
        if job.speculative:
            if closed and (closed[0].start, closed[0].end) == (job.start_sample, job.end_sample):
                return self._final(words, dropped, job, decoded.voices)  # the endpoint came while it decoded
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
                return self._final(words, dropped, job, decoded.voices)
        if job.kind == "interim" or job.speculative:
            if utt is None or utt.start != job.start_sample or not (words := utt.own(words)):
                return []  # that utterance closed meanwhile (its final is coming), or nothing new was said
            if not self.options.interim_results:
                return []  # an early final kept for its endpoint, not shown: the session asked for no interims
            shown, stable = agree(utt.words, words)
            segments = [self._segment(utt, "interim", shown, job, stable)]
            if job.kind == "interim" and commit_sentences:
                self._commit_sentence(utt, words)
            utt.last_hypothesis = words
            return segments
        return self._final(words, dropped, job, decoded.voices)

    def ready_finals(self) -> list[Segment]:
        """Closed utterances whose final was decoded early, on exactly their audio: publish it now."""
        closed, segments = self.segmenter.closed, []
        while closed and closed[0].speculation is not None:
            job, decoded = closed[0].speculation
            if job.end_sample != closed[0].end:
                break
            closed[0].speculation = None
            segments += self.apply(replace(job, speculative=False), decoded)
        return segments

    def take_audits(self) -> list[FinalAudit]:
        """The finals the guards removed words from since the last call, for the shell to log."""
        audits, self._audits = self._audits, []
        return audits

    def _commit_sentence(self, utt: Utterance, hypothesis: list[Word]) -> None:
        """Speech with no pause is cut at a sentence end the interims confirmed (`sentences`); the part
        before gets its final as at any cut, and the part after goes on as a new utterance."""
        start_s, after_s = utt.start / SAMPLE_RATE, self.options.commit_sentences_after_s
        cut = confirmed_sentence_end(utt.words, utt.last_hypothesis, hypothesis, start_s, after_s)
        if cut is not None:
            self.segmenter.cut_at_sentence(cut, self.clock.monotonic())

    def _final(
        self, words: list[Word], dropped: list[DroppedWord], job: DecodeJob, voices: tuple[VoicePiece, ...] = ()
    ) -> list[Segment]:
        """Publish an utterance's final; count what the guards removed from it (only finals count: an
        interim's words are decoded again). A final with removed words is published even if empty, to
        show them. `voices`: the embeddings of its audio, for the words the bot names no speaker of."""
        utt = self.segmenter.closed.popleft()
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
        if words:
            self.owed_word_end = (max(w.end for w in words), utt.speech_end)
        if words or dropped or utt.segment_id is not None:
            self.committed_words.extend(w.word.strip() for w in words)
            # A change of the bot-known speaker inside the utterance splits its final: one segment per turn,
            # the first keeping the utterance's id, the others taking the next ids (nothing else holds one yet:
            # a later utterance gets no segment before this final).
            # The same for a change of voice, where the bot names nobody (its labels win).
            labelled = self.speakers.label(words)
            heard: set[int] = set()
            if self.voices is not None and voices and any(w.speaker is None for w in labelled):
                heard = {i for i, w in enumerate(labelled) if w.speaker is None}
                labelled = label_words(labelled, self.voices.label(voices))
            sources: list[SpeakerSource] = ["audio" if i in heard else "bot" for i in range(len(labelled))]
            parts = runs(labelled) or [[]]
            starts = [p[0].start for p in parts[1:]]
            first = 0
            for i, part in enumerate(parts):
                mine = [d for d in dropped if bisect.bisect_right(starts, d.start) == i]
                source: SpeakerSource = sources[first] if part else "bot"
                first += len(part)
                segments.append(
                    self._segment(utt, "final", part, job, dropped=mine, part=(i, len(parts)), source=source)
                )
        if dropped or empty_over_speech:
            segment_id = segments[0].segment_id if segments else None
            self._audits.append(FinalAudit(segment_id, start, end, dropped, empty_over_speech))
        return segments

    # --- the messages that report the session ------------------------------------------------------
    def _segment(
        self,
        utt: Utterance,
        status: SegmentStatus,
        words: list[Word],
        job: DecodeJob,
        stable_words: int = 0,
        dropped: list[DroppedWord] | None = None,
        part: tuple[int, int] = (0, 1),
        source: SpeakerSource = "bot",
    ) -> Segment:
        """`part`: (index, count) of a final split at speaker changes; a part after the first takes a new id.
        A final's words come labelled (`source` said who talks); an interim's are labelled here by the bot's."""
        index, count = part
        if utt.segment_id is None:
            utt.segment_id = self.next_segment_id
            self.next_segment_id += 1
        if index == 0:
            utt.revision += 1
            segment_id, revision = utt.segment_id, utt.revision
        else:
            segment_id, revision = self.next_segment_id, 1
            self.next_segment_id += 1
        if status == "interim":
            words = self.speakers.label(words)
        start = words[0].start if words else job.start_sample / SAMPLE_RATE
        end = words[-1].end if words else job.end_sample / SAMPLE_RATE
        first = job.start_sample if index == 0 else int(start * SAMPLE_RATE)
        last = job.end_sample if index == count - 1 else round(end * SAMPLE_RATE)
        seqs = self.ledger.seqs_overlapping(first, last) or [self.ledger.last_seq]
        speaker = words[0].speaker if words else self.speakers.speaker_at(job.start_sample)
        return Segment(
            tenant=self.tenant,
            session_id=self.session_id,
            segment_id=segment_id,
            revision=revision,
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
            speaker=speaker,
            speaker_source=(source if words else "bot") if speaker is not None else None,
            meeting_id=self.meeting_id,
            track_start=self.track_start,
        )

    def checkpoint(self, finished: bool = False) -> SessionCheckpoint:
        """Where the session stands: what is acked, and what the next owner needs to carry the transcript on."""
        seg = self.segmenter
        pending = [u.segment_id for u in [*seg.closed, seg.open] if u is not None and u.segment_id is not None]
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
            speaker=self.speakers.speaker_at(self.ledger.acked_samples),
            meeting_id=self.meeting_id,
            track_start=self.track_start,
            voices=self.voices.state() if self.voices is not None else [],
            options=self.asked,
            last_word_end=self.owed_word_end[0] if self.owed_word_end is not None else None,
        )

    def event(
        self,
        event: SessionEventKind,
        reason: str = "",
        *,
        last_word_end: float | None = None,
        timestamp: float | None = None,
    ) -> SessionEvent:
        """An event of the session; `last_word_end` for `utterance_end`, `timestamp` for `speech_started`."""
        return SessionEvent(
            tenant=self.tenant,
            session_id=self.session_id,
            event=event,
            at=self.clock.wall(),
            reason=reason,
            language=self.language,
            model=self.model,
            chunks_received=self.ledger.chunks_received,
            audio_seconds=self.segmenter.received / SAMPLE_RATE,
            segments=self.next_segment_id,
            worker_id=self.worker_id,
            words_dropped=self.words_dropped,
            empty_finals=self.empty_finals,
            meeting_id=self.meeting_id,
            last_word_end=last_word_end,
            timestamp=timestamp,
        )

    def error(self, code: str, message: str) -> ErrorEvent:
        return ErrorEvent(
            tenant=self.tenant, session_id=self.session_id, code=code, message=message, at=self.clock.wall()
        )


def session_words(job: DecodeJob, words: list[Word]) -> list[Word]:
    """A decode's words in session seconds, clipped to the audio it was given."""
    offset, limit = job.start_sample / SAMPLE_RATE, job.end_sample / SAMPLE_RATE
    out = []
    for w in words:
        start = min(offset + float(w.start), limit)
        end = min(max(offset + float(w.end), start), limit)
        out.append(Word(w.word, round(start, 3), round(end, 3), round(float(w.probability), 3)))
    return out
