"""Speakers through the whole pipeline: DER and speaker-attributed WER, from the audio and from the bot.

    python bench/speakers.py [--data ../shared/devset] [--files dialog_doctor,meeting_long] --model tiny.en \
        [--speed 1.0] [--sources audio,bot] [--conditions room,noise,phone,opus,quiet,crosstalk [--seed 0]] \
        [--json OUT.json] [--speakers-audio on|off] [--speakers-backend auto|onnx|torch] [--nats-url URL] \
        [--database-url URL] [--external]

The real stack (LocalStack, transcriber with JETSCRIBE_SPEAKERS_AUDIO=on: needs the `speakers` extra) runs in a
temporary folder. Each file with two or more speakers in its turns (the devset's dialogs and meeting; without
../shared/devset, the generated two-voice dialog of bench/common.py) is streamed once per source:

- audio: the bot says nothing about speakers; the transcriber labels finals by voice (speaker_source "audio").
- bot: the bot sends the script's speaker changes (halfway through the pause before each turn, as
  jetscribe.evaluation.speakers.bot_turns does), the way a meeting platform's active-speaker events would.

DER: pyannote.metrics, collar 0.25 s, overlap counted; the hypothesis is each final word's span under its speaker
("DER"), or each final segment's span under its speaker ("DER seg": the pauses inside a final and the edges Whisper's
word timings leave out count as spoken, as in an RTTM made from the segments).
cpWER: each script speaker's words against the hypothesis speaker that pairs best (jetscribe.evaluation.speakers).
Final latency p50 as bench/accuracy.py measures it. --conditions runs the realistic set of bench/accuracy.py.
The voice embedding's CPU per second of audio is measured in this process at the end (one thread, as the worker),
on each backend (torch and onnx, same audio), and the transcriber's voice thread says what it did (CPU ahead and for
finals, how long finals waited for voices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, whatever is installed

from bench.common import (  # noqa: E402
    CHUNK_S,
    Item,
    Watchdog,
    add_data_arguments,
    add_server_arguments,
    fmt,
    git_commit,
    items_from_arguments,
    run_on_servers,
    segment_latencies,
    session_id,
    table,
    warm_up,
)
from jetscribe.client.bot import StreamResult, stream_audio  # noqa: E402
from jetscribe.evaluation.metrics import percentile  # noqa: E402
from jetscribe.evaluation.speakers import (  # noqa: E402
    bot_turns,
    cp_wer,
    diarization_errors,
    segment_spans,
    speaker_spans,
)
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402
from jetscribe.shared.natsauth import env_connect_options  # noqa: E402

TENANT = "bench"
SOURCES = ("audio", "bot")


class Turn:
    def __init__(self, d: dict):
        self.speaker, self.start_s, self.end_s, self.text = d["speaker"], d["start"], d["end"], d["text"]


def run_streaming(args, items: list[Item]) -> dict[tuple[str, str], tuple[StreamResult, float]]:
    env = {"JETSCRIBE_SPEAKERS_AUDIO": args.speakers_audio, "JETSCRIBE_SPEAKERS_BACKEND": args.speakers_backend}
    return run_on_servers(args, lambda url, local: stream_all(url, items, args, local), extra_env=env)


async def stream_all(url: str, items: list[Item], args, local) -> dict[tuple[str, str], tuple[StreamResult, float]]:
    import nats

    run = uuid.uuid4().hex[:6]
    nc = await nats.connect(url, **env_connect_options(url), connect_timeout=5)
    results = {}
    try:
        async with Watchdog(local) as watchdog:
            await warm_up(nc, watchdog, items[0], TENANT, "en", run)
            for item in items:
                for source in args.sources:
                    print(f"streaming {item.name} ({source}) ...", file=sys.stderr, flush=True)
                    turns = [Turn(t) for t in item.turns]
                    started = time.time()
                    result = await watchdog.run(
                        stream_audio(
                            nc,
                            item.audio,
                            tenant=TENANT,
                            session_id=session_id(f"{item.name}-{source}", run),
                            speed=args.speed,
                            chunk_s=CHUNK_S,
                            language="en",
                            speaker_turns=bot_turns(turns) if source == "bot" else None,
                        )
                    )
                    results[(item.name, source)] = (result, time.time() - started)
        results[("", "voices")] = await voice_stats(nc)
    finally:
        await nc.close()
    return results


async def voice_stats(nc) -> dict:
    """The transcriber's `speakers_audio` stats (micro-service `stats` endpoint): CPU ahead and for finals, windows
    dropped, how long finals waited for their voices after their text. {} when off or not answered."""
    try:
        reply = json.loads((await nc.request("$SRV.STATS.jetscribe-transcriber", b"", timeout=5)).data)
    except Exception as exc:
        print(f"no stats from the transcriber: {exc!r}", file=sys.stderr)
        return {}
    data = next((e.get("data") or {} for e in reply.get("endpoints", []) if e.get("name") == "stats"), {})
    return data.get("speakers_audio") or {}


def analyse(item: Item, source: str, result: StreamResult) -> dict:
    finals = [s for s in result.final_segments() if s.text]
    rows = [
        (s.start, s.end, s.speaker, [[w.word, w.start, w.end, w.probability, w.speaker] for w in s.words])
        for s in finals
    ]
    spans = speaker_spans(rows)
    labelled, _ = segment_latencies(result, item.audio.sample_rate)
    latencies = [s["latency"] for s in labelled]
    parts = diarization_errors(item.turns, spans)
    total = parts["total"] or 1.0
    return {
        "file": item.name,
        "condition": item.condition or "clean",
        "source": source,
        "der": parts["diarization error rate"],
        "der_segments": diarization_errors(item.turns, segment_spans(rows))["diarization error rate"],
        "confusion": parts["confusion"] / total,
        "missed": parts["missed detection"] / total,
        "false_alarm": parts["false alarm"] / total,
        "spans": [(round(a, 2), round(b, 2), w) for a, b, w in spans],
        "rows": rows,  # the finals (start, end, speaker, words): for other hypotheses than the two above
        "cpwer": cp_wer(item.turns, [(s.speaker, s.text) for s in finals]),
        "speakers": len({s.speaker for s in finals if s.speaker}),
        "script_speakers": len({t["speaker"] for t in item.turns}),
        "finals": len(finals),
        "sources_seen": sorted({s.speaker_source or "-" for s in finals}),
        "latency_p50": percentile(latencies, 50),
    }


def embedding_cost(items: list[Item], backend: str) -> dict:
    """CPU seconds per second of audio of the voice embeddings on `backend`, one thread, each turn of each file as
    one final, at the hop the transcriber runs with (JETSCRIBE_SPEAKERS_HOP_S)."""
    from jetscribe.services.transcriber.embedding import EmbedOptions, VoiceEmbedder
    from jetscribe.shared.config import TranscriberConfig

    hop_s = TranscriberConfig.from_env().speakers_hop_s
    embedder = VoiceEmbedder(EmbedOptions(hop_s=hop_s), backend=backend)
    audio_s = cpu = 0.0
    for item in items:
        rate = item.audio.sample_rate
        samples = item.audio.samples.astype("float32") / 32768.0
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        if rate != SAMPLE_RATE:
            samples = soxr.resample(samples, rate, SAMPLE_RATE)
        for t in item.turns:
            clip = samples[int(t["start"] * SAMPLE_RATE) : int(t["end"] * SAMPLE_RATE)]
            started = time.thread_time()
            embedder.pieces(clip, 0)
            cpu += time.thread_time() - started
            audio_s += len(clip) / SAMPLE_RATE
    return {"audio_s": round(audio_s, 1), "cpu_s": round(cpu, 2), "cpu_per_audio_s": round(cpu / max(audio_s, 1e-9), 3)}


def print_table(files: list[dict]) -> None:
    rows = [
        (
            f["file"],
            f["source"],
            fmt(f["der"], ".3f"),
            fmt(f["der_segments"], ".3f"),
            fmt(f["confusion"], ".3f"),
            fmt(f["missed"], ".3f"),
            fmt(f["false_alarm"], ".3f"),
            fmt(f["cpwer"], ".3f"),
            f"{f['speakers']}/{f['script_speakers']}",
            fmt(f["latency_p50"], ".2f"),
        )
        for f in files
    ]
    head = (
        "file",
        "source",
        "DER",
        "DER seg",
        "confusion",
        "missed",
        "false alarm",
        "cpWER",
        "speakers",
        "final p50 s",
    )
    print(table(head, rows))
    for source in sorted({f["source"] for f in files}):
        for condition in sorted({f["condition"] for f in files}):
            mine = [f for f in files if f["source"] == source and f["condition"] == condition]
            if mine:
                der = sum(f["der"] for f in mine) / len(mine)
                der_seg = sum(f["der_segments"] for f in mine) / len(mine)
                confusion = sum(f["confusion"] for f in mine) / len(mine)
                cp = sum(f["cpwer"] for f in mine) / len(mine)
                print(
                    f"{source:5s} {condition:10s} mean DER {der:.3f} (confusion {confusion:.3f}, by segments "
                    f"{der_seg:.3f})  "
                    f"mean cpWER {cp:.3f}  ({len(mine)} files)"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser)
    add_server_arguments(parser)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--speed", type=float, default=1.0, help="1.0 = real time, 0 = as fast as accepted")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma list of audio, bot")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--speakers-audio", default="on", choices=("on", "off"), help="off: the baseline (latency, bot source)"
    )
    parser.add_argument(
        "--speakers-backend", default="auto", choices=("auto", "onnx", "torch"), help="the transcriber's voice model"
    )
    args = parser.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    if bad := [s for s in args.sources if s not in SOURCES]:
        parser.error(f"--sources: unknown {', '.join(bad)} (audio, bot)")
    items, _ = items_from_arguments(args)
    items = [i for i in items if len({t["speaker"] for t in i.turns}) >= 2]
    if not items:
        parser.error("no file with two or more speakers in its turns")
    # The transcriber inherits this environment: JETSCRIBE_SPEAKERS_HOP_S=1.5 etc. measure another schedule.
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("JETSCRIBE_SPEAKERS_")}
    print("speakers settings: " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"), file=sys.stderr)
    results = run_streaming(args, items)
    voices = results.pop(("", "voices"), {})
    files = [analyse(item, source, results[(item.name, source)][0]) for item in items for source in args.sources]
    print_table(files)
    if voices:
        print("voice thread: " + ", ".join(f"{k} {v}" for k, v in voices.items()))
    clean = [i for i in items if i.condition in (None, "clean")] or items[:1]
    cost = {backend: embedding_cost(clean, backend) for backend in ("torch", "onnx")}
    for backend, c in cost.items():
        print(f"voice embeddings ({backend}): {c['cpu_per_audio_s']:.3f} CPU s per audio s ({c['audio_s']} s of audio)")
    if args.json:
        out = {
            "commit": git_commit(),
            "model": args.model,
            "speed": args.speed,
            "speakers_backend": args.speakers_backend,
            "settings": settings,
            "files": files,
            "embedding": cost,
            "voice_thread": voices,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
