"""The worker's load stats: decode totals by kind and batching, and the backlog its sessions wait on."""

import numpy as np
import pytest

from jetscribe.services.transcriber.stats import DecodeCounters, backlog_samples, waiting_samples, worker_stats
from jetscribe.shared import subjects
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import WorkerStats, decode, encode
from tests.unit.transcriber.scripted import feed, new_stream, said, silence, tone


def test_decode_totals_by_kind_charge_each_batch_item_its_share():
    counters = DecodeCounters()
    counters.observe("interim", False, 1, 0.4, 1.5)
    for _ in range(4):  # one call of four finals, 2 s of wall time
        counters.observe("final", False, 4, 2.0, 3.0)
    counters.observe("final", True, 1, 0.5, 2.0)
    t = counters.totals
    assert (t["interim"].count, t["interim"].seconds, t["interim"].audio_s) == (1, 0.4, 1.5)
    assert (t["final"].count, t["final"].seconds, t["final"].audio_s) == (4, 2.0, 12.0)
    assert (t["speculative"].count, t["speculative"].seconds) == (1, 0.5)
    assert (counters.batches, counters.items) == (3, 6)


def test_a_batch_partly_observed_counts_as_one_call():
    counters = DecodeCounters()
    for _ in range(3):
        counters.observe("final", False, 8, 1.0, 2.0)
    assert (counters.batches, counters.items) == (1, 3)


@pytest.mark.parametrize("kind, batch_size", [("other", 1), ("final", 0)])
def test_unknown_kinds_and_empty_batches_are_refused(kind, batch_size):
    with pytest.raises(ValueError):
        DecodeCounters().observe(kind, False, batch_size, 0.1, 1.0)


def test_backlog_is_the_audio_since_the_oldest_utterance_without_a_final():
    s = new_stream(endpoint_silence_s=0.5)
    feed(s, silence(1.0))
    assert backlog_samples(s) == 0  # silence is covered: nothing to transcribe
    seq = feed(s, tone(2.0), first_seq=10)
    open_start = s.open.start
    assert backlog_samples(s) == s.segmenter.received - open_start
    seq = feed(s, silence(1.0), first_seq=seq)
    assert s.open is None and len(s.closed) == 1  # closed, its final not decoded yet: still waiting
    assert backlog_samples(s) == s.segmenter.received - open_start
    assert waiting_samples(s) == s.closed[0].end - open_start
    job = s.next_job()
    s.complete(job, said("hello", "world"))
    assert backlog_samples(s) == waiting_samples(s) == 0
    feed(s, tone(0.5), first_seq=seq)
    assert 0 < backlog_samples(s) <= 0.9 * SAMPLE_RATE  # a new utterance: its audio and pre-roll only
    assert waiting_samples(s) == 0  # still spoken: nothing waits for a decoder yet


def test_worker_stats_sum_the_live_sessions_and_round_trip_on_the_wire():
    speaking, quiet, gone = new_stream(), new_stream(), new_stream()
    feed(speaking, np.concatenate([silence(0.5), tone(2.0)]))
    feed(quiet, silence(2.0))
    feed(gone, tone(2.0))
    gone.drop()
    counters = DecodeCounters()
    counters.observe("interim", False, 1, 0.3, 1.0)
    stats = worker_stats("host.example-7", [speaking, quiet, gone], counters, at=1.8e9, cpu_s=12.5, rss_bytes=4096)
    assert (stats.sessions, stats.speaking) == (2, 1)
    assert stats.backlog_s == pytest.approx(backlog_samples(speaking) / SAMPLE_RATE)
    assert stats.backlog_max_s == stats.backlog_s > 2.0
    assert stats.finals_waiting_s == 0.0
    assert stats.decodes["interim"].count == 1 and stats.decodes["final"].count == 0
    assert (stats.batches, stats.batch_items, stats.cpu_s, stats.rss_bytes) == (1, 1, 12.5, 4096)
    assert decode(encode(stats), WorkerStats) == stats
    assert subjects.transcriber_stats(stats.worker_id) == "jetscribe.stats.transcriber.host_example-7"
