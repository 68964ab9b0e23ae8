"""Scripted audio, a stand-in VAD and a core that keeps its steps: what the transcriber's unit tests share."""

import numpy as np

from jetscribe.services.transcriber.agreement import DecodedSegment
from jetscribe.services.transcriber.core import CommitOptions, SessionLimits, SessionStream, Step
from jetscribe.services.transcriber.decoding import Decoded
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.wire import AudioChunk, SessionControl, Word

CHUNK = SAMPLE_RATE // 10  # 100 ms


class LoudVoiceDetector:
    """A stand-in VAD for scripted audio: speech is anything not near-silent."""

    def __init__(self, frame_samples: int = 480):
        self.frame_samples = frame_samples

    def is_speech(self, frame: np.ndarray) -> bool:
        return np.abs(frame.astype(np.int32)).mean() > 500


class Recorded(SessionStream):
    """The core, keeping every step it returned, as a shell would carry them out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[Step] = []

    def _keep(self, step):
        self.steps.append(step)
        return step

    def receive(self, message, handle):
        return self._keep(super().receive(message, handle))

    def complete(self, job, result):
        return self._keep(super().complete(job, result))

    def tick(self):
        return self._keep(super().tick())

    def hand_over(self, force=False):
        return self._keep(super().hand_over(force))

    @property
    def acked(self):
        return [h for step in self.steps for h in step.ack]

    @property
    def segments(self):
        return [g for step in self.steps for g in step.segments]

    @property
    def events(self):
        return [e for step in self.steps for e in step.events]

    @property
    def checkpoints(self):
        return [step.checkpoint for step in self.steps if step.checkpoint is not None]


def tone(seconds):
    t = np.arange(int(seconds * SAMPLE_RATE))
    return (8000 * np.sin(2 * np.pi * 220 * t / SAMPLE_RATE)).astype(np.int16)


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def new_stream(clock=None, checkpoint=None, limits=SessionLimits(), sessions_before=0, frame_samples=480, **options):
    return Recorded(
        "acme",
        "s1",
        language="en",
        model="tiny.en",
        worker_id="w1",
        # A long scripted tone is its own noise floor: the babble gate would take it for background talk.
        options=CommitOptions(**{"speech_above_floor_db": 0.0, **options}),
        vad=LoudVoiceDetector(frame_samples),
        clock=clock or ManualClock(),
        limits=limits,
        checkpoint=checkpoint,
        sessions_before=sessions_before,
    )


def chunk(seq, samples):
    return AudioChunk(
        tenant="acme",
        session_id="s1",
        seq=seq,
        sent_at=0.0,
        sample_rate=SAMPLE_RATE,
        channels=1,
        encoding="pcm_s16le",
        payload=samples.astype("<i2").tobytes(),
    )


def end_message():
    return SessionControl(tenant="acme", session_id="s1", action="end")


def feed(stream, audio, first_seq=0):
    seq = first_seq
    for off in range(0, len(audio), CHUNK):
        stream.receive(chunk(seq, audio[off : off + CHUNK]), seq)
        seq += 1
    return seq


def said(*words, start=0.0, step=0.3, no_speech=0.01, logprob=-0.2, ratio=1.2):
    ws = [Word(f" {w}", start + i * step, start + (i + 1) * step, 0.9) for i, w in enumerate(words)]
    return Decoded([DecodedSegment(ws, no_speech, logprob, ratio)], "en", 0.99)


def finish(stream, job, decoded):
    """Hand a decode result back; the segments the step says to publish."""
    return stream.complete(job, decoded).segments


class Script:
    """Scripted Whisper for one text spoken at known session times, one word every `step` seconds from
    `start`: a decode says each word it holds more than `hear` seconds of (so a word straddling a cut is
    heard from both sides), timed `skew` seconds off, and ends its last word with a period, as Whisper
    punctuates where the audio stops. `decodes` keeps what each job was told."""

    def __init__(self, text, start=0.3, step=0.3, hear=0.05, skew=0.0):
        self.words = [(w, start + i * step, start + (i + 1) * step) for i, w in enumerate(text.split())]
        self.hear, self.skew = hear, skew
        self.decodes = []

    def sentence_ends(self):
        return [end for w, _, end in self.words if w.endswith(".")]

    def decode(self, job):
        a, b = job.start_sample / SAMPLE_RATE, job.end_sample / SAMPLE_RATE
        heard = [(w, s, e) for w, s, e in self.words if min(e, b) - max(s, a) > self.hear]
        words = [
            Word(f" {w}", min(max(s - a + self.skew, 0.0), b - a), min(max(e - a + self.skew, 0.0), b - a), 0.9)
            for w, s, e in heard
        ]
        if words and not words[-1].word.endswith("."):
            last = words[-1]
            words[-1] = Word(last.word + ".", last.start, last.end, last.probability)
        self.decodes.append((job, words))
        return Decoded([DecodedSegment(words)], "en", 0.99)


def speak(stream, script, audio, first_seq=0):
    """Feed `audio` in 100 ms chunks, answering each decode the core asks for at once from `script`;
    returns the next seq and every segment published, with the audio heard (seconds) when it was."""
    seq, published = first_seq, []
    for off in range(0, len(audio), CHUNK):
        steps = [stream.receive(chunk(seq, audio[off : off + CHUNK]), seq)]
        seq += 1
        while (job := stream.next_job()) is not None:
            steps.append(stream.complete(job, script.decode(job)))
        heard = stream.segmenter.vad_pos / SAMPLE_RATE
        published += [(heard, g) for step in steps for g in step.segments]
    return seq, published
