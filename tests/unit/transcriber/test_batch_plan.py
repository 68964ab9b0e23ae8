"""The batch scheduler (`decoding.plan_batch`) on scripted job plans: which jobs share one decode call."""

import pytest

from jetscribe.services.transcriber.decoding import (
    BATCH_WINDOWS,
    FULL_WINDOW_FRAMES,
    JobPlan,
    batch_frames,
    plan_batch,
    window_frames,
)
from jetscribe.shared.audio import SAMPLE_RATE


def plan(kind="final", seconds=3.0, urgency=(0, 0.0), beam=5, window="short", language="en", speculative=False):
    return JobPlan(kind, speculative, int(seconds * SAMPLE_RATE), beam, window, language, urgency)


def final(closed_at, seconds=3.0, **kw):
    return plan("final", seconds, (0, closed_at), **kw)


def interim(backlog_s, seconds=3.0):
    return plan("interim", seconds, (2, -backlog_s), beam=1)


def test_nothing_due_is_an_empty_batch():
    assert plan_batch([], 8) == []


def test_finals_go_before_interims_and_never_share_a_call_with_them():
    plans = [("i1", interim(2.0)), ("f1", final(5.0)), ("i2", interim(1.0)), ("f2", final(4.0))]
    assert plan_batch(plans, 8) == ["f2", "f1"]  # oldest final first; interims wait for the next call
    assert plan_batch(plans, 1) == ["f2"]


def test_early_finals_join_finals_of_the_same_window_after_them():
    spec = plan("final", 3.0, (1, 0.0), speculative=True)
    assert plan_batch([("s", spec), ("f", final(9.0))], 8) == ["f", "s"]
    assert plan_batch([("s", spec), ("i", interim(5.0))], 8) == ["s"]


def test_interims_most_starved_first():
    plans = [("a", interim(1.0)), ("b", interim(3.0)), ("c", interim(2.0))]
    assert plan_batch(plans, 2) == ["b", "c"]


def test_only_jobs_with_the_same_window_beam_and_language_share_a_call():
    plans = [
        ("short", final(1.0, seconds=3.0)),
        ("long", final(2.0, seconds=12.0)),  # another encoder window
        ("beam", final(3.0, beam=1)),
        ("de", final(4.0, language="de")),
        ("short2", final(5.0, seconds=6.0)),  # 6 s still fits the smallest window
    ]
    assert plan_batch(plans, 8) == ["short", "short2"]
    assert plan_batch(plans[1:], 8) == ["long"]


def test_the_batch_is_capped():
    plans = [(i, final(float(i))) for i in range(20)]
    assert plan_batch(plans, 8) == list(range(8))
    assert plan_batch(plans, 0) == [0]  # a nonsense cap still decodes something


def test_a_job_whose_language_is_unknown_goes_alone():
    plans = [("auto", final(1.0, language=None)), ("en", final(2.0))]
    assert plan_batch(plans, 8) == ["auto"]
    assert plan_batch([("en", final(0.5)), ("auto", final(1.0, language=None))], 8) == ["en"]


@pytest.mark.parametrize("seconds", [0.1, 2.0, 6.6, 6.7, 9.9, 10.1, 13.3, 13.4, 16.6, 17.0, 25.0, 40.0])
def test_a_job_gets_the_smallest_batch_window_that_holds_its_short_window(seconds):
    samples = int(seconds * SAMPLE_RATE)
    frames = batch_frames(samples, "short")
    assert frames in BATCH_WINDOWS and frames >= window_frames(samples)
    smaller = [w for w in BATCH_WINDOWS if w < frames]
    assert not smaller or smaller[-1] < window_frames(samples)
    assert batch_frames(samples, "full") == FULL_WINDOW_FRAMES


def test_prompts_come_in_a_few_token_lengths_each_from_its_own_text():
    from jetscribe.services.transcriber.batched import PROMPT_STEP, PROMPT_TOKENS, PromptTokens

    class Tok:
        def encode(self, text):
            return list(range(len(text.split())))  # one token per word

    prompts = PromptTokens.__new__(PromptTokens)
    prompts.tokenizer = lambda language: Tok()
    lengths = {n: len(prompts._tokens("en", " ".join(["w"] * n))) for n in range(0, 80)}
    assert set(lengths.values()) == set(range(0, PROMPT_TOKENS + 1, PROMPT_STEP))
    assert all(length <= n and n - length < PROMPT_STEP or length == PROMPT_TOKENS for n, length in lengths.items())
    assert prompts._tokens("en", "a b c d e f g h i j k l m n o p q r") == tuple(range(2, 18))  # the last 16
