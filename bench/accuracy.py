"""Streaming accuracy and latency of jetscribe, against offline faster-whisper on the same files.

    python bench/accuracy.py --data /work/shared/devset --model tiny.en --speed 1.0 --json OUT.json \
        [--files mono_standup,dialog_doctor] [--language auto] [--nats-url URL] [--database-url URL] [--external]

--data DIR holds <name>.wav and <name>.json ({"text": reference, "turns": [{speaker, start, end, text}]}).
The real stack (nats-server, PostgreSQL, ingest, transcriber with --model, persister; all child processes,
see jetscribe.stack.LocalStack) runs in a temporary folder; with --nats-url/--database-url (or NATS_URL /
DATABASE_URL) those servers are used instead; with --external nothing is started and the services already
serving --nats-url are measured. Each file is streamed through ingest as a bot would (jetscribe.bot), one
session after another, at --speed (1.0 = real time), and its final segments are collected from NATS. Then,
with the stack stopped, the same files are transcribed offline by faster-whisper in this process with the
same model, beam and VAD filter on, as the reference point. WER is on normalized text (jetscribe.wer).

Final latency of a segment = wall time its final reached this process minus the wall time the chunk holding
the end of its last word was sent. The headline numbers use that receive time (what a bot sees, NATS hop
included); each segment also keeps `latency_published`, from the worker's `published_at` (same machine clock).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, whatever is installed

from jetscribe.bot import Audio, StreamResult, read_audio, stream_audio  # noqa: E402
from jetscribe.metrics import corpus_wer, percentile, repeats_at_joins, send_time, words_in_silence  # noqa: E402
from jetscribe.wer import wer  # noqa: E402
from shared.config import TranscriberConfig  # noqa: E402

TENANT = "bench"
CHUNK_S = 0.1


@dataclass
class Item:
    name: str
    path: Path
    audio: Audio
    reference: str
    turns: list[dict]


def load_items(data: Path, files: str | None) -> list[Item]:
    names = sorted(p.stem for p in data.glob("*.wav") if p.with_suffix(".json").exists())
    if files:
        wanted = [f.strip() for f in files.split(",") if f.strip()]
        missing = [f for f in wanted if f not in names]
        if missing:
            sys.exit(f"not in {data} (as .wav + .json): {', '.join(missing)}")
        names = wanted
    if not names:
        sys.exit(f"no <name>.wav with <name>.json in {data}")
    items = []
    for name in names:
        meta = json.loads((data / f"{name}.json").read_text())
        items.append(Item(name, data / f"{name}.wav", read_audio(data / f"{name}.wav"), meta["text"],
                          meta.get("turns") or []))
    return items


# --- streaming: the real stack --------------------------------------------------------------------
def run_streaming(args, items: list[Item]) -> dict[str, tuple[StreamResult, float]]:
    for flag, var in ((args.nats_url, "NATS_URL"), (args.database_url, "DATABASE_URL")):
        if flag:
            os.environ[var] = flag  # LocalStack then uses that server instead of starting one
    if args.external:
        from jetscribe.stack import nats_url
        return asyncio.run(stream_all(nats_url(), items, args, None))
    from jetscribe.stack import LocalStack
    quiet = {"JETSCRIBE_LOG_LEVEL": os.environ.get("JETSCRIBE_LOG_LEVEL", "WARNING")}
    with tempfile.TemporaryDirectory(prefix="jetscribe-bench-") as home:
        print(f"starting the stack in {home} with model {args.model} ...", file=sys.stderr, flush=True)
        with LocalStack(Path(home), model=args.model, extra_env=quiet) as local:  # stopped on any exit
            return asyncio.run(stream_all(local.nats_url, items, args, local))


async def stream_all(url: str, items: list[Item], args, local) -> dict[str, tuple[StreamResult, float]]:
    import nats

    async def watch():  # a service that dies must fail the run, not leave it waiting
        while True:
            local.check()
            await asyncio.sleep(1.0)

    async def guarded(coro):
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # a service died, or Ctrl-C: let the bot unsubscribe before NATS closes
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return task.result() if task in done else watchdog.result()

    run = uuid.uuid4().hex[:6]
    nc = await nats.connect(url, connect_timeout=5)
    watchdog = asyncio.ensure_future(watch() if local else asyncio.Event().wait())
    try:
        # Not measured: the transcriber loads its model, and its first decodes are slow.
        first = items[0].audio
        warm = Audio(first.samples[:first.sample_rate * 3], first.sample_rate)
        print("warming up the transcriber ...", file=sys.stderr, flush=True)
        await guarded(stream_audio(nc, warm, tenant=TENANT, session_id=f"warmup-{run}", speed=0.0,
                                   language=args.language))
        results = {}
        for item in items:
            print(f"streaming {item.name} ({item.audio.duration_s:.1f} s at speed {args.speed}) ...",
                  file=sys.stderr, flush=True)
            started = time.time()
            result = await guarded(stream_audio(nc, item.audio, tenant=TENANT, session_id=session_id(item.name, run),
                                                speed=args.speed, chunk_s=CHUNK_S, language=args.language))
            results[item.name] = (result, time.time() - started)
        return results
    finally:
        watchdog.cancel()
        await nc.close()


def session_id(name: str, run: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:50]}-{run}"  # ids are 1-64 of [A-Za-z0-9_-]


# --- offline: the same model in this process ------------------------------------------------------
def offline_language(args) -> str | None:
    language = None if args.language == "auto" else args.language
    return "en" if args.model.endswith(".en") else language  # as the transcriber decides


def run_offline(args, cfg: TranscriberConfig, items: list[Item]) -> dict[str, tuple[str, float]]:
    from services.transcriber.model import load_model
    print(f"transcribing offline with {args.model} ...", file=sys.stderr, flush=True)
    model = load_model(args.model, device=cfg.device, compute_type=cfg.compute_type, cpu_threads=cfg.cpu_threads)
    out = {}
    for item in items:
        started = time.perf_counter()
        segments, _ = model.transcribe(str(item.path), beam_size=cfg.beam_size, vad_filter=True,
                                       language=offline_language(args))
        text = " ".join(s.text.strip() for s in segments)  # the generator decodes as it is consumed
        out[item.name] = (text, time.perf_counter() - started)
    return out


# --- report ----------------------------------------------------------------------------------------
def analyse(item: Item, result: StreamResult, wall_s: float, offline_text: str, offline_s: float) -> dict:
    rate, per_chunk = item.audio.sample_rate, result.frames_per_chunk
    final_at, first_interim = {}, {}
    for received, seg in result.heard:
        if seg.status == "final":
            final_at.setdefault(seg.segment_id, received)
        elif seg.words:
            first_interim.setdefault(seg.segment_id, (received, seg))
    finals = [s for s in result.final_segments() if s.words]
    segments = []
    for seg in finals:
        sent = send_time(seg.words[-1].end, result.sent_by_seq, rate, per_chunk)
        segments.append({"id": seg.segment_id, "start": seg.start, "end": seg.end, "text": seg.text,
                         "latency": round(final_at[seg.segment_id] - sent, 3),
                         "latency_published": round(seg.published_at - sent, 3)})
    interim_latencies = [round(received - send_time(seg.words[0].end, result.sent_by_seq, rate, per_chunk), 3)
                         for received, seg in first_interim.values()]
    latencies = [s["latency"] for s in segments]
    words = [(w.word, w.start, w.end) for seg in finals for w in seg.words]
    silence = words_in_silence(words, item.turns) if item.turns else None
    repeats = repeats_at_joins([s.text for s in finals], item.reference)
    return {
        "name": item.name, "duration_s": round(item.audio.duration_s, 3),
        "wer_streaming": wer(item.reference, result.text), "wer_offline": wer(item.reference, offline_text),
        "text_streaming": result.text, "text_offline": offline_text, "reference": item.reference,
        "latencies": latencies, "latency_final_p50": percentile(latencies, 50),
        "latency_final_p95": percentile(latencies, 95), "latency_final_max": max(latencies, default=None),
        "latencies_first_interim": interim_latencies,
        "latency_first_interim_p50": percentile(interim_latencies, 50),
        "repeated_words": sum(r["n"] for r in repeats), "repeated": repeats,
        "words_in_silence": None if silence is None else len(silence), "silence_words": silence,
        "segments": segments, "models": sorted({s.model for _, s in result.heard}),
        "stream_wall_s": round(wall_s, 3), "offline_compute_s": round(offline_s, 3),
    }


def summarise(files: list[dict], items: list[Item]) -> dict:
    refs = [i.reference for i in items]
    ws = corpus_wer(refs, [f["text_streaming"] for f in files])
    wo = corpus_wer(refs, [f["text_offline"] for f in files])
    latencies = [x for f in files for x in f["latencies"]]
    interims = [x for f in files for x in f["latencies_first_interim"]]
    published = [s["latency_published"] for f in files for s in f["segments"]]
    silence = [f["words_in_silence"] for f in files if f["words_in_silence"] is not None]
    return {
        "wer_streaming": ws, "wer_offline": wo,
        "wer_ratio": ws / wo if wo > 0 else (1.0 if ws == 0 else None),  # None: offline perfect, streaming not
        "latency_final_p50": percentile(latencies, 50), "latency_final_p95": percentile(latencies, 95),
        "latency_final_max": max(latencies, default=None),
        "latency_first_interim_p50": percentile(interims, 50),
        "latency_final_published_p50": percentile(published, 50),
        "latency_final_published_p95": percentile(published, 95),
        "repeated_words": sum(f["repeated_words"] for f in files),
        "words_in_silence": sum(silence) if silence else None,
        "audio_s": round(sum(f["duration_s"] for f in files), 3),
        "offline_compute_s": round(sum(f["offline_compute_s"] for f in files), 3),
    }


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(files: list[dict], overall: dict) -> None:
    head = ("file", "audio s", "WER stream", "WER offline", "final p50", "p95", "max", "1st interim p50",
            "repeats", "in silence")
    rows = [(f["name"], fmt(f["duration_s"], ".1f"), fmt(f["wer_streaming"], ".3f"), fmt(f["wer_offline"], ".3f"),
             fmt(f["latency_final_p50"], ".2f"), fmt(f["latency_final_p95"], ".2f"),
             fmt(f["latency_final_max"], ".2f"), fmt(f["latency_first_interim_p50"], ".2f"),
             str(f["repeated_words"]), fmt(f["words_in_silence"], "d")) for f in files]
    o = overall
    rows.append(("OVERALL", fmt(o["audio_s"], ".1f"), fmt(o["wer_streaming"], ".3f"), fmt(o["wer_offline"], ".3f"),
                 fmt(o["latency_final_p50"], ".2f"), fmt(o["latency_final_p95"], ".2f"),
                 fmt(o["latency_final_max"], ".2f"), fmt(o["latency_first_interim_p50"], ".2f"),
                 str(o["repeated_words"]), fmt(o["words_in_silence"], "d")))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    print("\n".join([line(head), rule, *map(line, rows[:-1]), rule, line(rows[-1])]))
    print(f"wer_ratio (streaming / offline) = {fmt(o['wer_ratio'], '.3f')}; latencies in seconds, final "
          f"received by the bot minus its last word's audio sent; offline compute {o['offline_compute_s']:.1f} s")


def interrupted(signum, frame):
    raise KeyboardInterrupt  # like Ctrl-C: unwinds through LocalStack, which stops every child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of <name>.wav + <name>.json")
    parser.add_argument("--model", required=True, help="base, tiny.en or a CTranslate2 Whisper model folder")
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time (latency targets are for 1)")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--files", help="comma list of names to run (default: all in --data)")
    parser.add_argument("--language", default="auto", help="session language, also given to the offline run")
    parser.add_argument("--nats-url", help="use this NATS server (default $NATS_URL, else start one)")
    parser.add_argument("--database-url", help="use this PostgreSQL (default $DATABASE_URL, else start one)")
    parser.add_argument("--external", action="store_true",
                        help="start nothing: measure the services already running against --nats-url")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    cfg = TranscriberConfig.from_env()  # what the transcriber child reads too: same beam, same endpointing
    items = load_items(args.data, args.files)
    streamed = run_streaming(args, items)
    offline = run_offline(args, cfg, items)
    files = [analyse(i, *streamed[i.name], *offline[i.name]) for i in items]
    overall = summarise(files, items)
    served = sorted({m for f in files for m in f["models"]})
    if served != [args.model]:
        print(f"warning: the transcriber served {served}, the offline run used {args.model!r}", file=sys.stderr)
    config = {
        "model": args.model, "served_models": served, "speed": args.speed, "language": args.language,
        "chunk_s": CHUNK_S, "beam_size": cfg.beam_size, "interim_beam_size": cfg.interim_beam_size,
        "endpoint_silence_s": cfg.endpoint_silence_s, "max_utterance_s": cfg.max_utterance_s,
        "interim_every_s": cfg.interim_every_s, "vad_aggressiveness": cfg.vad_aggressiveness,
        "device": cfg.device, "compute_type": cfg.compute_type, "cpu_threads": cfg.cpu_threads,
        "offline": {"beam_size": cfg.beam_size, "vad_filter": True, "language": offline_language(args)},
        "latency_clock": "receive time in the bench process (latency_published: worker published_at)",
        "external": args.external, "data": str(args.data.resolve()), "files": [i.name for i in items],
        "git_commit": git_commit(), "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print_table(files, overall)
    Path(args.json).write_text(json.dumps({**overall, "files": files, "config": config}, indent=2) + "\n")
    print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the stack is stopped, nothing written", file=sys.stderr)
        sys.exit(130)
