"""What batching saves: decode cost per job at batch sizes 1, 2, 4, 8 (and the sequential path), on the jobs
a live session really hands out, with text equality against the same jobs decoded alone.

    python bench/batch_cost.py --model tiny.en|base|PATH [--data DIR] [--files a,b] [--sizes 1,2,4,8]
                               [--json OUT]

No servers: each file goes through the transcriber's session core in 100 ms chunks (VAD, endpoints, early finals,
interims), every job it hands out is decoded on the sequential path (as a worker with JETSCRIBE_MAX_BATCH=1) and
kept. Then the kept jobs of each kind are grouped by the worker's batch key (window, beam, language, prompt length)
and decoded again in batches of each size. Per kind it prints seconds per job for the sequential path and for each
batch size, jobs redone on the sequential path inside a batch, and how many jobs decoded to different words than
at batch size 1 (it must be 0: a job decodes the same whatever shares its call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from jetscribe.services.transcriber import model as whisper  # noqa: E402
from jetscribe.services.transcriber.batched import decode_batch, prompts_of  # noqa: E402
from jetscribe.services.transcriber.core import CommitOptions, SessionStream  # noqa: E402
from jetscribe.services.transcriber.decoding import DecodeJob  # noqa: E402
from jetscribe.services.transcriber.vad import WebrtcVoiceDetector  # noqa: E402
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402
from jetscribe.shared.clock import system_clock  # noqa: E402
from jetscribe.shared.config import TranscriberConfig  # noqa: E402
from jetscribe.shared.wire import AudioChunk, SessionControl, language_for  # noqa: E402


def live_jobs(model, path: Path, options: CommitOptions, language: str | None) -> tuple[list[DecodeJob], list[float]]:
    """Every job a session hands out for this file, each decoded on the sequential path (its cost kept)."""
    audio, rate = sf.read(str(path), dtype="int16")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise SystemExit(f"{path}: needs 16 kHz mono (the gateway's output)")
    stream = SessionStream(
        "bench", path.stem, language=language, model="", worker_id="bench", options=options,
        vad=WebrtcVoiceDetector(2), clock=system_clock(),
    )  # fmt: skip
    jobs: list[DecodeJob] = []
    costs: list[float] = []

    def drain() -> None:
        while (job := stream.next_job()) is not None:
            started = time.perf_counter()
            decoded = whisper.transcribe(model, job)
            costs.append(time.perf_counter() - started)
            jobs.append(job)
            stream.complete(job, decoded)

    step = SAMPLE_RATE // 10
    for seq, offset in enumerate(range(0, len(audio), step)):
        payload = audio[offset : offset + step].astype("<i2").tobytes()
        chunk = AudioChunk(
            tenant="bench", session_id=path.stem, seq=seq, sent_at=0.0, sample_rate=SAMPLE_RATE, channels=1,
            encoding="pcm_s16le", payload=payload,
        )  # fmt: skip
        stream.receive(chunk, seq)
        drain()
    stream.receive(SessionControl(tenant="bench", session_id=path.stem, action="end"), "end")
    drain()
    return jobs, costs


def words(decoded) -> list[tuple[str, float, float]]:
    return [(w.word, w.start, w.end) for s in decoded.segments for w in s.words]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, help="devset-format folder (default: as bench/accuracy.py's)")
    parser.add_argument(
        "--files",
        help="comma list (default: dialog_doctor,mono_product_demo,meeting_long if the folder has them, else all)",
    )
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.data is None:
        from bench.common import default_data

        args.data = default_data(with_real=False)[0]
    if args.files is None:
        usual = "dialog_doctor,mono_product_demo,meeting_long"
        have = all((args.data / f"{name}.wav").exists() for name in usual.split(","))
        args.files = usual if have else ",".join(sorted(p.stem for p in args.data.glob("*.wav")))
    sizes = [int(s) for s in args.sizes.split(",")]
    config = TranscriberConfig(model=args.model)
    options = CommitOptions(
        beam_size=config.beam_size,
        interim_beam_size=config.interim_beam_size,
        final_window=config.resolved_final_window(),
    )
    model = whisper.load_model(args.model)
    language = language_for(args.model, None) or "en"
    jobs: list[DecodeJob] = []
    sequential: dict[str, list[float]] = defaultdict(list)
    for name in args.files.split(","):
        found, costs = live_jobs(model, args.data / f"{name}.wav", options, language)
        jobs += found
        for job, cost in zip(found, costs, strict=True):
            sequential[kind_of(job)].append(cost)
        print(f"{name}: {len(found)} jobs", flush=True)
    prompts = prompts_of(model)
    report: dict[str, dict] = {}
    for kind in sorted(sequential):
        groups: dict = defaultdict(list)
        for job in jobs:
            if kind_of(job) == kind:
                groups[prompts.job_key(job)].append(job)
        row: dict = {
            "jobs": len(sequential[kind]),
            "sequential_s_per_job": sum(sequential[kind]) / len(sequential[kind]),
        }
        alone: dict[int, list] = {}
        for size in sizes:
            seconds, items, redone, differ, calls = 0.0, 0, 0, 0, 0
            for group in groups.values():
                for i in range(0, len(group) - size + 1, size):  # full batches only: the cost of a batch of `size`
                    batch = group[i : i + size]
                    started = time.perf_counter()
                    out = decode_batch(model, batch)
                    seconds += time.perf_counter() - started
                    items, calls, redone = items + len(batch), calls + 1, redone + out.redone
                    for job, result in zip(batch, out.results, strict=True):
                        if size == 1:
                            alone[id(job)] = words(result)
                        elif id(job) in alone and alone[id(job)] != words(result):
                            differ += 1
            row[f"b{size}"] = {
                "calls": calls, "jobs": items, "s_per_job": seconds / items if items else None,
                "redone": redone, "differ_from_b1": differ,
            }  # fmt: skip
        report[kind] = row
    print(f"\n{args.model}: seconds of decode per job (2 cores, {config.compute_type})")
    print(f"{'kind':18s} {'jobs':>5s} {'sequential':>10s} " + " ".join(f"{'b' + str(s):>14s}" for s in sizes))
    for kind, row in report.items():
        cells = []
        for size in sizes:
            cell = row[f"b{size}"]
            cells.append(
                f"{cell['s_per_job']:.3f} ({cell['jobs']:>3d})" if cell["s_per_job"] is not None else f"{'-':>14s}"
            )
        print(
            f"{kind:18s} {row['jobs']:5d} {row['sequential_s_per_job']:10.3f} " + " ".join(f"{c:>14s}" for c in cells)
        )
    for kind, row in report.items():
        notes = ", ".join(
            f"b{s}: {row[f'b{s}']['redone']} redone, {row[f'b{s}']['differ_from_b1']} differ" for s in sizes
        )
        print(f"{kind}: {notes}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "kinds": report}, indent=2))
    return 0


def kind_of(job: DecodeJob) -> str:
    return "early final" if job.speculative else job.kind


if __name__ == "__main__":
    sys.exit(main())
