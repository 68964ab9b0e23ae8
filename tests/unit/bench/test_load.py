"""bench/load.py: the options, the measures and the report, without servers."""

from pathlib import Path

import numpy as np
import pytest

from jetscribe.client.bot import Audio, StreamResult
from jetscribe.shared.wire import DecodeTotals, Segment, Word, WorkerStats


@pytest.fixture(scope="module")
def load():
    from bench import load  # the script, as a module (pytest's pythonpath has the repo)

    return load


def test_session_counts(load):
    assert load.parse_sessions("8,1,4,4") == [1, 4, 8]
    for bad in ("", "0,2", "1,two"):
        with pytest.raises(ValueError, match="--sessions"):
            load.parse_sessions(bad)


def test_variants_name_their_environments(load):
    assert load.parse_variants(None) == [load.Variant("default")]
    batched, unbatched = load.parse_variants("batched:JETSCRIBE_MAX_BATCH=8,unbatched:JETSCRIBE_MAX_BATCH=1")
    assert (batched.name, batched.env) == ("batched", {"JETSCRIBE_MAX_BATCH": "8"})
    assert (unbatched.name, unbatched.env) == ("unbatched", {"JETSCRIBE_MAX_BATCH": "1"})
    # several variables, a value that is itself a comma list, and a variant with no environment
    a, b, c = load.parse_variants("a:X=1,Y=2,b:JETSCRIBE_WORKER_PARTITIONS=0,1,2,c:")
    assert (a.env, b.env, c.env) == ({"X": "1", "Y": "2"}, {"JETSCRIBE_WORKER_PARTITIONS": "0,1,2"}, {})
    for bad, why in (("X=1", "begin with a name"), ("a:X=1,a:X=2", "named twice"), ("a:nonsense", "neither")):
        with pytest.raises(ValueError, match=why):
            load.parse_variants(bad)


def item(load, name, seconds=10.0, turns=None, reference="one two three four"):
    audio = Audio(np.zeros(int(seconds * 16000), np.int16), 16000)
    return load.Item(name, Path(name), audio, reference, turns or [])


def test_bots_take_the_files_in_turn_and_go_on_until_the_duration(load):
    a, b, c = item(load, "a", 10.0), item(load, "b", 20.0), item(load, "c", 5.0)
    once = load.plan_sessions([a, b, c], 5, 100.0, 0.5, 1.0, 0.0)
    assert [(p.bot, p.turn, p.item.name, p.start_at) for p in once] == [
        (0, 0, "a", 100.0), (1, 0, "b", 100.5), (2, 0, "c", 101.0), (3, 0, "a", 101.5), (4, 0, "b", 102.0)
    ]  # fmt: skip
    # Two bots together for 25 s (from 100.5 to 125.5): each goes on with the file N further, back to back.
    steady = load.plan_sessions([a, b, c], 2, 100.0, 0.5, 1.0, 25.0)
    by_bot = {bot: [(p.item.name, p.start_at) for p in steady if p.bot == bot] for bot in (0, 1)}
    assert by_bot[0] == [("a", 100.0), ("c", 110.0), ("b", 115.0)]  # streams until 135 >= 125.5
    assert by_bot[1] == [("b", 100.5), ("a", 120.5)]  # until 130.5
    assert load.plan_sessions([a], 1, 0.0, 0.7, 2.0, 12.0)[-1].start_at == 10.0  # at double speed, 5 s a file
    assert len(load.plan_sessions([c], 8, 0.0, 1.0, 1.0, 0.0)) == 8  # one file a bot, even before the last starts


def test_quick_clips_a_file_at_a_turn_end(load):
    a = item(load, "a")
    turns = [
        {"start": 0.5, "end": 8.0, "text": "first turn."},
        {"start": 9.0, "end": 19.0, "text": "second turn."},
        {"start": 20.0, "end": 29.0, "text": "third turn."},
    ]
    long = item(load, "long", 30.0, turns, "first turn. second turn. third turn.")
    cut = load.clip(long, 20.0)
    assert cut.reference == "first turn. second turn." and cut.turns == turns[:2]
    assert cut.audio.duration_s == pytest.approx(19.5)
    assert load.clip(cut, 20.0) is cut  # short already
    assert load.clip(a, 5.0) is a  # no turn times: kept whole


