"""Does a short encoder window keep accuracy? Finals decoded on the full 30 s window vs one just big
enough for the audio, side by side in one run, with decode cost per call.

    python bench/windows.py [--data DIR] --model base|tiny.en|PATH [--files a,b] [--json OUT]

No servers: each file is fed in 100 ms chunks through the transcriber's own session core
(services/transcriber/core.py: VAD, endpoints, early finals, through its one-step API), and every final job is
decoded by services/transcriber/model.py with the window under test. Interims are skipped; they don't change
the finals. WER is on normalized text (jetscribe.evaluation.wer), against the file's reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from jetscribe.evaluation.metrics import corpus_wer  # noqa: E402
from jetscribe.evaluation.wer import wer  # noqa: E402
from jetscribe.services.transcriber import model as whisper  # noqa: E402
from jetscribe.services.transcriber.core import CommitOptions, SessionStream  # noqa: E402
from jetscribe.services.transcriber.vad import WebrtcVoiceDetector  # noqa: E402
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402
from jetscribe.shared.clock import system_clock  # noqa: E402
from jetscribe.shared.wire import AudioChunk, SessionControl, language_for  # noqa: E402


def transcribe_file(model, path: Path, window: str, language: str | None) -> tuple[str, list[float]]:
    audio, rate = sf.read(str(path), dtype="int16")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise SystemExit(f"{path}: needs 16 kHz mono (the gateway's output)")
    stream = SessionStream(
        "bench",
        path.stem,
        language=language,
        model="",
        worker_id="bench",
        options=CommitOptions(),
        vad=WebrtcVoiceDetector(2),
        clock=system_clock(),
    )
    finals, costs = {}, []

    def decode(job):
        if job.kind == "interim":  # interims don't change the finals: skip the decode
            return whisper.Decoded([])
        started = time.perf_counter()
        decoded = whisper.transcribe(model, dataclasses.replace(job, window=window))
        costs.append(time.perf_counter() - started)
        return decoded

    def carry_out(step) -> None:
        """Keep the finals of a step, then decode whatever the session needs next, until nothing is due."""
        while step is not None:
            finals.update((g.segment_id, g.text) for g in step.segments if g.status == "final")
            job = stream.next_job()
            step = stream.complete(job, decode(job)) if job is not None else None

    step_samples = SAMPLE_RATE // 10
    for seq, offset in enumerate(range(0, len(audio), step_samples)):
        payload = audio[offset : offset + step_samples].astype("<i2").tobytes()
        carry_out(
            stream.receive(
                AudioChunk(
                    tenant="bench",
                    session_id=path.stem,
                    seq=seq,
                    sent_at=0.0,
                    sample_rate=SAMPLE_RATE,
                    channels=1,
                    encoding="pcm_s16le",
                    payload=payload,
                ),
                seq,
            )
        )
    carry_out(stream.receive(SessionControl(tenant="bench", session_id=path.stem, action="end"), "end"))
    return " ".join(finals[k] for k in sorted(finals) if finals[k]), costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="devset-format folder (default: as bench/accuracy.py's)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--files", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.data is None:
        from bench.common import default_data

        args.data = default_data(with_real=False)[0]
    wanted = {f for f in args.files.split(",") if f}
    paths = [
        p
        for p in sorted(args.data.glob("*.wav"))
        if p.with_suffix(".json").exists() and (not wanted or p.stem in wanted)
    ]
    model = whisper.load_model(args.model)
    language = language_for(args.model, None)
    windows = ("full", "short")
    rows, refs, hyps = [], [], {w: [] for w in windows}
    costs = {w: [] for w in windows}
    print(f"{'file':24s} " + "  ".join(f"WER {w:5s}" for w in windows))
    for path in paths:
        reference = json.loads(path.with_suffix(".json").read_text())["text"]
        refs.append(reference)
        row = {"file": path.stem}
        for window in windows:
            text, cost = transcribe_file(model, path, window, language)
            hyps[window].append(text)
            costs[window] += cost
            row[f"wer_{window}"] = wer(reference, text)
        rows.append(row)
        print(f"{path.stem:24s} " + "  ".join(f"{row[f'wer_{w}']:9.3f}" for w in windows), flush=True)
    summary = {"model": args.model, "files": rows}
    for window in windows:
        summary[f"wer_{window}"] = corpus_wer(refs, hyps[window])
        summary[f"calls_{window}"] = len(costs[window])
        summary[f"seconds_per_call_{window}"] = float(np.mean(costs[window])) if costs[window] else 0.0
    print(f"{'OVERALL':24s} " + "  ".join(f"{summary[f'wer_{w}']:9.3f}" for w in windows))
    for window in windows:
        print(
            f"{window}: {summary[f'calls_{window}']} final decodes, "
            f"{summary[f'seconds_per_call_{window}']:.3f} s per call"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
