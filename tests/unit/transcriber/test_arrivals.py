"""ChunkArrivals: which chunk holds a sample, which chunks a segment covers, and how much is kept."""

from jetscribe.services.transcriber.arrivals import Arrival, ChunkArrivals
from jetscribe.shared.audio import SAMPLE_RATE

CHUNK = 1600  # 0.1 s


def _arrivals(n, first_seq=0, first_sample=0, keep=4096):
    arrivals = ChunkArrivals(keep=keep)
    for i in range(n):
        start = first_sample + i * CHUNK
        arrivals.add(Arrival(first_seq + i, start, start + CHUNK, 1000.0 + i, 50.0 + i, None))
    return arrivals


def test_a_sample_belongs_to_the_chunk_that_holds_it_and_a_boundary_to_the_chunk_it_ends():
    arrivals = _arrivals(5)
    assert arrivals.at(0).seq == 0
    assert arrivals.at(CHUNK - 1).seq == 0
    assert arrivals.at(CHUNK).seq == 0  # a word ending on the boundary was in chunk 0
    assert arrivals.at(CHUNK + 1).seq == 1
    assert arrivals.at(5 * CHUNK).seq == 4
    assert arrivals.at(5 * CHUNK + 1) is None  # not received yet
    assert arrivals.at_time(0.25).seq == 2
    assert arrivals.at_time(0.25).received_at == 1002.0


def test_a_restored_session_starts_where_its_checkpoint_left_off():
    arrivals = _arrivals(3, first_seq=40, first_sample=40 * CHUNK)
    assert arrivals.at_time(4.05).seq == 40
    assert arrivals.at_time(3.9) is None  # before anything this worker received


def test_covered_chunks_by_seq_are_bounded():
    arrivals = _arrivals(100)
    assert [a.seq for a in arrivals.between(3, 6)] == [3, 4, 5, 6]
    assert [a.seq for a in arrivals.between(0, 99, limit=3)] == [97, 98, 99]
    assert arrivals.of_seq(42).start == 42 * CHUNK
    assert arrivals.of_seq(100) is None


def test_dropping_and_the_hard_bound_forget_the_oldest():
    arrivals = _arrivals(10)
    arrivals.drop_before(3 * CHUNK)
    assert len(arrivals) == 7 and arrivals.at(2 * CHUNK) is None and arrivals.at(3 * CHUNK + 1).seq == 3
    arrivals.drop_before(-SAMPLE_RATE)  # nothing before the start
    assert len(arrivals) == 7
    bounded = _arrivals(50, keep=8)
    assert len(bounded) == 8 and bounded.of_seq(42).seq == 42 and bounded.of_seq(41) is None


def test_audio_that_is_not_new_is_not_added():
    arrivals = _arrivals(2)
    arrivals.add(Arrival(1, CHUNK, 2 * CHUNK, 0.0, 0.0, None))
    assert len(arrivals) == 2
