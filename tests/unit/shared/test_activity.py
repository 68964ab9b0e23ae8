import numpy as np
import pytest

from jetscribe.shared.activity import (
    GatewayActivity,
    PersisterActivity,
    RollingWindow,
    SessionLoad,
    WorkerActivity,
    percentile,
)
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.wire import DecodeTotals, WorkerStats

IDLE = WorkerStats(worker_id="w1", at=0.0)


@pytest.mark.parametrize(
    "values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.random.default_rng(1).random(37))]
)
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_interpolates_as_numpy_does(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none():
    assert percentile([], 50) is None


def test_window_keeps_only_the_last_minute():
    clock = ManualClock()  # ten days into its monotonic clock
    window = RollingWindow(clock.monotonic)
    window.add(10.0)
    clock.advance(30)
    window.add(1.0)
    window.add(2.0)
    assert window.count == 3 and window.total == 13.0
    clock.advance(30.5)  # the first value is now 60.5 s old
    assert window.values() == [1.0, 2.0]
    assert window.percentiles(50, 95) == {"p50": 1.5, "p95": 1.95}
    clock.advance(31)
    assert window.count == 0 and window.percentiles(50) == {"p50": None}


def test_window_holds_at_most_its_bound_keeping_the_newest():
    clock = ManualClock()
    window = RollingWindow(clock.monotonic, max_values=3)
    for value in range(5):
        window.add(float(value))
    assert window.values() == [2.0, 3.0, 4.0]


def test_worker_final_latency_over_the_last_minute_and_untimed_finals_counted():
    clock = ManualClock()
    worker = WorkerActivity(clock.monotonic)
    worker.final(1.1)
    worker.final(0.5)
    worker.final(None)  # its audio came before this worker had the session
    report = worker.report(IDLE, [], [])
    assert (report["finals"], report["finals_last_min"], report["finals_untimed"]) == (3, 3, 1)
    assert report["final_latency_s"] == {"p50": pytest.approx(0.8), "p95": pytest.approx(1.07)}
    clock.advance(61)
    report = worker.report(IDLE, [], [])
    assert (report["finals"], report["finals_last_min"]) == (3, 0)
    assert report["final_latency_s"] == {"p50": None, "p95": None}


def test_worker_report_sessions_decode_load_errors():
    clock = ManualClock()
    worker = WorkerActivity(clock.monotonic)
    clock.advance(120)
    worker.decoded(["final", "final"], 3.0)
    worker.decoded(["interim"], 1.5)
    worker.decoded(["speculative"], 1.5)
    worker.error("malformed")
    worker.error("malformed")
    worker.rejection("worker_full")
    sessions = [
        SessionLoad("acme", "s1", 3, backlog_s=1.25),
        SessionLoad("acme", "s2", 5, backlog_s=4.0),
        SessionLoad("beta", "s9", 3, backlog_s=0.0),
    ]
    load = WorkerStats(
        worker_id="w1",
        at=clock.wall(),
        sessions=3,
        speaking=1,
        backlog_s=5.25,
        backlog_max_s=4.0,
        finals_waiting_s=0.5,
        decodes={"final": DecodeTotals(count=2, seconds=3.0, audio_s=9.0)},
        batches=3,
        batch_items=4,
        cpu_s=12.5,
        rss_bytes=400_000_000,
    )
    report = worker.report(load, sessions, {5, 3}, model="tiny.en")
    assert report["worker_id"] == "w1" and report["model"] == "tiny.en"
    assert report["partitions"] == [3, 5]
    assert (report["sessions"], report["speaking"]) == (3, 1)
    assert report["tenants"] == {"acme": 2, "beta": 1}
    assert [s["session"] for s in report["session_list"]] == ["s2", "s1", "s9"]  # most backlog first
    assert (report["backlog_s"], report["backlog_max_s"], report["finals_waiting_s"]) == (5.25, 4.0, 0.5)
    assert report["decodes"] == {"final": {"count": 2, "seconds": 3.0, "audio_s": 9.0}}
    assert (report["batches"], report["batch_items"], report["cpu_s"], report["rss_bytes"]) == (3, 4, 12.5, 4e8)
    assert report["decode_busy"] == 0.1  # 6 s of decoding in the last 60 s
    assert report["decode_calls_last_min"] == 3
    assert report["decode_s_last_min"] == {"final": 3.0, "interim": 1.5, "speculative": 1.5}
    assert report["decodes_last_min"] == {"final": 2, "interim": 1, "speculative": 1}
    assert report["errors"] == {"malformed": 2} and report["rejected"] == {"worker_full": 1}


def test_worker_decode_busy_over_the_time_since_start_when_younger_than_a_minute():
    clock = ManualClock()
    worker = WorkerActivity(clock.monotonic)
    clock.advance(10)
    worker.decoded(["interim"], 5.0)
    assert worker.decode_busy() == 0.5


def test_gateway_report():
    clock = ManualClock()
    gateway = GatewayActivity(clock.monotonic)
    gateway.accepted(0.1)
    clock.advance(61)
    gateway.accepted(0.2)
    gateway.refused("seq_gap")
    gateway.refused("seq_gap")
    gateway.refused("bad_id")
    report = gateway.report([("acme", "s1"), ("acme", "s2"), ("beta", "s3")], gateway_id="g1")
    assert report == {
        "service": "ingest",
        "gateway_id": "g1",
        "sessions": 3,
        "tenants": {"acme": 2, "beta": 1},
        "chunks": 2,
        "audio_s": 0.3,
        "chunks_last_min": 1,
        "audio_s_last_min": 0.2,
        "refusals": {"bad_id": 1, "seq_gap": 2},
        "refusals_last_min": 3,
    }


def test_persister_report_how_far_behind_while_a_batch_waits():
    clock = ManualClock()
    persister = PersisterActivity(clock.monotonic, clock.wall)
    persister.fetched([clock.wall() - 3, clock.wall() - 1], pending=40)
    clock.advance(2)
    report = persister.report()
    assert (report["pending"], report["behind_s"]) == (40, 5.0)
    persister.written(messages=2, rows=2, seconds=0.02)
    persister.handled()
    persister.retried()
    persister.poison("malformed")
    report = persister.report()
    assert report["behind_s"] == 0.0
    assert (report["messages"], report["rows"], report["rows_last_min"], report["transactions_last_min"]) == (
        2,
        2,
        2,
        1,
    )
    assert report["write_latency_s"] == {"p50": 0.02, "p95": 0.02}
    assert (report["retries"], report["dropped"]) == (1, {"malformed": 1})
