"""The pure measures behind bench/accuracy.py."""

import pytest

from jetscribe.evaluation.metrics import (
    chunk_of,
    corpus_wer,
    dropped_losses,
    percentile,
    repeats_at_joins,
    send_time,
    words_in_silence,
)


def test_percentile_interpolates_and_is_none_without_values():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert percentile([5.0, 1.0, 9.0], 100) == 9.0


def test_chunk_of_takes_the_chunk_holding_the_last_sample_before_t():
    # 16 kHz, 0.1 s chunks: chunk n holds samples [1600 n, 1600 (n + 1))
    assert chunk_of(0.0, 16000, 1600) == 0
    assert chunk_of(0.05, 16000, 1600) == 0
    assert chunk_of(0.1, 16000, 1600) == 0  # a word ending exactly at 0.1 s is all in chunk 0
    assert chunk_of(0.1001, 16000, 1600) == 1
    assert chunk_of(0.3, 16000, 1600) == 2  # 0.3 * 16000 is 4800.000000000001 in floats
    assert chunk_of(1.25, 44100, 4410) == 12


def test_send_time_maps_a_word_end_to_its_chunk():
    sent = {0: 100.0, 1: 100.1, 2: 100.2, 3: 100.3}
    assert send_time(0.15, sent, 16000, 1600) == 100.1
    assert send_time(0.2, sent, 16000, 1600) == 100.1
    assert send_time(99.0, sent, 16000, 1600) == 100.3  # past the end: the last chunk
    assert send_time(0.25, {0: 1.0, 3: 4.0}, 16000, 1600) == 4.0  # not accepted: the next that was


def test_repeats_at_joins_counts_the_longest_overlap():
    texts = ["We moved the billing service", "billing service to the new cluster.", "Done."]
    assert repeats_at_joins(texts, "we moved the billing service to the new cluster done") == [
        {"join": 0, "n": 2, "words": "billing service"}
    ]


def test_repeats_at_joins_normalizes_and_caps_at_three():
    texts = ["I said: one, two, three four.", "Two three four five"]
    assert repeats_at_joins(texts, "i said one two three four five") == [{"join": 0, "n": 3, "words": "two three four"}]


def test_repeats_at_joins_ignores_what_the_reference_repeats_and_clean_joins():
    assert repeats_at_joins(["it is very", "very good"], "it is very very good") == []
    assert repeats_at_joins(["hello there", "general kenobi"], "hello there general kenobi") == []
    assert repeats_at_joins(["hello", "", "hello"], "hello") == [{"join": 0, "n": 1, "words": "hello"}]
    assert repeats_at_joins([], "x") == []


def test_words_in_silence_uses_the_word_middle_and_a_margin():
    turns = [{"start": 1.0, "end": 2.0}, {"start": 4.0, "end": 5.0}]
    words = [(" in", 1.2, 1.4), (" edge", 2.1, 2.4), (" gap", 2.9, 3.1), (" early", 0.0, 0.4)]
    out = words_in_silence(words, turns)
    assert [w["word"] for w in out] == ["gap", "early"]
    assert out[0]["outside_by"] == pytest.approx(1.0)
    assert words_in_silence(words, []) == []


def test_corpus_wer_pools_errors_over_files():
    refs = ["one two three four", "five six"]
    hyps = ["One, two three.", "five six seven"]
    assert corpus_wer(refs, hyps) == pytest.approx(2 / 6)  # one deletion + one insertion over 6 words
    assert corpus_wer(["", "a b"], ["x", "a b"]) == 0.0  # an empty reference is left out


def test_dropped_words_are_losses_only_where_the_reference_has_them_and_the_stream_does_not():
    turns = [
        {"start": 0.0, "end": 3.0, "text": "Hello. Hello. I didn't know you were there."},
        {"start": 5.0, "end": 6.0, "text": "Okay, bye."},
    ]
    kept = [(" Hello.", 0.1, 0.4), (" I", 1.0, 1.1), (" didn't", 1.1, 1.3), (" know", 1.3, 1.5)]
    dropped = [
        (" Hello.", 0.5, 0.8),  # the reference says it twice, the stream once: one loss
        (" Hello.", 0.8, 1.0),  # a third: an invention
        (" you", 1.5, 1.6),  # missing from the stream: a loss
        (" Okay.", 4.0, 4.3),  # more than 0.5 s before the turn that says it: not judged a loss
        (" Thanks", 8.0, 8.3),  # far from every turn: an invention
        (" ...", 1.6, 1.7),  # no word at all
    ]
    lost = dropped_losses(dropped, kept, turns)
    assert [(d["word"], d["start"]) for d in lost] == [("Hello.", 0.5), ("you", 1.5)]
    # within 0.5 s of it, a loss
    assert dropped_losses([(" Okay.", 4.6, 4.8)], [], turns) == [{"word": "Okay.", "start": 4.6, "end": 4.8}]
    assert dropped_losses(dropped, kept, []) == []


def test_a_sentence_published_twice_is_a_repeated_passage():
    from jetscribe.evaluation.metrics import repeated_passages

    reference = "Will do. Thanks a lot for your help. You are welcome."
    twice = "We'll do. Thanks a lot for your help. We'll do. Thanks a lot for your help. You are welcome."
    assert [p["words"] for p in repeated_passages(twice, reference)] == ["well do thanks a lot for your help"]
    assert repeated_passages(reference, reference) == []
    said_twice = "the cat sat on the mat and the cat sat on the mat"
    assert repeated_passages(said_twice, said_twice) == []  # the reference has it twice too


def test_a_phrase_that_recurs_later_is_no_repeated_passage():
    from jetscribe.evaluation.metrics import repeated_passages

    reference = "booked for Thursday at ten fifteen and then again Thursday at ten fifteen please"
    hypothesis = "booked for Thursday at 10 15 and then again Thursday at 10 15 please"
    assert repeated_passages(hypothesis, reference) == []
