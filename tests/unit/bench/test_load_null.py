"""bench/load_null.py's pure parts: which chunk closes an utterance (checked against the real segmenter), the
percentiles and the bound."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from jetscribe.services.transcriber.options import CommitOptions
from jetscribe.services.transcriber.segmenter import UtteranceSegmenter
from jetscribe.services.transcriber.vad import WebrtcVoiceDetector
from jetscribe.shared.audio import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def load_null():
    spec = importlib.util.spec_from_file_location("bench_load_null", REPO / "bench" / "load_null.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_closing_chunk_is_the_one_the_segmenter_closes_the_utterance_in(load_null):
    rng = np.random.default_rng(3)
    t = np.arange(int(load_null.SPEECH_S * SAMPLE_RATE)) / SAMPLE_RATE
    voiced = (6000 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)
    payloads = load_null.cycle_payloads(np.concatenate([np.zeros(8000, np.int16), voiced]))
    assert len(payloads) == round((load_null.SPEECH_S + load_null.SILENCE_S) / load_null.CHUNK_S)
    segmenter = UtteranceSegmenter(WebrtcVoiceDetector(2), CommitOptions())
    closed_in, phase = {}, int(rng.integers(len(payloads)))
    for seq in range(4 * len(payloads)):
        before = len(segmenter.closed)
        segmenter.add(np.frombuffer(payloads[(seq + phase) % len(payloads)], "<i2"), seq * 0.1)
        if len(segmenter.closed) > before:
            closed_in[segmenter.closed[-1].speech_end] = seq
    assert len(closed_in) >= 3
    for speech_end, seq in closed_in.items():
        assert load_null.closing_seq(round(speech_end / SAMPLE_RATE, 3)) == seq


def test_percentiles_and_the_first_bound(load_null):
    p50, p99 = load_null.percentiles_ms([0.010] * 98 + [0.5, 0.5])
    assert p50 == pytest.approx(10.0) and p99 == pytest.approx(500.0)
    assert all(math.isnan(x) for x in load_null.percentiles_ms([]))
    assert load_null.first_bound({"gateway-0": 95.0, "transcriber": 99.0, "postgres": 20.0}, 80.0) == "transcriber"
    assert load_null.first_bound({"gateway-0": 50.0}, 97.0) == "host CPU"
    assert load_null.first_bound({"gateway-0": 50.0}, 60.0) == "none"


def test_who_fell_behind(load_null):
    assert load_null.behind(100, left_audio=50, left_transcripts=3, late_p99_ms=40.0, rtt_p99_ms=30.0) == []
    assert load_null.behind(100, 5000, 0, 40.0, 30.0) == ["transcriber (AUDIO backlog 5000)"]
    assert load_null.behind(100, 0, 400, 40.0, 30.0) == ["persister (TRANSCRIPTS backlog 400)"]
    assert load_null.behind(100, 0, 0, 900.0, 600.0) == ["gateways/NATS (round trips): bots late p99 900 ms"]
    assert load_null.behind(100, 0, 0, 900.0, 20.0) == ["load generators: bots late p99 900 ms"]
