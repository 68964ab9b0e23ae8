"""A model that hears no words: each decode returns one fixed word spanning the job's speech, with no Whisper.

With JETSCRIBE_MODEL=null the transcriber runs as usual (VAD, segmenter, interims, finals, checkpoints, acks) but
decoding costs nothing, so what is left to measure is the messaging and persistence path (bench/load_null.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.decoding import Decoded, DecodeJob
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word

NULL_MODEL = "null"  # the JETSCRIBE_MODEL that loads it
NULL_WORD = "null"


class NullModel:
    """One word per job: `NULL_WORD` from where the VAD first heard speech in the job's audio to where it last did."""

    name = NULL_MODEL

    def decode(self, job: DecodeJob) -> Decoded:
        speech_s = (job.speech_end_sample - job.start_sample) / SAMPLE_RATE
        end = speech_s if speech_s > 0 else len(job.audio) / SAMPLE_RATE
        word = Word(NULL_WORD, round(min(_speech_start_s(job), end), 3), round(end, 3), 1.0)
        return Decoded([DecodedSegment(words=[word])], language="en", language_probability=1.0)

    def decode_batch(self, jobs: Sequence[DecodeJob]) -> list[Decoded]:
        return [self.decode(job) for job in jobs]


def _speech_start_s(job: DecodeJob) -> float:
    """Seconds into the job's audio of its first frame the VAD called speech (0 if it says none)."""
    evidence = job.evidence
    if evidence is None or True not in evidence.speech:
        return 0.0
    first = evidence.start + evidence.speech.index(True) * evidence.frame_samples
    return max(0.0, (first - job.start_sample) / SAMPLE_RATE)
