"""bench/load.py's runner in this process against a real local stack (nats-server, PostgreSQL and the three services
as child processes, Whisper tiny.en): two staggered sessions of a short synthesised dialog at double speed."""

import json

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def load():
    from bench import load  # the script, as a module (pytest's pythonpath has the repo)

    return load


def test_two_sessions_give_a_row_of_real_numbers(load, tmp_path, capsys):
    from bench.common import write_devset_file

    data = tmp_path / "data"
    turns = [
        ("A", "Good morning. I would like to book a table for two people tonight."),
        ("B", "Of course. We have a free table at eight o'clock by the window."),
    ]
    write_devset_file(data, "booking", "dialog", turns)
    out = tmp_path / "load.json"
    argv = ["--model", "tiny.en", "--data", str(data), "--sessions", "2", "--speed", "2", "--stagger", "0.3"]
    assert load.main([*argv, "--duration", "0", "--min-window", "2", "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    (alone,) = report["alone"]
    assert alone["file"] == "booking" and alone["wer"] < 0.3 and alone["latency_final_p95"] > 0
    (variant,) = report["variants"]
    (row,) = variant["rows"]
    assert (row["sessions"], row["sessions_run"], row["failed"]) == (2, 2, 0)
    assert 0 < row["latency_final_p50"] <= row["latency_final_p95"] <= row["latency_final_p99"]
    assert row["latency_first_interim_p50"] > 0
    assert row["wer"] < 0.3 and row["wer_alone"] == pytest.approx(alone["wer"])
    assert abs(row["wer_delta"]) <= row["wer_delta_max_abs"] + 1e-9
    assert len({s["session_id"] for s in row["session_detail"]}) == 2
    # The workers' stats arrived: backlog samples and the decodes of this step.
    ((worker_id, worker),) = row["workers"].items()
    assert worker["samples"] >= 2 and worker["backlog_max_s"] > 0
    assert worker["decodes"]["final"]["count"] + worker["decodes"]["speculative"]["count"] >= 4
    assert 0 < worker["decode_busy"] < 1.5 and worker["mean_batch"] >= 1 and worker["cpu_pct"] > 0
    assert row["sustained"] in (True, False) and row["waiting_growth"] is not None  # judged, whatever the host
    # Every service was sampled, and every hop moved what the bots sent.
    for service in ("nats-server", "postgres", "ingest", "transcriber", "persister", load.LOAD_GENERATOR):
        assert row["services"][service]["rss_max_mb"] > 0, service
    assert row["services"]["transcriber"]["cpu_pct"] > 0
    hops = row["hops"]
    assert hops["audio_messages"] == hops["bot_chunks"] + 2 * 2  # each chunk stored once, plus start and end
    finals = sum(len(s["latencies"]) for s in row["session_detail"])
    assert hops["transcripts_messages"] >= finals + 2 * 2  # segments, and started + ended per session
    assert hops["postgres_rows"] >= finals + 2 and hops["persister_settle_s"] is not None
    printed = capsys.readouterr().out
    assert "== default (no extra environment)" in printed and "knee:" in printed
