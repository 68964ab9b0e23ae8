"""The speaker measures of bench/speakers.py: spans from labelled finals, DER (pyannote.metrics) and cpWER."""

import pytest

from jetscribe.evaluation.speakers import cp_wer, diarization_error, segment_spans, speaker_spans

pytest.importorskip("pyannote.metrics", reason="the `speakers` extra")

TURNS = [
    {"speaker": "A", "start": 0.0, "end": 2.0, "text": "hello there"},
    {"speaker": "B", "start": 2.5, "end": 4.0, "text": "hi you"},
]


def test_spans_join_one_speakers_words_and_take_a_words_own_label_first():
    finals = [
        (0.0, 2.0, "S1", [["hello", 0.0, 0.9, 0.9, "S1"], ["there", 1.0, 2.0, 0.9, "S1"]]),
        (2.5, 4.0, "S2", [["hi", 2.5, 3.0, 0.9], ["you", 3.1, 4.0, 0.9, None]]),  # the final's label
    ]
    assert speaker_spans(finals) == [(0.0, 2.0, "S1"), (2.5, 4.0, "S2")]


def test_segment_spans_cover_each_final_whole_under_its_speaker():
    finals = [
        (0.0, 1.0, "S1", [["hello", 0.1, 0.4, 0.9, "S1"]]),
        (1.2, 2.0, "S1", [["there", 1.5, 1.8, 0.9, "S1"]]),  # 0.2 s after the last: joined
        (2.5, 4.0, "S2", []),
        (4.5, 5.0, None, []),  # nobody: no span
    ]
    assert segment_spans(finals) == [(0.0, 2.0, "S1"), (2.5, 4.0, "S2")]


def test_der_counts_a_wrong_speaker_and_ignores_label_names():
    assert diarization_error(TURNS, [(0.0, 2.0, "x"), (2.5, 4.0, "y")]) == 0.0
    assert diarization_error(TURNS, [(0.0, 4.0, "x")]) == pytest.approx(0.5, abs=0.1)  # B's 1.5 s: confusion


def test_cpwer_pairs_speakers_by_fewest_errors():
    assert cp_wer(TURNS, [("x", "hello there"), ("y", "hi you")]) == 0.0
    assert cp_wer(TURNS, [("y", "hi you"), ("x", "hello there")]) == 0.0
    assert cp_wer(TURNS, [("x", "hello there hi you")]) == 1.0  # 2 insertions for A, 2 deletions for B
    assert cp_wer(TURNS, [("x", "hello"), ("y", "there"), ("z", "hi you")]) == 0.5  # a third speaker: extra words