def test_send_lags_measure_each_chunk_against_the_first_ones_schedule(load):
    result = StreamResult(sent_by_seq={0: 100.0, 1: 100.1, 2: 100.2, 3: 100.9}, sent_at=[100.01, 100.11, 100.6, 100.95])
    assert load.send_lags(result, 1.0) == [0.01, 0.01, 0.4, 0.65]
    assert load.send_lags(result, 2.0)[3] == pytest.approx(0.8)  # at double speed chunk 3 was due at 100.15
    assert load.send_lags(StreamResult(), 1.0) == []


def stats(worker, at, waiting=0.0, backlog=0.0, **fields):
    return WorkerStats(worker_id=worker, at=at, finals_waiting_s=waiting, backlog_s=backlog, **fields)


def test_slope_sees_a_trend_not_a_spike(load):
    assert load.slope([(t, 0.5 * t) for t in range(10)]) == pytest.approx(0.5)
    spiky = [(t, 6.0 if t in (3, 11) else 0.0) for t in range(20)]
    assert load.slope(spiky) == 0.0
    assert np.polyfit([p[0] for p in spiky], [p[1] for p in spiky], 1)[0] != 0  # least squares would call it one
    assert load.slope([(0, 0), (1, 1)]) is None
    assert load.slope([(1, 0), (1, 1), (1, 2)]) is None


def test_waiting_growth_sums_the_workers_within_the_window(load):
    samples = [stats("w1", t, waiting=0.3 * t) for t in range(30)] + [
        stats("w2", t, waiting=0.1 * t) for t in range(30)
    ]
    samples += [stats("w1", 40, waiting=100.0)]  # outside the window: not counted
    assert load.waiting_growth(samples, (0.0, 29.0), 10.0) == pytest.approx(0.4)
    assert load.waiting_growth(samples, (0.0, 5.0), 10.0) is None  # too short to show a trend
    assert load.waiting_growth(samples, None, 10.0) is None
    assert load.waiting_growth([], (0.0, 29.0), 10.0) is None  # no stats: unknown, not "kept up"


def test_sustained_names_every_reason(load):
    rule = load.Rule(max_send_lag_s=1.0, max_growth=0.1, min_window_s=10.0)
    assert load.sustained(4, 9, 0, 0.2, 0.35, rule) == (True, [])
    ok, why = load.sustained(4, 9, 1, 1.5, 0.5, rule)
    assert ok is False and len(why) == 3
    assert "1 of 9 sessions" in why[0] and "1.50 s behind" in why[1] and "grew 0.50 s/s" in why[2]
    ok, why = load.sustained(4, 4, 0, 0.2, None, rule)
    assert ok is None and "unknown" in why[0]
    assert load.sustained(4, 4, 0, 3.0, None, rule)[0] is False  # a known failure decides without the trend


def test_knee_is_the_largest_n_within_the_bound_and_sustained(load):
    rows = [
        {"sessions": 1, "sustained": True, "latency_final_p95": 1.0},
        {"sessions": 4, "sustained": True, "latency_final_p95": 2.4},
        {"sessions": 8, "sustained": None, "latency_final_p95": 2.0},
        {"sessions": 16, "sustained": True, "latency_final_p95": 3.1},
        {"sessions": 24, "sustained": False, "latency_final_p95": 2.0},
    ]
    assert load.knee(rows, 2.5) == 4
    assert load.knee(rows, 5.0) == 16
    assert load.knee(rows[3:], 2.5) is None


def test_worker_summary_takes_the_totals_across_the_step(load):
    def at(t, finals, seconds, batches, items, cpu, backlog):
        return stats(
            "w1",
            t,
            backlog=backlog,
            decodes={"final": DecodeTotals(count=finals, seconds=seconds, audio_s=3.0 * finals)},
            batches=batches,
            batch_items=items,
            cpu_s=cpu,
            rss_bytes=200 * 2**20,
        )

    samples = [
        at(99.0, 2, 1.0, 2, 2, 50.0, 0.0),
        at(105.0, 6, 3.0, 4, 6, 53.0, 4.0),
        at(111.0, 10, 7.0, 6, 10, 56.0, 2.0),
    ]
    w = load.worker_summary(samples, 100.0, 110.0)
    assert w["decodes"]["final"] == {"count": 8, "seconds": 6.0, "audio_s": 24.0}
    assert w["decode_busy"] == 0.5 and w["mean_batch"] == 2.0 and w["cpu_pct"] == 50.0
    assert (w["samples"], w["backlog_max_s"], w["rss_max_mb"]) == (1, 4.0, 200.0)
    assert w["series"] == [[5.0, 4.0, 0.0, 0, 0]]


