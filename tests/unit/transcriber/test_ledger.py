"""The ack ledger alone: message handles that record their own acks, so a double ack fails the test."""

import pytest

from jetscribe.services.transcriber.ledger import AckLedger, Receipt


class Delivery:
    """A stand-in for a nats Msg that refuses a second ack, as nats-py does."""

    def __init__(self, seq):
        self.seq = seq
        self.acks = 0

    def ack(self):
        if self.acks:
            raise AssertionError(f"seq {self.seq} acked twice")
        self.acks += 1


def receive_all(ledger, seqs, samples=1600):
    deliveries = {}
    for seq in seqs:
        deliveries[seq] = Delivery(seq)
        assert ledger.receive(seq, samples, deliveries[seq]) is Receipt.NEW
    return deliveries


def test_each_message_leaves_the_ledger_once_whoever_asks():
    ledger = AckLedger()
    receive_all(ledger, range(10))
    ledger.account(5 * 1600)
    first = ledger.take_accounted(finals=1)  # a checkpoint is being written for these
    second = ledger.take_accounted(finals=1)  # a second settle meanwhile: nothing is left to ack
    assert [d.seq for d in first] == [0, 1, 2, 3, 4] and second == []
    for delivery in first + second:
        delivery.ack()
    assert ledger.acked_seq == 4 and ledger.acked_samples == 5 * 1600 and ledger.acked_chunks == 5


def test_redeliveries_are_recognised():
    ledger = AckLedger()
    receive_all(ledger, range(4))
    ledger.account(2 * 1600)
    ledger.take_accounted(finals=0)
    assert ledger.receive(1, 1600, Delivery(1)) is Receipt.ACK_NOW  # acked already: ack this delivery at once
    newer = Delivery(3)
    assert ledger.receive(3, 1600, newer) is Receipt.REPLACED  # still held: the newest delivery waits instead
    assert newer in ledger.waiting() and ledger.chunks_received == 4


def test_checkpoint_cadence_per_final_or_seconds_of_silence():
    ledger = AckLedger()
    receive_all(ledger, range(30))
    ledger.account(10 * 1600)
    assert not ledger.checkpoint_due(finals=0, every_s=2.0)  # 1 s of silence
    assert ledger.checkpoint_due(finals=1, every_s=2.0)  # a final was published
    ledger.account(25 * 1600)
    assert ledger.checkpoint_due(finals=0, every_s=2.0)


def test_the_end_goes_last_and_a_hand_over_gives_back_the_rest():
    ledger = AckLedger()
    receive_all(ledger, range(3))
    ledger.hold_end("end")
    assert [getattr(m, "seq", m) for m in ledger.take_all()] == [0, 1, 2, "end"]
    other = AckLedger(acked_seq=2, acked_samples=3 * 1600, acked_chunks=3)
    receive_all(other, range(3, 6))
    other.hold_end("end")
    assert [getattr(m, "seq", m) for m in other.give_back()] == [3, 4, 5, "end"]
    assert other.waiting() == []


@pytest.mark.parametrize("acked_seq", [-1, 7])
def test_totals_count_each_chunk_once(acked_seq):
    ledger = AckLedger(acked_seq=acked_seq, acked_samples=(acked_seq + 1) * 1600, acked_chunks=acked_seq + 1)
    receive_all(ledger, range(acked_seq + 1, acked_seq + 6))
    assert ledger.chunks_received == acked_seq + 6


def test_a_seq_the_session_jumped_over_arrives_late_whether_or_not_it_was_acked_past():
    ledger = AckLedger()
    receive_all(ledger, [0, 1, 5])
    assert list(ledger.skipped) == [(2, 4)]
    assert ledger.receive(3, 1600, Delivery(3)) is Receipt.LATE
    ledger.account(3 * 1600)
    ledger.take_accounted(finals=0)  # acked up to seq 5 now
    assert ledger.receive(4, 1600, Delivery(4)) is Receipt.LATE
    assert ledger.receive(1, 1600, Delivery(1)) is Receipt.ACK_NOW  # a plain redelivery
    assert ledger.chunks_received == 3
