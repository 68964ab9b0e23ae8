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
        "words_dropped": 2,
        "dropped_by_reason": {"loop": 1, "silence": 1},
        "dropped_lost": 1,
        "empty_finals": 0,
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
    assert "wer_ratio" in out and "noise" in out and "OVERALL" in out and "lost" in out
    assert (per["noise"]["words_dropped"], per["noise"]["dropped_lost"], per["noise"]["empty_finals"]) == (4, 2, 0)
    assert overall["dropped_by_reason"] == {"loop": 3, "silence": 3}


def test_analyse_reports_the_words_the_guards_dropped_and_which_were_lost(accuracy, capsys):
    import numpy as np

    from jetscribe.client.bot import Audio, StreamResult
    from jetscribe.shared.wire import DroppedWord, Segment, SessionEvent, Word

    def final(i, words, dropped):
        text = "".join(w.word for w in words).strip()
        return Segment(
            tenant="t", session_id="s", segment_id=i, revision=1, status="final", start=0.0, end=3.0,
            text=text, words=words, dropped=dropped, published_at=10.0,
        )  # fmt: skip

    kept = [Word(" Hello.", 0.1, 0.4, 0.9), Word(" I'm", 1.0, 1.2, 0.9), Word(" Diane.", 1.2, 1.6, 0.9)]
    result = StreamResult(sent_by_seq={i: 9.0 + i * 0.1 for i in range(40)}, frames_per_chunk=1600)
    result.finals = {
        0: final(
            0, kept, [DroppedWord(" Hello.", 0.5, 0.8, 0.9, "loop"), DroppedWord(" Hello.", 0.8, 0.9, 0.9, "loop")]
        ),
        1: final(1, [], [DroppedWord(" Okay.", 3.5, 3.7, 0.2, "silence")]),  # empty, to show its drop
    }
    result.heard = [(10.5, s) for s in result.finals.values()]
    result.ended = SessionEvent(tenant="t", session_id="s", event="ended", at=11.0, words_dropped=3, empty_finals=0)
    turns = [{"speaker": "A", "start": 0.0, "end": 2.0, "text": "Hello. Hello. I'm Diane."}]
    item = accuracy.Item("call", Path("call"), Audio(np.zeros(64000, np.int16), 16000), turns[0]["text"], turns)
    f = accuracy.analyse(item, result, 4.0, "hello hello i'm diane", 1.0)
    assert (f["words_dropped"], f["dropped_lost"], f["empty_finals"]) == (3, 1, 0)
    assert f["dropped_by_reason"] == {"loop": 2, "silence": 1}
    assert [d["lost"] for d in f["dropped"]] == [True, False, False]
    overall = accuracy.summarise([f], [item])
    assert (overall["words_dropped"], overall["dropped_lost"]) == (3, 1)
    accuracy.print_table([f], overall)
    assert "dropped" in capsys.readouterr().out