def test_service_usage_and_which_service_a_process_is(load):
    samples = [
        load.Sample(10.0, {"transcriber": 5.0, "nats-server": 1.0}, {"transcriber": 300 * 2**20, "nats-server": 2**20}),
        load.Sample(12.0, {"transcriber": 6.5, "nats-server": 1.1}, {"transcriber": 320 * 2**20, "nats-server": 2**20}),
    ]
    usage = load.service_usage(samples, 9.0, 13.0)
    assert usage["transcriber"] == {"cpu_pct": 75.0, "rss_max_mb": 320.0}
    assert usage["nats-server"]["cpu_pct"] == 5.0
    assert load.service_usage(samples, 11.0, 13.0) == {}  # one sample: no rate
    assert load.service_of("python3", ["/v/bin/python", "-m", "jetscribe.services.transcriber"]) == "transcriber"
    assert load.service_of("nats-server", ["/v/bin/nats-server", "-c", "x.conf"]) == "nats-server"
    assert load.service_of("postgres", ["/p/bin/postgres", "-D", "/d"]) == "postgres"
    assert load.service_of("sleep", ["sleep", "5"]) == "sleep"


def bot_result(words_by_segment, sent0=1000.0, received_after=1.0):
    """A bot's view of a session: 0.1 s chunks sent on time from `sent0`, each final received `received_after`
    seconds after its last word's chunk was sent."""
    result = StreamResult(frames_per_chunk=1600)
    for seq in range(100):
        result.sent_by_seq[seq] = sent0 + 0.1 * seq
        result.sent_at.append(sent0 + 0.1 * seq + 0.02)
    for i, words in enumerate(words_by_segment):
        ws = [Word(f" {w}", 1.0 + i * 3 + k * 0.3, 1.2 + i * 3 + k * 0.3, 0.9) for k, w in enumerate(words)]
        seg = Segment(
            tenant="load", session_id="s", segment_id=i, revision=1, status="final", start=ws[0].start,
            end=ws[-1].end, text=" ".join(words), words=ws, published_at=0.0,
        )  # fmt: skip
        result.finals[i] = seg
        last_chunk = int(ws[-1].end * 10 - 1e-9)
        result.heard.append((result.sent_by_seq[last_chunk] + received_after, seg))
    return result


def test_a_row_of_the_curve_from_sessions_workers_and_processes(load):
    a = item(load, "a", reference="one two three four")
    b = item(load, "b", reference="five six seven eight")
    runs = [
        load.SessionRun(a, "a-1", 0, 1000.0, bot_result([["one", "two"], ["three", "four"]], 1000.0, 1.0)),
        load.SessionRun(b, "b-1", 1, 1000.7, bot_result([["five", "six"], ["seven"]], 1000.7, 2.0)),
        load.SessionRun(a, "a-2", 2, 1001.4, None, "BotError: rejected: the transcriber rejected the session"),
    ]
    alone = {"a": {"wer": 0.0, "text": "one two three four"}, "b": {"wer": 0.25, "text": "five six seven"}}
    sessions = [load.session_report(r, alone.get(r.item.name), 1.0) for r in runs]
    assert sessions[0]["latencies"] == [1.0, 1.0] and sessions[1]["latencies"] == [2.0, 2.0]
    assert (sessions[1]["wer"], sessions[1]["wer_delta"]) == (0.25, 0.0)
    assert sessions[0]["send_lag_max"] == pytest.approx(0.02)
    assert sessions[2]["error"].startswith("BotError") and "latencies" not in sessions[2]
    workers = [stats("w1", 1000.0 + t, waiting=0.0, backlog=2.0) for t in range(12)]
    usage = {"transcriber": {"cpu_pct": 150.0, "rss_max_mb": 300.0}}
    hops = load.hop_rates({"AUDIO": 10, "TRANSCRIPTS": 5}, {"AUDIO": 210, "TRANSCRIPTS": 45}, 200, 12, 10.0)
    assert hops["audio_per_s"] == 20.0 and hops["transcripts_per_s"] == 4.0 and hops["postgres_rows_per_s"] == 1.2
    row = load.curve_row(3, sessions, alone, workers, usage, hops, (1000.0, 1012.0), load.Rule())
    assert (row["sessions"], row["sessions_run"], row["failed"]) == (3, 3, 1)
    assert row["latency_final_p50"] == 1.5 and row["latency_final_p95"] == 2.0
    assert row["wer"] == pytest.approx(1 / 8) and row["wer_alone"] == pytest.approx(1 / 8)
    assert row["wer_delta"] == 0.0 and row["wer_delta_max_abs"] == 0.0
    assert row["backlog_max_s"] == 2.0 and row["transcriber_cpu_pct"] == 150.0
    assert row["sustained"] is False and "1 of 3 sessions" in row["not_sustained_because"][0]
    assert row["waiting_growth"] is None  # a session failed: no full-load window to judge


