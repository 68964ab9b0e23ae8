"""bench/accuracy.py: the per-condition summary (no servers)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake(name, condition, streaming, offline, latencies):
    return {
        "name": name,
        "condition": condition,
        "text_streaming": streaming,
        "text_offline": offline,
        "latencies": latencies,
        "latencies_first_interim": [0.5],
        "segments": [],
        "words_in_silence": 0,
        "repeated_words": 0,
        "duration_s": 10.0,
        "offline_compute_s": 1.0,
    }


def test_by_condition_summarises_each_condition_and_prints(accuracy, capsys):
    Item = accuracy.Item
    items = [
        Item("a@noise", Path("a"), None, "one two three four", [], "noise", "a"),
        Item("a@phone", Path("a"), None, "one two three four", [], "phone", "a"),
        Item("b@noise", Path("b"), None, "five six", [], "noise", "b"),
    ]
    files = [
        fake("a@noise", "noise", "one two three", "one two three four", [1.0, 2.0]),
        fake("a@phone", "phone", "one two three four", "one two three four", [0.5]),
        fake("b@noise", "noise", "five six", "five", [3.0]),
    ]
    per = accuracy.by_condition(files, items, ["clean", "noise", "phone"])
    assert list(per) == ["noise", "phone"]  # a condition without files is left out
    assert per["noise"]["files"] == ["a@noise", "b@noise"]
    assert per["noise"]["wer_streaming"] == pytest.approx(1 / 6)
    assert per["noise"]["wer_offline"] == pytest.approx(1 / 6)
    assert per["noise"]["wer_ratio"] == pytest.approx(1.0)
    assert per["noise"]["latency_final_p50"] == 2.0
    assert per["phone"]["wer_ratio"] == 1.0
    overall = accuracy.summarise(files, items)
    accuracy.print_condition_table(per, overall)
    out = capsys.readouterr().out
    assert "wer_ratio" in out and "noise" in out and "OVERALL" in out
