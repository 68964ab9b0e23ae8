"""The ack ledger: which audio message of a session is acked when. Nothing else acks a session's audio.

A chunk passes three states. *Held*: received, its audio not yet accounted for. *Accounted*: its audio
is silence, or covered by segments the same step publishes. *Acked*: a checkpoint saying "everything up to
here is done" was taken, and the step that saves it acks the chunk after the save. Each message handle
leaves the ledger exactly once (to be acked or nak'd), so no message is ever acked twice, whoever asks.
A redelivery of an acked seq is acked at once; a redelivery of a held or accounted seq replaces the older
delivery, which is then dropped unacked (the newest delivery is the one JetStream waits for).

Seqs come in order from the gateway; a jump (audio aged out of AUDIO, or a publisher other than the gateway) is
transcribed on from the new seq, and the seqs it skipped are remembered, so that one arriving later is known as
late (`Receipt.LATE`: acked unused, and the shell reports it) rather than taken for a redelivery.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from jetscribe.shared.audio import SAMPLE_RATE

M = TypeVar("M")  # a message handle the shell can ack or nak (a nats Msg); the ledger never calls it


class Receipt(Enum):
    NEW = "new"  # fresh audio: hand it to the segmenter
    ACK_NOW = "ack_now"  # already acked (or never to be used): ack this delivery at once
    REPLACED = "replaced"  # a redelivery of audio still held: kept instead of the older delivery
    LATE = "late"  # a seq the session skipped, arriving after a later one: acked unused


SKIPPED_KEPT = 64  # seq ranges a session skipped, remembered to recognise their chunks arriving late


@dataclass
class Chunk(Generic[M]):
    seq: int
    first: int  # session sample of its first sample
    end: int  # session sample after its last sample
    message: M


class AckLedger(Generic[M]):
    """The audio messages of one session and the checkpoint that must precede their ack."""

    def __init__(self, acked_seq: int = -1, acked_samples: int = 0, acked_chunks: int = 0):
        self.acked_seq = acked_seq  # in the newest checkpoint taken: acked, or acked once it is saved
        self.acked_samples = acked_samples  # where chunk acked_seq + 1 begins
        self.acked_chunks = acked_chunks  # chunks up to acked_seq: a total a takeover does not count twice
        self.last_seq = acked_seq
        self.received = acked_samples  # session samples received
        self._held: deque[Chunk[M]] = deque()
        self._accounted: list[Chunk[M]] = []
        self._end: M | None = None
        self._saved_finals = 0  # finals published at the newest checkpoint
        self.skipped: deque[tuple[int, int]] = deque(maxlen=SKIPPED_KEPT)  # (first, last) seqs jumped over

    @property
    def chunks_received(self) -> int:
        """Distinct chunks of the session so far, from its first, wherever they were received."""
        return self.acked_chunks + len(self._accounted) + len(self._held)

    @property
    def accounted_seq(self) -> int:
        """The last seq whose audio is accounted for (acked, or to be acked at the next checkpoint)."""
        return self._accounted[-1].seq if self._accounted else self.acked_seq

    def receive(self, seq: int, samples: int, message: M) -> Receipt:
        """Record a delivery of chunk `seq` holding `samples` samples."""
        if seq <= self.acked_seq:
            return Receipt.LATE if self.was_skipped(seq) else Receipt.ACK_NOW
        if seq <= self.last_seq:
            for chunk in (*self._held, *self._accounted):
                if chunk.seq == seq:
                    chunk.message = message
                    return Receipt.REPLACED
            return Receipt.LATE  # a seq the session skipped: nothing waits for it
        if seq > self.last_seq + 1:
            self.skipped.append((self.last_seq + 1, seq - 1))
        self._held.append(Chunk(seq, self.received, self.received + samples, message))
        self.last_seq = seq
        self.received += samples
        return Receipt.NEW

    def was_skipped(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self.skipped)

    def hold_end(self, message: M) -> None:
        """The session's `end` message: acked with the last audio, when the session is over."""
        self._end = message

    def account(self, boundary: int) -> None:
        """Every held chunk ending at or before session sample `boundary` is accounted for."""
        while self._held and self._held[0].end <= boundary:
            self._accounted.append(self._held.popleft())

    def seqs_overlapping(self, start: int, end: int) -> list[int]:
        """Seqs of not yet acked chunks with audio in [start, end)."""
        return [c.seq for c in (*self._accounted, *self._held) if c.first < end and c.end > start]

    def checkpoint_due(self, finals: int, every_s: float, force: bool = False) -> bool:
        """Accounted audio waits for a checkpoint: one per final, per `every_s` of silence, or when forced."""
        if not self._accounted:
            return False
        behind_s = (self._accounted[-1].end - self.acked_samples) / SAMPLE_RATE
        return force or finals != self._saved_finals or behind_s >= every_s

    def take_accounted(self, finals: int) -> list[M]:
        """Move the accounted chunks into the next checkpoint; returns their messages, to ack once it is saved."""
        taken, self._accounted = self._accounted, []
        if taken:
            self.acked_seq, self.acked_samples = taken[-1].seq, taken[-1].end
            self.acked_chunks += len(taken)
        self._saved_finals = finals
        return [c.message for c in taken]

    def take_all(self) -> list[M]:
        """The session is over: every message left, audio and end, to ack after the final checkpoint."""
        self.account(self.received)
        messages = self.take_accounted(self._saved_finals)
        self.acked_seq, self.acked_samples = self.last_seq, self.received
        if self._end is not None:
            messages.append(self._end)
            self._end = None
        return messages

    def give_back(self) -> list[M]:
        """Hand-over: the messages not covered by a checkpoint, to nak so the next owner gets them at once."""
        messages = [c.message for c in (*self._accounted, *self._held)]
        messages += [self._end] if self._end is not None else []
        self.forget()
        return messages

    def waiting(self) -> list[M]:
        """Every message still waiting for its ack (to keep JetStream from redelivering it meanwhile)."""
        return [c.message for c in (*self._held, *self._accounted)] + ([self._end] if self._end is not None else [])

    def forget(self) -> None:
        """Drop every handle unacked (the partition was lost: someone else owns these messages now)."""
        self._held.clear()
        self._accounted = []
        self._end = None
