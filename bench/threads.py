"""Worker processes x CTranslate2 threads on this host: which layout decodes the most audio per second?

    python bench/threads.py [--model tiny.en] [--layouts 1x2,2x1,1x1] [--repeats 6] [--json OUT]

A layout PxT is P worker processes with T threads each (`cpu_threads`, OMP/MKL/OpenBLAS), as `jetscribe up
--transcribers P` starts them. Every layout decodes the same fixed set of utterances (the sentences of the demo
sample, cut at their turns, `--repeats` times over) as finals: beam 5 on the window the transcriber uses for the
model (services/transcriber/model.py `transcribe`). The jobs are dealt round-robin to the processes, which load
their model, decode one warm-up job, and start together. It prints, per layout, the audio seconds decoded per wall
second (the host's capacity), per CPU second (what the threads cost, less sensitive to other work on the host) and
the seconds per call (what one session waits for a final).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from jetscribe.devstack.sizing import thread_env  # noqa: E402
from jetscribe.evaluation.speech import sample_speech  # noqa: E402
from jetscribe.services.transcriber import model as whisper  # noqa: E402
from jetscribe.services.transcriber.decoding import DecodeJob  # noqa: E402
from jetscribe.shared.config import TranscriberConfig  # noqa: E402

MARGIN_S = 0.2  # audio kept before and after each sentence, as an endpoint would leave it


def utterances() -> list[np.ndarray]:
    """The demo sample's sentences as float32 utterances (synthesised once, then cached)."""
    speech = sample_speech()
    rate = speech.sample_rate
    audio = speech.audio.astype(np.float32) / 32768.0
    return [audio[max(0, int((t.start_s - MARGIN_S) * rate)) : int((t.end_s + MARGIN_S) * rate)] for t in speech.turns]


def final_job(model_name: str, audio: np.ndarray) -> DecodeJob:
    config = TranscriberConfig(model=model_name)
    return DecodeJob(
        kind="final",
        audio=audio,
        start_sample=0,
        end_sample=len(audio),
        language="en",
        prompt="",
        beam_size=config.beam_size,
        window="short" if config.resolved_final_window() == "short" else "full",
    )


def child(args: argparse.Namespace) -> int:
    """One worker process: load, warm up, say ready, wait for the go line, decode its jobs, print the timings."""
    clips = utterances()
    jobs = [final_job(args.model, clips[i % len(clips)]) for i in map(int, args.jobs.split(",")) if args.jobs]
    model = whisper.load_model(args.model, "cpu", "int8", args.threads)
    whisper.transcribe(model, final_job(args.model, clips[0]))
    print("ready", flush=True)
    sys.stdin.readline()
    calls = []
    cpu_started = time.process_time()
    for job in jobs:
        started = time.perf_counter()
        whisper.transcribe(model, job)
        calls.append(time.perf_counter() - started)
    audio_s = sum(len(job.audio) for job in jobs) / 16000
    print(json.dumps({"calls": calls, "audio_s": audio_s, "cpu_s": time.process_time() - cpu_started}), flush=True)
    return 0


def run_layout(model: str, processes: int, threads: int, jobs: int) -> dict:
    """Start the processes, let them all load, then time them decoding the jobs together."""
    children = []
    for p in range(processes):
        mine = ",".join(str(j) for j in range(p, jobs, processes))
        env = {**os.environ, **thread_env(threads)}
        cmd = [sys.executable, __file__, "--child", "--model", model, "--threads", str(threads), "--jobs", mine]
        children.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for proc in children:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker of layout {processes}x{threads} failed to start (exit {proc.wait()})")
        started = time.perf_counter()
        for proc in children:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in children if proc.stdout is not None]
        wall = time.perf_counter() - started
    finally:
        for proc in children:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    calls = [c for r in results for c in r["calls"]]
    audio_s = sum(r["audio_s"] for r in results)
    cpu_s = sum(r["cpu_s"] for r in results)
    return {
        "layout": f"{processes}x{threads}",
        "processes": processes,
        "threads": threads,
        "calls": len(calls),
        "audio_s": round(audio_s, 2),
        "wall_s": round(wall, 2),
        "audio_s_per_wall_s": round(audio_s / wall, 2),
        "cpu_s": round(cpu_s, 2),
        "audio_s_per_cpu_s": round(audio_s / cpu_s, 2),
        "call_p50_s": round(statistics.median(calls), 3),
        "call_p95_s": round(float(np.percentile(calls, 95)), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en", help="base, tiny.en or a model folder (default tiny.en)")
    parser.add_argument("--layouts", default="1x2,2x1,1x1", help="processes x threads, comma separated")
    parser.add_argument("--repeats", type=int, default=6, help="times the set of utterances is decoded per layout")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    try:
        layouts = [tuple(int(n) for n in item.lower().split("x")) for item in args.layouts.split(",")]
        if any(len(layout) != 2 or min(layout) < 1 for layout in layouts):
            raise ValueError
    except ValueError:
        parser.error(f"--layouts {args.layouts!r}: use PxT items like 1x2,2x1 (processes x threads, each >= 1)")
    jobs = len(utterances()) * args.repeats
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]  # other work on the host takes cores from the layouts: say how busy it was
    print(f"{args.model}, {jobs} finals per layout, {cores} cores usable, load average {load:.2f}", file=sys.stderr)
    print(
        f"{'layout':>7} {'calls':>6} {'audio s':>8} {'wall s':>7} {'audio s/wall s':>15} {'CPU s':>6} "
        f"{'audio s/CPU s':>14} {'call p50':>9} {'p95':>7}"
    )
    rows = []
    for processes, threads in layouts:
        row = run_layout(args.model, processes, threads, jobs)
        rows.append(row)
        print(
            f"{row['layout']:>7} {row['calls']:>6} {row['audio_s']:>8.1f} {row['wall_s']:>7.1f} "
            f"{row['audio_s_per_wall_s']:>15.2f} {row['cpu_s']:>6.1f} {row['audio_s_per_cpu_s']:>14.2f} "
            f"{row['call_p50_s']:>9.3f} {row['call_p95_s']:>7.3f}",
            flush=True,
        )
    print(f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.json:
        result = {"model": args.model, "cores": cores, "load_before": load, "load_after": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps({**result, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
