"""bench/vad_cost.py: endpoint counting and the segmenter run, on scripted audio (the script itself runs once)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from jetscribe.services.transcriber.options import CommitOptions
from jetscribe.services.transcriber.vad import WebrtcVoiceDetector

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def vad_cost():
    spec = importlib.util.spec_from_file_location("bench_vad_cost", REPO / "bench" / "vad_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_on_time_counts_turn_ends_followed_by_a_pause(vad_cost):
    turns = [(0.5, 2.0), (2.3, 4.0), (5.5, 7.0)]  # no pause after the first: no endpoint expected there
    utts = [(0.2, 4.2, 4.6), (5.2, 7.2, 9.0)]
    assert vad_cost.on_time(utts, turns, 10.0) == "1/2"
    assert vad_cost.on_time([(0.2, 4.2, 4.6), (5.2, 7.2, 7.6)], turns, 10.0) == "2/2"


def test_segment_and_frames_on_a_tone(vad_cost):
    t = np.arange(16000 * 2) / 16000
    tone = (8000 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.int16)
    audio = np.concatenate([np.zeros(16000, np.int16), tone, np.zeros(16000, np.int16)])
    vad_cost.frames(WebrtcVoiceDetector(2), audio)
    utts = vad_cost.segment(WebrtcVoiceDetector(2), audio, CommitOptions())
    assert len(utts) >= 1 and all(end <= closed for _, end, closed in utts)