def test_the_full_load_window_runs_while_every_bot_streams(load):
    sessions = [
        {"bot": 0, "started_at": 100.0, "last_sent_at": 129.9},
        {"bot": 0, "started_at": 130.0, "last_sent_at": 160.0},
        {"bot": 1, "started_at": 100.7, "last_sent_at": 104.0},  # a short file, then the next one
        {"bot": 1, "started_at": 104.1, "last_sent_at": 150.0},
    ]
    assert load.full_load_window(sessions) == (100.7, 150.0)
    assert load.full_load_window([{**sessions[0], "last_sent_at": None}]) is None
    assert load.full_load_window([]) is None


def test_the_curve_prints_the_knee_and_why_a_step_fell_short(load, capsys):
    base = {
        "failed": 0, "sessions_run": 4, "latency_final_p50": 1.0, "latency_final_p99": 2.0,
        "latency_first_interim_p50": 0.8, "wer": 0.1, "wer_delta": 0.0, "wer_delta_max_abs": 0.01,
        "backlog_max_s": 5.0, "waiting_max_s": 1.0, "waiting_growth": 0.0, "send_lag_max": 0.1,
        "transcriber_cpu_pct": 90.0, "decode_busy": 0.5, "mean_batch": 1.0, "not_sustained_because": [],
        "hops": {"audio_per_s": 10.0},
        "services": {"transcriber": {"cpu_pct": 90.0, "rss_max_mb": 250.0}},
    }  # fmt: skip
    rows = [
        {**base, "sessions": 1, "sustained": True, "latency_final_p95": 1.5},
        {**base, "sessions": 4, "sustained": True, "latency_final_p95": 2.2},
        {**base, "sessions": 8, "sustained": False, "latency_final_p95": 4.0, "not_sustained_because": ["too slow"]},
    ]
    load.print_curve(load.Variant("batched", {"JETSCRIBE_MAX_BATCH": "8"}), rows, load.Rule())
    out = capsys.readouterr().out
    assert "== batched (JETSCRIBE_MAX_BATCH=8)" in out
    assert [line.split()[-1] for line in out.splitlines()[4:7]] == ["yes", "<-", "NO"] and "knee: N = 4" in out
    assert "N=8: too slow" in out and "transcriber CPU%/MB" in out and "90/250" in out


def test_a_steps_voice_cost_is_the_difference_of_the_workers_totals(load):
    before = {"ahead_cpu_s": 1.0, "final_cpu_s": 0.5, "final_waits": 10, "final_wait_s": 0.2, "ahead_dropped": 0}
    after = {"ahead_cpu_s": 4.0, "final_cpu_s": 1.5, "final_waits": 30, "final_wait_s": 1.2, "ahead_dropped": 2}
    step = load.voice_step(before, after, wall_s=40.0)
    assert step == {"cpu_s": 4.0, "cpu_pct": 10.0, "final_wait_mean_s": 0.05, "final_waits": 20, "ahead_dropped": 2}
    assert load.voice_step({}, {}, wall_s=40.0) == {}  # speakers from the audio off


def test_the_parts_of_a_split_final_count_once_from_the_utterance_end(load):
    """A final split where the speaker changes arrives as parts within ms of each other: each part's own latency
    runs from its last word (the first part's holds the rest of the utterance), the utterance's from the last."""
    result = bot_result([["one", "two"], ["three", "four"], ["five"]], received_after=1.0)
    first, second, third = (result.heard[k][1] for k in range(3))
    # parts 0 and 1 are one utterance: part 0 arrives with part 1, 0.05 s apart
    result.heard[0] = (result.heard[1][0] - 0.05, first)
    session = load.session_report(load.SessionRun(item(load, "a"), "a-1", 0, 1000.0, result), None, 1.0)
    own = session["latencies"]
    assert own[0] == pytest.approx(1.0 + (second.words[-1].end - first.words[-1].end) - 0.05, abs=0.11)
    assert session["latencies_utterance"] == [1.0, 1.0]  # two utterances, each from its own last word
    row = load.curve_row(1, [session], {}, [], {}, {}, (1000.0, 1012.0), load.Rule())
    assert row["latency_utterance_p50"] == 1.0 and row["utterances"] == 2
