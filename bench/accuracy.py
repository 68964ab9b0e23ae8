"""Streaming accuracy and latency of jetscribe, against offline faster-whisper on the same files.

    python bench/accuracy.py [--data DIR] --model tiny.en --speed 1.0 --json OUT.json \
        [--files mono_standup,dialog_doctor] [--language auto] [--nats-url URL] [--database-url URL] [--external] \
        [--conditions clean,room,noise,phone,opus,quiet,crosstalk [--seed 0] [--every]]

--data DIR holds <name>.wav and <name>.json ({"text": reference, "turns": [{speaker, start, end, text}]}); repeat
it for more folders. Default: $JETSCRIBE_DEVSET if set, else ../shared/devset beside the clone if it is there (the
team's devset, not in the repository), else a small set synthesised once with the project's Piper speech
(jetscribe.evaluation.speech) in $JETSCRIBE_CACHE/bench-devset; with --conditions the real recordings in
bench/data/real are added to the default.

--conditions runs the realistic set (bench/make_realistic.py, conditions in jetscribe/evaluation/conditions.py):
each file is put in two of the listed conditions (rotating so that each condition meets each kind of speech as far
as the files allow; --every: every file in every condition), made harder with --seed and cached. Streaming and offline
then run on the same degraded audio, and a table per condition follows the table per file; the JSON gains
`conditions` ({condition: the overall keys for its files}) and each file its `condition` and `source`.

The real stack (nats-server, PostgreSQL, ingest, transcriber with --model, persister; all child processes,
see jetscribe.stack.LocalStack) runs in a temporary folder; with --nats-url/--database-url (or NATS_URL /
DATABASE_URL) those servers are used instead; with --external nothing is started and the services already
serving --nats-url are measured. Each file is streamed through ingest as a bot would (jetscribe.client.bot), one
session after another, at --speed (1.0 = real time), and its final segments are collected from NATS. Then,
with the stack stopped, the same files are transcribed offline by faster-whisper in this process with the
same model, beam and VAD filter on, as the reference point. WER is on normalized text (jetscribe.evaluation.wer).

Words dropped by the transcriber's guards (each final's `dropped`, with its reason: loop, silence, trailing)
are reported per file, per condition and overall, with how many of them were LOST reference words
(jetscribe.evaluation.metrics.dropped_losses: the reference turns within 0.5 s of the word have it more often
than the streamed words there; needs turn times), and the finals that came out empty over speech (the session's
`ended` event).

Final latency of a segment = wall time its final reached this process minus the wall time the chunk holding
the end of its last word was sent. The headline numbers use that receive time (what a bot sees, NATS hop
included); each segment also keeps `latency_published`, from the worker's `published_at` (same machine clock).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from bench.common import (  # noqa: E402
    CHUNK_S,
    Item,
    Watchdog,
    add_data_arguments,
    add_server_arguments,
    fmt,
    git_commit,
    interrupted,
    items_from_arguments,
    run_on_servers,
    segment_latencies,
    session_id,
    table,
    transcriber_settings,
    warm_up,
)
from jetscribe.client.bot import StreamResult, stream_audio  # noqa: E402
from jetscribe.evaluation.metrics import (  # noqa: E402
    corpus_wer,
    dropped_losses,
    percentile,
    repeated_passages,
    repeats_at_joins,
    words_in_silence,
)
from jetscribe.evaluation.wer import wer  # noqa: E402
from jetscribe.shared.config import TranscriberConfig  # noqa: E402
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import language_for  # noqa: E402

TENANT = "bench"


# --- streaming: the real stack --------------------------------------------------------------------
def run_streaming(args, items: list[Item]) -> dict[str, tuple[StreamResult, float]]:
    return run_on_servers(args, lambda url, local: stream_all(url, items, args, local))


async def stream_all(url: str, items: list[Item], args, local) -> dict[str, tuple[StreamResult, float]]:
    import nats

    run = uuid.uuid4().hex[:6]
    nc = await nats.connect(url, **env_connect_options(url), connect_timeout=5)
    try:
        async with Watchdog(local) as watchdog:
            await warm_up(nc, watchdog, items[0], TENANT, args.language, run)
            results = {}
            for item in items:
                print(
                    f"streaming {item.name} ({item.audio.duration_s:.1f} s at speed {args.speed}) ...",
                    file=sys.stderr,
                    flush=True,
                )
                started = time.time()
                result = await watchdog.run(
                    stream_audio(
                        nc,
                        item.audio,
                        tenant=TENANT,
                        session_id=session_id(item.name, run),
                        speed=args.speed,
                        chunk_s=CHUNK_S,
                        language=args.language,
                    )
                )
                results[item.name] = (result, time.time() - started)
            return results
    finally:
        await nc.close()


# --- offline: the same model in this process ------------------------------------------------------
def offline_language(args) -> str | None:
    return language_for(args.model, args.language)  # as the transcriber decides


def run_offline(args, cfg: TranscriberConfig, items: list[Item]) -> dict[str, tuple[str, float]]:
    from jetscribe.services.transcriber.model import load_model

    print(f"transcribing offline with {args.model} ...", file=sys.stderr, flush=True)
    model = load_model(args.model, device=cfg.device, compute_type=cfg.compute_type, cpu_threads=cfg.cpu_threads)
    out = {}
    for item in items:
        started = time.perf_counter()
        segments, _ = model.transcribe(
            str(item.path), beam_size=cfg.beam_size, vad_filter=True, language=offline_language(args)
        )
        text = " ".join(s.text.strip() for s in segments)  # the generator decodes as it is consumed
        out[item.name] = (text, time.perf_counter() - started)
    return out


# --- report ----------------------------------------------------------------------------------------
def analyse(item: Item, result: StreamResult, wall_s: float, offline_text: str, offline_s: float) -> dict:
    segments, interim_latencies = segment_latencies(result, item.audio.sample_rate)
    finals = [s for s in result.final_segments() if s.words]
    latencies = [s["latency"] for s in segments]
    words = [(w.word, w.start, w.end) for seg in finals for w in seg.words]
    silence = words_in_silence(words, item.turns) if item.turns else None
    repeats = repeats_at_joins([s.text for s in finals], item.reference)
    repeats += [
        {"passage": p["words"], "n": len(p["words"].split())} for p in repeated_passages(result.text, item.reference)
    ]
    dropped = [d for seg in result.final_segments() for d in seg.dropped]  # empty finals carry some too
    lost = dropped_losses([(d.word, d.start, d.end) for d in dropped], words, item.turns) if item.turns else None
    lost_at = {(d["start"], d["word"]) for d in lost or []}
    return {
        "name": item.name,
        **({"condition": item.condition, "source": item.source} if item.condition else {}),
        "duration_s": round(item.audio.duration_s, 3),
        "wer_streaming": wer(item.reference, result.text),
        "wer_offline": wer(item.reference, offline_text),
        "text_streaming": result.text,
        "text_offline": offline_text,
        "reference": item.reference,
        "latencies": latencies,
        "latency_final_p50": percentile(latencies, 50),
        "latency_final_p95": percentile(latencies, 95),
        "latency_final_max": max(latencies, default=None),
        "latencies_first_interim": interim_latencies,
        "latency_first_interim_p50": percentile(interim_latencies, 50),
        "repeated_words": sum(r["n"] for r in repeats),
        "repeated": repeats,
        "words_in_silence": None if silence is None else len(silence),
        "silence_words": silence,
        "words_dropped": len(dropped),
        "dropped_by_reason": dict(Counter(d.reason for d in dropped)),
        "dropped_lost": None if lost is None else len(lost),
        "dropped": [
            {
                "word": d.word.strip(),
                "start": d.start,
                "end": d.end,
                "reason": d.reason,
                **({} if lost is None else {"lost": (d.start, d.word.strip()) in lost_at}),
            }
            for d in dropped
        ],
        "empty_finals": result.ended.empty_finals if result.ended else None,
        "segments": segments,
        "models": sorted({s.model for _, s in result.heard}),
        "stream_wall_s": round(wall_s, 3),
        "offline_compute_s": round(offline_s, 3),
    }


def summarise(files: list[dict], items: list[Item]) -> dict:
    refs = [i.reference for i in items]
    ws = corpus_wer(refs, [f["text_streaming"] for f in files])
    wo = corpus_wer(refs, [f["text_offline"] for f in files])
    latencies = [x for f in files for x in f["latencies"]]
    interims = [x for f in files for x in f["latencies_first_interim"]]
    published = [s["latency_published"] for f in files for s in f["segments"]]
    silence = [f["words_in_silence"] for f in files if f["words_in_silence"] is not None]
    lost = [f["dropped_lost"] for f in files if f["dropped_lost"] is not None]
    empty = [f["empty_finals"] for f in files if f["empty_finals"] is not None]
    reasons: Counter[str] = Counter()
    for f in files:
        reasons.update(f["dropped_by_reason"])
    return {
        "wer_streaming": ws,
        "wer_offline": wo,
        "wer_ratio": ws / wo if wo > 0 else (1.0 if ws == 0 else None),  # None: offline perfect, streaming not
        "latency_final_p50": percentile(latencies, 50),
        "latency_final_p95": percentile(latencies, 95),
        "latency_final_max": max(latencies, default=None),
        "latency_first_interim_p50": percentile(interims, 50),
        "latency_final_published_p50": percentile(published, 50),
        "latency_final_published_p95": percentile(published, 95),
        "repeated_words": sum(f["repeated_words"] for f in files),
        "words_in_silence": sum(silence) if silence else None,
        "words_dropped": sum(f["words_dropped"] for f in files),
        "dropped_by_reason": dict(reasons),
        "dropped_lost": sum(lost) if lost else None,
        "empty_finals": sum(empty) if empty else None,
        "audio_s": round(sum(f["duration_s"] for f in files), 3),
        "offline_compute_s": round(sum(f["offline_compute_s"] for f in files), 3),
    }


def print_table(files: list[dict], overall: dict) -> None:
    head = (
        "file",
        "audio s",
        "WER stream",
        "WER offline",
        "final p50",
        "p95",
        "max",
        "1st interim p50",
        "repeats",
        "in silence",
        "dropped",
        "lost",
        "empty",
    )

    def row(name: str, d: dict, audio_s: float) -> tuple[str, ...]:
        return (
            name,
            fmt(audio_s, ".1f"),
            fmt(d["wer_streaming"], ".3f"),
            fmt(d["wer_offline"], ".3f"),
            fmt(d["latency_final_p50"], ".2f"),
            fmt(d["latency_final_p95"], ".2f"),
            fmt(d["latency_final_max"], ".2f"),
            fmt(d["latency_first_interim_p50"], ".2f"),
            str(d["repeated_words"]),
            fmt(d["words_in_silence"], "d"),
            str(d["words_dropped"]),
            fmt(d["dropped_lost"], "d"),
            fmt(d["empty_finals"], "d"),
        )

    rows = [row(f["name"], f, f["duration_s"]) for f in files]
    print(table(head, rows, row("OVERALL", overall, overall["audio_s"])))
    print(
        f"wer_ratio (streaming / offline) = {fmt(overall['wer_ratio'], '.3f')}; latencies in seconds, final "
        f"received by the bot minus its last word's audio sent; offline compute {overall['offline_compute_s']:.1f} s"
    )
    print(
        "dropped: words the guards removed from finals; lost: those the reference had there (a loss, not an "
        "invention); empty: finals that came out empty over speech"
    )


def by_condition(files: list[dict], items: list[Item], conditions: list[str]) -> dict[str, dict]:
    """{condition: summarise() of its files}, in the order of `conditions`."""
    out = {}
    for condition in conditions:
        picked = [(f, i) for f, i in zip(files, items, strict=False) if i.condition == condition]
        if picked:
            out[condition] = {
                **summarise([f for f, _ in picked], [i for _, i in picked]),
                "files": [f["name"] for f, _ in picked],
            }
    return out


def print_condition_table(per_condition: dict[str, dict], overall: dict) -> None:
    head = (
        "condition",
        "files",
        "audio s",
        "WER stream",
        "WER offline",
        "wer_ratio",
        "final p50",
        "p95",
        "in silence",
        "repeats",
        "dropped",
        "lost",
        "empty",
    )

    def row(name, o, n):
        return (
            name,
            str(n),
            fmt(o["audio_s"], ".1f"),
            fmt(o["wer_streaming"], ".3f"),
            fmt(o["wer_offline"], ".3f"),
            fmt(o["wer_ratio"], ".3f"),
            fmt(o["latency_final_p50"], ".2f"),
            fmt(o["latency_final_p95"], ".2f"),
            fmt(o["words_in_silence"], "d"),
            str(o["repeated_words"]),
            str(o["words_dropped"]),
            fmt(o["dropped_lost"], "d"),
            fmt(o["empty_finals"], "d"),
        )

    rows = [row(c, o, len(o["files"])) for c, o in per_condition.items()]
    print("\n" + table(head, rows, row("OVERALL", overall, sum(len(o["files"]) for o in per_condition.values()))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--model", required=True, help="base, tiny.en or a CTranslate2 Whisper model folder")
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time (latency targets are for 1)")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--language", default="auto", help="session language, also given to the offline run")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    cfg = TranscriberConfig.from_env()  # what the transcriber child reads too: same beam, same endpointing
    items, conditions = items_from_arguments(args)
    streamed = run_streaming(args, items)
    offline = run_offline(args, cfg, items)
    files = [analyse(i, *streamed[i.name], *offline[i.name]) for i in items]
    overall = summarise(files, items)
    per_condition = by_condition(files, items, conditions) if conditions else None
    served = sorted({m for f in files for m in f["models"]})
    if served != [args.model]:
        print(f"warning: the transcriber served {served}, the offline run used {args.model!r}", file=sys.stderr)
    config = {
        "model": args.model,
        "served_models": served,
        "speed": args.speed,
        "language": args.language,
        "chunk_s": CHUNK_S,
        **transcriber_settings(cfg),
        "offline": {"beam_size": cfg.beam_size, "vad_filter": True, "language": offline_language(args)},
        "latency_clock": "receive time in the bench process (latency_published: worker published_at)",
        "external": args.external,
        "data": ",".join(str(d.resolve()) for d in args.data),
        "files": [i.name for i in items],
        **({"conditions": conditions, "seed": args.seed, "every": args.every} if conditions else {}),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print_table(files, overall)
    if per_condition:
        print_condition_table(per_condition, overall)
    extra = {"conditions": per_condition} if per_condition else {}
    Path(args.json).write_text(json.dumps({**overall, **extra, "files": files, "config": config}, indent=2) + "\n")
    print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the stack is stopped, nothing written", file=sys.stderr)
        sys.exit(130)
