"""Many bots at once: how many live sessions a host sustains, and at what latency and accuracy.

    python bench/load.py --model tiny.en --sessions 1,4,8,16,24,32 --json OUT.json \
        [--variants batched:JETSCRIBE_MAX_BATCH=8,unbatched:JETSCRIBE_MAX_BATCH=1] [--transcribers N] \
        [--stagger 0.7] [--duration 60] [--speed 1] [--p95-bound 2.5] [--alone-from OLD.json] [--quick] \
        [--data DIR] [--files a,b] [--conditions clean,noise,...] [--nats-url URL] [--database-url URL]

For each variant (a name and environment variables for the services; default one variant, `default`, with none) a
fresh local stack starts (jetscribe.devstack.LocalStack: nats-server, PostgreSQL, ingest, --transcribers
transcribers, persister; with --nats-url/--database-url or NATS_URL/DATABASE_URL those servers are used). First
every file the sweep uses is streamed ALONE once, at --speed, as the accuracy reference under no load (kept in the
JSON under `alone`; --alone-from reuses a previous run's entries for the same model, variant environment, speed and
file). Then for each N of --sessions, N bots stream concurrently, the i-th starting i x --stagger seconds after the
first with file i (round robin). A bot whose file ends goes on at once with the next in turn (i + N, i + 2N, ...) as
a new session, until all N have streamed together for --duration seconds, so the load holds steady whatever the
files' lengths; every session id is unique. The step ends when every session's `ended` has arrived and the persister
has caught up.

Measured per step (one row of the curve): final latency p50/p95/p99 over every final of every session (received by
the bot minus the send time of the chunk holding its last word's end, as bench/accuracy.py), first-interim latency,
WER per session and overall, and its difference from the same files streamed alone; from each worker's WorkerStats
(every second on `jetscribe.stats.transcriber.*`) its backlog (audio received and not yet covered by a final: max
and p95), the part of it in ended utterances still waiting for their final, and its decode totals (by kind, busy
share, mean batch size); CPU % (100 = one core) and peak RSS per service, sampled every second from the child
processes; messages/s per hop (chunks the gateway accepted, AUDIO and TRANSCRIPTS appends, rows in PostgreSQL).

Real time is sustained at N when (1) every session ran to its end (none refused, rejected or timed out), (2) the
gateway accepted every chunk within --max-send-lag seconds of its real-time schedule, and (3) decoding kept up: the
audio waiting for finals, summed over the workers, did not grow while all N sessions were streaming: its
Theil-Sen slope (the median slope between two samples, so a moment's spike is no trend) is at most --max-growth
audio seconds per second per session. Waiting audio, unlike the backlog, holds no speech still going on: near 0
while the workers keep up, it grows by (1 - capacity / load) seconds per second per session when they do not, so
0.1 means "within 10 % of keeping up". A window shorter than --min-window seconds shows no trend: (3) is then
unknown, and the step says '?'. The knee is the largest N whose final p95 is within --p95-bound and whose real time
was sustained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

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
    local_stack,
    segment_latencies,
    session_id,
    table,
    transcriber_settings,
    use_servers,
    warm_up,
)
from jetscribe.client.bot import Audio, BotError, StreamResult, stream_audio  # noqa: E402
from jetscribe.evaluation.metrics import corpus_wer, percentile  # noqa: E402
from jetscribe.evaluation.wer import wer  # noqa: E402
from jetscribe.services.transcriber.stats import STATS_EVERY_S  # noqa: E402
from jetscribe.shared import subjects  # noqa: E402
from jetscribe.shared.config import PostgresClient, TranscriberConfig  # noqa: E402
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import WorkerStats, decode  # noqa: E402

TENANT = "load"
LOAD_GENERATOR = "load generator"
QUICK_SESSIONS = "1,2"
QUICK_FILES = 2
QUICK_SECONDS = 20.0
DURATION_S = 60.0
SETTLE_TIMEOUT_S = 120.0  # the persister must catch up within this after a step


# --- options -----------------------------------------------------------------------------------------
@dataclass
class Variant:
    """A named set of environment variables for the services; each variant runs on a fresh stack."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


def parse_sessions(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (sorted, each once); ValueError with a one-line reason otherwise."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--sessions {text!r}: expected a comma list of whole numbers, e.g. 1,4,8") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--sessions {text!r}: session counts must be 1 or more")
    return counts


_VARIANT_HEAD = re.compile(r"([A-Za-z0-9_-]{1,20}):(.*)")
_ENV_ITEM = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)")


def parse_variants(text: str | None) -> list[Variant]:
    """'batched:JETSCRIBE_MAX_BATCH=8,unbatched:JETSCRIBE_MAX_BATCH=1' -> two variants. After a comma, `name:`
    starts a variant, `VAR=value` adds a variable to the current one, and anything else continues the last value
    (so 'p:JETSCRIBE_WORKER_PARTITIONS=0,1,2' keeps its list). None or '' -> one variant, `default`, with no env."""
    if not text:
        return [Variant("default")]
    variants: list[Variant] = []
    last_var = None
    for part in text.split(","):
        head = _VARIANT_HEAD.fullmatch(part)
        if head:
            name, part = head.groups()
            if any(v.name == name for v in variants):
                raise ValueError(f"--variants: {name!r} is named twice")
            variants.append(Variant(name))
            last_var = None
            if not part:
                continue
        if not variants:
            raise ValueError(f"--variants {text!r}: begin with a name, as in batched:JETSCRIBE_MAX_BATCH=8")
        item = _ENV_ITEM.fullmatch(part)
        if item:
            last_var = item.group(1)
            variants[-1].env[last_var] = item.group(2)
        elif last_var is not None:
            variants[-1].env[last_var] += "," + part
        else:
            raise ValueError(f"--variants: {part!r} is neither name:VAR=value nor VAR=value")
    return variants


@dataclass(frozen=True)
class Planned:
    """One session of a step: bot `bot`'s `turn`-th, streaming `item` from wall time `start_at`."""

    bot: int
    turn: int
    item: Item
    start_at: float


def plan_sessions(
    items: list[Item], n: int, first: float, stagger: float, speed: float, duration: float
) -> list[Planned]:
    """N bots, bot i starting at `first` + i x `stagger` with file i (round robin). With `duration`, each bot goes on
    with the next file in turn (i + N, i + 2N, ...) as a new session when its audio ends, as long as that is before
    all N have streamed together for `duration` seconds; 0: one file per bot."""
    until = first + (n - 1) * stagger + duration
    planned = []
    for bot in range(n):
        at, turn = first + bot * stagger, 0
        while True:
            item = items[(bot + turn * n) % len(items)]
            planned.append(Planned(bot, turn, item, at))
            at, turn = at + item.audio.duration_s / speed, turn + 1
            if duration <= 0 or at >= until:
                break
    return planned


def clip(item: Item, seconds: float) -> Item:
    """`item` cut after the last turn that ends within `seconds` (--quick), its reference that turn's text on;
    unchanged without turn times, or if it is short already."""
    kept = [t for t in item.turns if t["end"] <= seconds]
    if not kept or len(kept) == len(item.turns):
        return item
    end = min(len(item.audio.samples), int((kept[-1]["end"] + 0.5) * item.audio.sample_rate))
    audio = Audio(item.audio.samples[:end], item.audio.sample_rate)
    return replace(item, audio=audio, reference=" ".join(t["text"] for t in kept), turns=kept)


# --- the measures (pure) -------------------------------------------------------------------------------
def send_lags(result: StreamResult, speed: float) -> list[float]:
    """How far behind its real-time schedule the gateway accepted each chunk (seconds; the first chunk's send
    sets the schedule, as the bot paces from it). Empty at speed 0 (no schedule)."""
    if speed <= 0 or not result.sent_by_seq:
        return []
    first = min(result.sent_by_seq)
    t0 = result.sent_by_seq[first]
    accepted = zip(result.sent_by_seq, result.sent_at, strict=False)  # both in the order chunks were accepted
    return [round(at - (t0 + (seq - first) * CHUNK_S / speed), 3) for seq, at in accepted]


def slope(points: list[tuple[float, float]]) -> float | None:
    """The Theil-Sen slope of (x, y) points: the median of the slopes between every two of them. Unlike least
    squares, a few spikes (an utterance waiting a moment for its final) do not make a trend. None for fewer than 3
    points or no spread in x."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    i, j = np.triu_indices(len(points), k=1)
    apart = x[j] != x[i]
    if len(points) < 3 or not apart.any():
        return None
    return float(np.median((y[j] - y[i])[apart] / (x[j] - x[i])[apart]))


def waiting_growth(samples: list[WorkerStats], window: tuple[float, float] | None, min_window_s: float) -> float | None:
    """Audio seconds per second by which the audio waiting for finals (`WorkerStats.finals_waiting_s`, summed over
    the workers) grew within `window` (wall times): the sum of each worker's `slope`. None when the
    window is shorter than `min_window_s`, or has too few samples."""
    if window is None or window[1] - window[0] < min_window_s:
        return None
    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if window[0] <= s.at <= window[1]:
            by_worker[s.worker_id].append((s.at, s.finals_waiting_s))
    slopes = [slope(points) for points in by_worker.values()]
    if not slopes or any(s is None for s in slopes):
        return None
    return sum(s for s in slopes if s is not None)


@dataclass(frozen=True)
class Rule:
    """When real time counts as sustained (the module docstring states it)."""

    max_send_lag_s: float = 1.0
    max_growth: float = 0.1  # audio seconds per second per session
    min_window_s: float = 10.0
    p95_bound_s: float = 2.5


def sustained(
    bots: int, sessions: int, failed: int, max_send_lag: float | None, growth: float | None, rule: Rule
) -> tuple[bool | None, list[str]]:
    """Whether `bots` concurrent bots ran in real time (True, False, or None: unknown), and the reasons it is not
    True; `failed` of their `sessions` did not run to their end."""
    reasons = []
    if failed:
        reasons.append(f"{failed} of {sessions} sessions did not run to their end")
    if max_send_lag is not None and max_send_lag > rule.max_send_lag_s:
        reasons.append(f"a chunk was accepted {max_send_lag:.2f} s behind its schedule (> {rule.max_send_lag_s:g})")
    if growth is not None and growth > rule.max_growth * bots:
        reasons.append(
            f"the audio waiting for finals grew {growth:.2f} s/s (> {rule.max_growth:g} per session x {bots}): "
            "decoding fell behind"
        )
    if reasons:
        return False, reasons
    if growth is None:
        return None, [f"growth unknown: fewer than {rule.min_window_s:g} s with all sessions streaming"]
    return True, []


def knee(rows: list[dict], p95_bound_s: float) -> int | None:
    """The largest N whose final p95 is within the bound and whose real time was sustained."""
    good = [
        r["sessions"]
        for r in rows
        if r["sustained"] is True and r["latency_final_p95"] is not None and r["latency_final_p95"] <= p95_bound_s
    ]
    return max(good, default=None)


def worker_summary(samples: list[WorkerStats], start: float, end: float) -> dict:
    """One worker's step [start, end] (wall times) from its WorkerStats: backlog and audio waiting for finals, max
    and p95 over the samples in it (and `series`: [seconds from start, backlog, waiting, sessions, speaking] each);
    its decode totals' increase from the last sample before `start` (else the first) to the first sample after
    `end` (else the last)."""
    samples = sorted(samples, key=lambda s: s.at)
    inside = [s for s in samples if start <= s.at <= end]
    before = [s for s in samples if s.at <= start]
    after = [s for s in samples if s.at >= end]
    first = before[-1] if before else samples[0]
    last = after[0] if after else samples[-1]
    span = last.at - first.at
    decodes = {}
    for kind, totals in last.decodes.items():
        base = first.decodes.get(kind)
        decodes[kind] = {
            "count": totals.count - (base.count if base else 0),
            "seconds": round(totals.seconds - (base.seconds if base else 0.0), 3),
            "audio_s": round(totals.audio_s - (base.audio_s if base else 0.0), 3),
        }
    busy = sum(d["seconds"] for d in decodes.values())
    batches, items = last.batches - first.batches, last.batch_items - first.batch_items
    backlogs = [s.backlog_s for s in inside]
    waiting = [s.finals_waiting_s for s in inside]
    return {
        "samples": len(inside),
        "backlog_max_s": max(backlogs, default=None),
        "backlog_p95_s": percentile(backlogs, 95),
        "backlog_session_max_s": max((s.backlog_max_s for s in inside), default=None),
        "waiting_max_s": max(waiting, default=None),
        "waiting_p95_s": percentile(waiting, 95),
        "decodes": decodes,
        "decode_busy": round(busy / span, 3) if span > 0 else None,
        "mean_batch": round(items / batches, 2) if batches else None,
        "cpu_pct": round(100 * (last.cpu_s - first.cpu_s) / span, 1) if span > 0 else None,
        "rss_max_mb": round(max(s.rss_bytes for s in [first, *inside, last]) / 2**20, 1),
        "series": [
            [round(s.at - start, 1), round(s.backlog_s, 2), round(s.finals_waiting_s, 2), s.sessions, s.speaking]
            for s in inside
        ],
    }


@dataclass
class Sample:
    """One reading of the processes: cumulative CPU seconds and RSS bytes per service, at wall time `at`."""

    at: float
    cpu_s: dict[str, float]
    rss: dict[str, int]


def service_usage(samples: list[Sample], start: float, end: float) -> dict[str, dict]:
    """Per service over [start, end]: mean CPU % (100 = one core) and peak RSS (MB)."""
    inside = [s for s in samples if start <= s.at <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    span = last.at - first.at
    out = {}
    for service in sorted({k for s in inside for k in s.rss}):
        cpu = last.cpu_s.get(service, 0.0) - first.cpu_s.get(service, 0.0)
        out[service] = {
            "cpu_pct": round(100 * cpu / span, 1),
            "rss_max_mb": round(max(s.rss.get(service, 0) for s in inside) / 2**20, 1),
        }
    return out


def service_of(name: str, cmdline: list[str]) -> str:
    """Which service a child process is: the last part of `python -m jetscribe.services.X`, nats-server,
    postgres, else its name."""
    if "-m" in cmdline[:-1]:
        module = cmdline[cmdline.index("-m") + 1]
        return module.rsplit(".", 1)[-1]
    for known in ("nats-server", "postgres"):
        if known in name or (cmdline and known in os.path.basename(cmdline[0])):
            return known
    return name


def session_report(run: SessionRun, alone: dict | None, speed: float) -> dict:
    """One session of a step: its latencies, WER and WER alone, and how late its chunks were accepted."""
    out = {
        "session_id": run.session_id,
        "bot": run.bot,
        "file": run.item.name,
        "duration_s": round(run.item.audio.duration_s, 3),
        "started_at": round(run.began, 3),
        "error": run.error,
    }
    if run.result is None:
        return out
    segments, interims = segment_latencies(run.result, run.item.audio.sample_rate)
    latencies = [s["latency"] for s in segments]
    utterances = [s["latency_utterance"] for s in segments if s.get("latency_utterance") is not None]
    lags = send_lags(run.result, speed)
    text = run.result.text
    w = wer(run.item.reference, text)
    w_alone = alone["wer"] if alone else None
    return {
        **out,
        "wer": w,
        "wer_alone": w_alone,
        "wer_delta": None if w_alone is None else round(w - w_alone, 4),
        "latencies": latencies,
        "latency_final_p50": percentile(latencies, 50),
        "latency_final_p95": percentile(latencies, 95),
        "latencies_utterance": utterances,
        "latencies_first_interim": interims,
        "latency_first_interim_p50": percentile(interims, 50),
        "chunks": len(run.result.sent_by_seq),
        "send_lag_max": max(lags, default=None),
        "last_sent_at": max(run.result.sent_by_seq.values(), default=None),
        "text": text,
        "reference": run.item.reference,
    }


def full_load_window(sessions: list[dict]) -> tuple[float, float] | None:
    """While every bot was streaming: from the last bot's first start to the first bot's last chunk."""
    if not sessions or any(s.get("last_sent_at") is None for s in sessions):
        return None
    bots: dict[int, list[dict]] = defaultdict(list)
    for s in sessions:
        bots[s["bot"]].append(s)
    start = max(min(s["started_at"] for s in b) for b in bots.values())
    end = min(max(s["last_sent_at"] for s in b) for b in bots.values())
    return (start, end) if end > start else None


def curve_row(
    n: int,
    sessions: list[dict],
    alone: dict[str, dict],
    stats: list[WorkerStats],
    usage: dict[str, dict],
    hops: dict,
    span: tuple[float, float],
    rule: Rule,
) -> dict:
    """One step of the sweep: everything the table and the JSON say about N concurrent bots and their `sessions`."""
    done = [s for s in sessions if s["error"] is None]
    latencies = [x for s in done for x in s["latencies"]]
    interims = [x for s in done for x in s["latencies_first_interim"]]
    utterances = [x for s in done for x in s.get("latencies_utterance", [])]
    refs = [s["reference"] for s in done]
    overall = corpus_wer(refs, [s["text"] for s in done]) if done else None
    with_alone = [s for s in done if s["file"] in alone]
    overall_alone = (
        corpus_wer([s["reference"] for s in with_alone], [alone[s["file"]]["text"] for s in with_alone])
        if with_alone and len(with_alone) == len(done)
        else None
    )
    deltas = [abs(s["wer_delta"]) for s in done if s["wer_delta"] is not None]
    lags = [s["send_lag_max"] for s in done if s["send_lag_max"] is not None]
    failed = len(sessions) - len(done)
    window = full_load_window(done) if not failed else None
    growth = waiting_growth(stats, window, rule.min_window_s)
    by_worker: dict[str, list[WorkerStats]] = defaultdict(list)
    for s in stats:
        by_worker[s.worker_id].append(s)
    workers = {w: worker_summary(samples, *span) for w, samples in sorted(by_worker.items())}
    ok, reasons = sustained(n, len(sessions), failed, max(lags, default=None), growth, rule)
    transcriber = usage.get("transcriber", {})
    return {
        "sessions": n,
        "sessions_run": len(sessions),
        "failed": failed,
        "latency_final_p50": percentile(latencies, 50),
        "latency_final_p95": percentile(latencies, 95),
        "latency_final_p99": percentile(latencies, 99),
        "latency_first_interim_p50": percentile(interims, 50),
        "latency_first_interim_p95": percentile(interims, 95),
        "latency_utterance_p50": percentile(utterances, 50),
        "latency_utterance_p95": percentile(utterances, 95),
        "utterances": len(utterances),
        "wer": overall,
        "wer_alone": overall_alone,
        "wer_delta": None if overall is None or overall_alone is None else round(overall - overall_alone, 4),
        "wer_delta_max_abs": max(deltas, default=None),
        "backlog_max_s": worst(workers, "backlog_max_s"),
        "backlog_p95_s": worst(workers, "backlog_p95_s"),
        "waiting_max_s": worst(workers, "waiting_max_s"),
        "waiting_growth": None if growth is None else round(growth, 3),
        "full_load_window_s": None if window is None else round(window[1] - window[0], 1),
        "send_lag_max": max(lags, default=None),
        "transcriber_cpu_pct": transcriber.get("cpu_pct"),
        "decode_busy": worst(workers, "decode_busy"),
        "mean_batch": _mean_batch(workers),
        "sustained": ok,
        "not_sustained_because": reasons,
        "wall_s": round(span[1] - span[0], 1),
        "workers": workers,
        "services": usage,
        "hops": hops,
        "session_detail": sessions,
    }


def voice_step(before: dict, after: dict, wall_s: float) -> dict:
    """What speakers from the audio cost in one step, from the workers' totals before and after it: its CPU (ahead
    while utterances streamed, and for finals) and the mean time a final waited for its voices after its text."""
    if not after:
        return {}
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    waits = delta.get("final_waits", 0.0)
    cpu = delta.get("ahead_cpu_s", 0.0) + delta.get("final_cpu_s", 0.0)
    return {
        "cpu_s": round(cpu, 2),
        "cpu_pct": round(100 * cpu / wall_s, 1) if wall_s > 0 else None,
        "final_wait_mean_s": round(delta.get("final_wait_s", 0.0) / waits, 3) if waits else None,
        "final_waits": int(waits),
        "ahead_dropped": int(delta.get("ahead_dropped", 0.0)),
    }


def worst(workers: dict[str, dict], key: str) -> float | None:
    """The highest `key` among the workers that have it."""
    return max((w[key] for w in workers.values() if w[key] is not None), default=None)


def _mean_batch(workers: dict[str, dict]) -> float | None:
    means = [w["mean_batch"] for w in workers.values() if w["mean_batch"] is not None]
    return round(sum(means) / len(means), 2) if means else None


def hop_rates(before: dict[str, int], after: dict[str, int], chunks: int, rows: int | None, seconds: float) -> dict:
    """Messages per second through each hop of a step."""
    per_s = (lambda n: round(n / seconds, 1)) if seconds > 0 else (lambda n: None)
    out = {"bot_chunks": chunks, "bot_chunks_per_s": per_s(chunks)}
    for stream in sorted(after):
        added = after[stream] - before.get(stream, 0)
        out[f"{stream.lower()}_messages"] = added
        out[f"{stream.lower()}_per_s"] = per_s(added)
    out["postgres_rows"] = rows
    out["postgres_rows_per_s"] = None if rows is None else per_s(rows)
    return out


# --- printing ------------------------------------------------------------------------------------------
def yes_no(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "?"}[value]


def usage_cell(usage: dict | None) -> str:
    """'CPU%/MB' of one service."""
    usage = usage or {}
    return f"{fmt(usage.get('cpu_pct'), '.0f')}/{fmt(usage.get('rss_max_mb'), '.0f')}"


def print_curve(variant: Variant, rows: list[dict], rule: Rule, out=None) -> None:
    """The variant's curve, one line per session count, the knee marked; then CPU and memory per service."""
    out = out or sys.stdout
    head = (
        "sessions",
        "failed",
        "final p50",
        "p95",
        "p99",
        "1st interim p50",
        "WER",
        "vs alone",
        "max |d|",
        "backlog max",
        "waiting max",
        "growth/s",
        "send lag",
        "transcr CPU %",
        "busy",
        "batch",
        "real time",
        "knee",
    )
    best = knee(rows, rule.p95_bound_s)
    lines = [
        (
            str(r["sessions"]),
            f"{r['failed']}/{r['sessions_run']}",
            fmt(r["latency_final_p50"], ".2f"),
            fmt(r["latency_final_p95"], ".2f"),
            fmt(r["latency_final_p99"], ".2f"),
            fmt(r["latency_first_interim_p50"], ".2f"),
            fmt(r["wer"], ".3f"),
            fmt(r["wer_delta"], "+.3f"),
            fmt(r["wer_delta_max_abs"], ".3f"),
            fmt(r["backlog_max_s"], ".1f"),
            fmt(r["waiting_max_s"], ".1f"),
            fmt(r["waiting_growth"], "+.2f"),
            fmt(r["send_lag_max"], ".2f"),
            fmt(r["transcriber_cpu_pct"], ".0f"),
            fmt(r["decode_busy"], ".0%"),
            fmt(r["mean_batch"], ".1f"),
            yes_no(r["sustained"]),
            "<-" if r["sessions"] == best else "",
        )
        for r in rows
    ]
    env = " ".join(f"{k}={v}" for k, v in variant.env.items()) or "no extra environment"
    print(f"\n== {variant.name} ({env})", file=out)
    print(table(head, lines), file=out)
    verdict = f"N = {best}" if best is not None else "none"
    print(
        f"knee: {verdict} (largest N with final p95 <= {rule.p95_bound_s:g} s and real time sustained). Seconds; "
        f"WER vs alone: overall minus the same files streamed alone, max |d| per session; backlog: audio not yet "
        f"covered by a final, per worker; waiting: the part of it in ended utterances; growth: the trend of waiting "
        f"while all sessions streamed (s/s, bound {rule.max_growth:g} x N); send lag: worst chunk behind schedule "
        f"(bound {rule.max_send_lag_s:g} s); busy: decode time / wall time",
        file=out,
    )
    for r in rows:
        if r.get("utterances"):
            print(
                f"  N={r['sessions']}: by utterance (the finals one decode published together, as the parts of a final "
                f"split where the speaker changes, from their last word) p50 {fmt(r['latency_utterance_p50'], '.2f')} "
                f"p95 {fmt(r['latency_utterance_p95'], '.2f')} s ({r['utterances']} utterances)",
                file=out,
            )
    for r in rows:
        if v := r.get("voices"):
            print(
                f"  N={r['sessions']}: speakers from the audio {v['cpu_s']} CPU s ({v['cpu_pct']} % of a core), "
                f"a final waited {v['final_wait_mean_s']} s for its voices on average ({v['final_waits']} finals), "
                f"{v['ahead_dropped']} window(s) dropped",
                file=out,
            )
    for r in rows:
        if r["not_sustained_because"]:
            print(f"  N={r['sessions']}: " + "; ".join(r["not_sustained_because"]), file=out)
    services = sorted({s for r in rows for s in r["services"]}, key=lambda s: (s == LOAD_GENERATOR, s))
    if services:
        head2 = ("sessions", *[f"{s} CPU%/MB" for s in services], "chunks/s", "AUDIO/s", "TRANSCRIPTS/s", "rows/s")
        lines2 = [
            (
                str(r["sessions"]),
                *[usage_cell(r["services"].get(s)) for s in services],
                fmt(r["hops"].get("bot_chunks_per_s"), ".0f"),
                fmt(r["hops"].get("audio_per_s"), ".0f"),
                fmt(r["hops"].get("transcripts_per_s"), ".0f"),
                fmt(r["hops"].get("postgres_rows_per_s"), ".1f"),
            )
            for r in rows
        ]
        print("\n" + table(head2, lines2), file=out)


# --- running -------------------------------------------------------------------------------------------
@dataclass
class SessionRun:
    item: Item
    session_id: str
    bot: int = 0
    began: float = 0.0
    result: StreamResult | None = None
    error: str | None = None


class ProcessSampler:
    """CPU seconds and RSS per service, from the processes this one started besides `earlier` (the stack's children
    and theirs, by service) and this process itself (the load generator)."""

    def __init__(self, earlier: set[int]):
        self.earlier = earlier
        self.me = psutil.Process()
        self._mine = self._cpu(self.me)
        self._cpu_by_process: dict[tuple[int, float], tuple[str, float]] = {}  # kept after a process exits
        self.samples: list[Sample] = []

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    def sample(self) -> Sample:
        rss: dict[str, int] = defaultdict(int)
        for child in self.me.children():
            try:
                if child.pid in self.earlier:
                    continue
                service = service_of(child.name(), child.cmdline())
                family = [child, *child.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in family:
                try:
                    with proc.oneshot():
                        self._cpu_by_process[(proc.pid, proc.create_time())] = (service, self._cpu(proc))
                        rss[service] += proc.memory_info().rss
                except psutil.Error:  # gone meanwhile: its last reading stays counted
                    continue
        cpu: dict[str, float] = defaultdict(float)
        for service, seconds in self._cpu_by_process.values():
            cpu[service] += seconds
        cpu[LOAD_GENERATOR] = self._cpu(self.me) - self._mine
        rss[LOAD_GENERATOR] = self.me.memory_info().rss
        sample = Sample(time.time(), dict(cpu), dict(rss))
        self.samples.append(sample)
        return sample


@dataclass
class Bench:
    """What a variant's steps share: its NATS connection, what is watched, and the options."""

    args: argparse.Namespace
    variant: Variant
    nc: object
    js: object
    watchdog: Watchdog
    sampler: ProcessSampler
    database: tuple[str, PostgresClient] | None  # where the rows are counted, and how to sign in there
    run: str
    stats: list[WorkerStats] = field(default_factory=list)

    async def stream(self, item: Item, sid: str, start_at: float, bot: int = 0) -> SessionRun:
        """One session of a bot: waits for its start, streams its file, never raises for what the pipeline refused."""
        await asyncio.sleep(max(0.0, start_at - time.time()))
        run = SessionRun(item, sid, bot, time.time())
        try:
            run.result = await stream_audio(
                self.nc,
                item.audio,
                tenant=TENANT,
                session_id=sid,
                speed=self.args.speed,
                chunk_s=CHUNK_S,
                language=self.args.language,
            )
        except (BotError, TimeoutError) as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            print(f"\nsession {sid} failed: {run.error}", file=sys.stderr, flush=True)
        return run

    async def stream_info(self) -> dict[str, int]:
        """Messages ever appended to AUDIO and TRANSCRIPTS (their last seq)."""
        out = {}
        for stream in (subjects.AUDIO_STREAM, subjects.TRANSCRIPTS_STREAM):
            info = await self.js.stream_info(stream)
            out[stream] = info.state.last_seq
        return out

    async def stats_after(self, moment: float, timeout_s: float = 3 * STATS_EVERY_S) -> None:
        """Wait until every worker heard from has published after `moment`, so its totals cover the step."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest: dict[str, float] = {}
            for s in self.stats:
                latest[s.worker_id] = max(s.at, latest.get(s.worker_id, 0.0))
            if all(at >= moment for at in latest.values()):
                return
            await asyncio.sleep(0.1)

    async def persister_settled(self) -> float | None:
        """Seconds until the persister has every TRANSCRIPTS message acked; None if it did not in time."""
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_TIMEOUT_S:
            try:
                info = await self.js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return round(time.monotonic() - started, 2)
            except Exception as exc:  # not created yet while the persister starts; none at all: no persister
                if time.monotonic() - started > 10:
                    print(f"\nno persister consumer on TRANSCRIPTS ({exc!r}): rows not counted", file=sys.stderr)
                    return None
            await asyncio.sleep(0.2)
        print(
            f"\nthe persister did not catch up within {SETTLE_TIMEOUT_S:g} s: rows counted as they are", file=sys.stderr
        )
        return None

    async def rows(self, session_ids: list[str]) -> int | None:
        """Rows in PostgreSQL (segments and sessions) of these sessions."""
        if not self.database:
            return None
        from sqlalchemy import create_engine, text

        from jetscribe.services.persister.store import sqlalchemy_url

        url, client = self.database

        def count() -> int:
            engine = create_engine(sqlalchemy_url(url), connect_args=client.connect_args())
            try:
                with engine.connect() as conn:
                    total = 0
                    for table_name in ("segments", "sessions"):
                        total += conn.execute(
                            text(f"SELECT count(*) FROM {table_name} WHERE tenant = :t AND session_id = ANY(:ids)"),
                            {"t": TENANT, "ids": session_ids},
                        ).scalar_one()
                    return total
            finally:
                engine.dispose()

        try:
            return await asyncio.to_thread(count)
        except Exception as exc:  # e.g. --external without a reachable DATABASE_URL: the rest of the row stands
            print(f"\ncould not count the rows in PostgreSQL: {exc!r}", file=sys.stderr)
            return None

    async def alone(self, item: Item) -> dict:
        """The file streamed with no other session: the accuracy reference of the sessions under load."""
        print(f"[{self.variant.name}] streaming {item.name} alone ...", file=sys.stderr, flush=True)
        sid = session_id(item.name, f"alone-{self.variant.name}-{self.run}")
        run = await self.watchdog.run(self.stream(item, sid, time.time()))
        if run.result is None:
            raise RuntimeError(f"{item.name} streamed alone failed: {run.error}")
        segments, _ = segment_latencies(run.result, item.audio.sample_rate)
        latencies = [s["latency"] for s in segments]
        return {
            "wer": wer(item.reference, run.result.text),
            "text": run.result.text,
            "latency_final_p50": percentile(latencies, 50),
            "latency_final_p95": percentile(latencies, 95),
        }

    async def step(self, n: int, items: list[Item], alone: dict[str, dict], rule: Rule) -> dict:
        """N bots at once, staggered; the row of the curve."""
        before = await self.stream_info()
        voices_before = await self.voice_stats()
        first = time.time() + 0.5
        plan = plan_sessions(items, n, first, self.args.stagger, self.args.speed, self.args.duration)
        ids = [session_id(p.item.name, f"{self.variant.name}-{n}x{p.bot}t{p.turn}-{self.run}") for p in plan]
        starts = [p.start_at for p in plan]
        ends = [p.start_at + p.item.audio.duration_s / self.args.speed for p in plan]
        progress = asyncio.ensure_future(self._progress(n, starts, ends))
        try:
            runs = await self.watchdog.run(
                asyncio.gather(*[self.stream(p.item, sid, p.start_at, p.bot) for p, sid in zip(plan, ids, strict=True)])
            )
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        finished = time.time()
        settle_s = await self.watchdog.run(self.persister_settled())
        await self.stats_after(finished)
        after = await self.stream_info()
        rows = await self.rows(ids)
        span = (first, finished)
        sessions = [session_report(r, alone.get(r.item.name), self.args.speed) for r in runs]
        chunks = sum(s.get("chunks", 0) for s in sessions)
        hops = {**hop_rates(before, after, chunks, rows, finished - first), "persister_settle_s": settle_s}
        usage = service_usage(self.sampler.samples, *span)
        stats = [s for s in self.stats if first - 5 <= s.at <= finished + 5]
        row = curve_row(n, sessions, alone, stats, usage, hops, span, rule)
        row["voices"] = voice_step(voices_before, await self.voice_stats(), finished - first)
        return row

    async def voice_stats(self) -> dict:
        """The transcribers' `speakers_audio` stats (micro-service `stats`), summed; {} where speakers from the
        audio is off."""
        replies: list[dict] = []

        async def collect(msg) -> None:
            replies.append(json.loads(msg.data))

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            await self.nc.publish("$SRV.STATS.jetscribe-transcriber", b"", reply=inbox)
            await asyncio.sleep(0.5)  # the micro API answers once per instance
        finally:
            await sub.unsubscribe()
        total: dict[str, float] = defaultdict(float)
        for reply in replies:
            data = next((e.get("data") or {} for e in reply.get("endpoints", []) if e.get("name") == "stats"), {})
            for key, value in (data.get("speakers_audio") or {}).items():
                total[key] += value
        return dict(total)

    async def _progress(self, n: int, starts: list[float], ends: list[float]) -> None:
        """A line on a terminal: sessions streaming and seconds of audio left; the resource samples meanwhile."""
        while True:
            await asyncio.to_thread(self.sampler.sample)
            if sys.stderr.isatty():
                now = time.time()
                running = sum(1 for s, e in zip(starts, ends, strict=True) if s <= now < e)
                left = max(0.0, max(ends) - now)
                state = f"{left:.0f} s left" if left > 0 else "waiting for the last finals"
                print(
                    f"\r[{self.variant.name}] N={n}: {running} streaming, {state}   ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(1.0)


def alone_key(model: str, variant: Variant, speed: float, item: Item) -> dict:
    """What an alone result depends on: a cached one is reused only where all of it matches."""
    return {
        "model": model,
        "env": dict(sorted(variant.env.items())),
        "speed": speed,
        "file": item.name,
        "duration_s": round(item.audio.duration_s, 3),
    }


def find_alone(cache: list[dict], key: dict) -> dict | None:
    for entry in cache:
        if all(entry.get(k) == v for k, v in key.items()):
            return entry
    return None


async def run_variant(
    args,
    variant: Variant,
    items: list[Item],
    counts: list[int],
    cache: list[dict],
    rule: Rule,
    report: dict,
    *,
    nats_url: str,
    database: tuple[str, PostgresClient] | None,
    local,
    earlier: set[int],
) -> dict:
    """The alone runs, then one step per session count, on one stack; the variant's part of `report`."""
    import nats

    run = uuid.uuid4().hex[:6]
    nc = await nats.connect(nats_url, **env_connect_options(nats_url), connect_timeout=5)
    try:
        async with Watchdog(local) as watchdog:
            bench = Bench(args, variant, nc, nc.jetstream(), watchdog, ProcessSampler(earlier), database, run)

            async def on_stats(msg):
                try:
                    bench.stats.append(decode(msg.data, WorkerStats))
                except ValueError as exc:
                    print(f"\nunreadable worker stats on {msg.subject}: {exc}", file=sys.stderr)

            sub = await nc.subscribe(subjects.TRANSCRIBER_STATS_ALL, cb=on_stats)
            await warm_up(nc, watchdog, items[0], TENANT, args.language, run, sessions=3 * args.transcribers)
            alone = {}
            planned = plan_sessions(items, max(counts), 0.0, args.stagger, args.speed, args.duration)
            for item in {p.item.name: p.item for p in planned}.values():
                key = alone_key(args.model, variant, args.speed, item)
                entry = find_alone(cache, key)
                if entry is None:
                    entry = {**key, "variant": variant.name, **(await bench.alone(item))}
                    cache.append(entry)
                alone[item.name] = entry
            result: dict = {"name": variant.name, "env": variant.env, "knee": None, "rows": []}
            report["variants"].append(result)
            for n in counts:
                print(f"\n[{variant.name}] {n} sessions ...", file=sys.stderr, flush=True)
                result["rows"].append(await bench.step(n, items, alone, rule))
                result["knee"] = knee(result["rows"], rule.p95_bound_s)
                write_report(args, report)
            await sub.unsubscribe()
            return result
    finally:
        await nc.close()


def run_all(args, variants: list[Variant], items: list[Item], counts: list[int], cache: list[dict], rule, report):
    """Each variant on its own fresh stack (or, with --external, on the running services), its curve printed."""
    use_servers(args.nats_url, args.database_url)
    for variant in variants:
        earlier = {p.pid for p in psutil.Process().children()}  # those started from here on are the stack's
        if args.external:
            from jetscribe.devstack.stack import database_url, nats_url

            result = asyncio.run(
                run_variant(
                    args, variant, items, counts, cache, rule, report,
                    nats_url=nats_url(), database=(database_url(), PostgresClient.from_env()), local=None,
                    earlier=earlier,
                )
            )  # fmt: skip
        else:
            options = {"transcribers": args.transcribers} if args.transcribers > 1 else {}
            with (
                tempfile.TemporaryDirectory(prefix="jetscribe-load-") as home,
                local_stack(Path(home), args.model, variant.env, **options) as local,
            ):
                result = asyncio.run(
                    run_variant(
                        args, variant, items, counts, cache, rule, report,
                        nats_url=local.nats_url, database=local.database("reader"), local=local, earlier=earlier,
                    )
                )  # fmt: skip
        print_curve(variant, result["rows"], rule)


def write_report(args, report: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--model", required=True, help="base, tiny.en or a CTranslate2 Whisper model folder")
    parser.add_argument(
        "--sessions", help=f"comma list of concurrent session counts (default 1,4,8,16,24,32; --quick {QUICK_SESSIONS})"
    )
    parser.add_argument("--variants", help="name:VAR=value[,VAR=value][,name:...]: environments run side by side")
    parser.add_argument("--transcribers", type=int, default=1, help="transcriber processes in each stack")
    parser.add_argument("--stagger", type=float, default=0.7, help="seconds between two bots' starts")
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds all N bots stream together, each going on with the next file as a new session "
        f"(default {DURATION_S:g}; --quick 0: one file per bot)",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time (the targets are for 1)")
    parser.add_argument("--language", default="auto", help="session language")
    parser.add_argument("--json", help="where to write the report (rewritten after every step)")
    parser.add_argument("--alone-from", type=Path, help="a previous report whose `alone` results to reuse")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: sessions {QUICK_SESSIONS} unless given, the first {QUICK_FILES} files, "
        f"each cut to its turns within {QUICK_SECONDS:g} s",
    )
    parser.add_argument("--p95-bound", type=float, default=Rule.p95_bound_s, help="final p95 bound of the knee (s)")
    parser.add_argument(
        "--max-send-lag", type=float, default=Rule.max_send_lag_s, help="real time: seconds a chunk may be late"
    )
    parser.add_argument(
        "--max-growth", type=float, default=Rule.max_growth, help="real time: backlog growth per session (s/s)"
    )
    parser.add_argument(
        "--min-window",
        type=float,
        default=Rule.min_window_s,
        help="seconds with all sessions streaming needed to judge growth",
    )
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        counts = parse_sessions(args.sessions or (QUICK_SESSIONS if args.quick else "1,4,8,16,24,32"))
        variants = parse_variants(args.variants)
    except ValueError as exc:
        parser.exit(2, f"load.py: {exc}\n")
    if args.duration is None:
        args.duration = 0.0 if args.quick else DURATION_S
    if args.speed <= 0 or args.stagger < 0 or args.duration < 0 or args.transcribers < 1:
        parser.exit(
            2, "load.py: --speed must be above 0, --stagger and --duration 0 or more, --transcribers 1 or more\n"
        )
    if args.external and (args.transcribers > 1 or any(v.env for v in variants)):
        parser.exit(
            2, "load.py: --external starts nothing, so --variants with an environment and --transcribers cannot apply\n"
        )
    if args.transcribers > 1:
        from jetscribe.devstack.stack import LocalStack

        if "transcribers" not in {f.name for f in fields(LocalStack)}:
            parser.exit(
                2, "load.py: this checkout's LocalStack starts one transcriber: --transcribers needs it to take more\n"
            )
    cache = []
    if args.alone_from:
        try:
            cache = json.loads(args.alone_from.read_text())["alone"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.exit(2, f"load.py: --alone-from {args.alone_from}: no `alone` results there ({exc})\n")
    items, _ = items_from_arguments(args)
    if not items:
        parser.exit(2, "load.py: no files to stream (check --data and --files)\n")
    if args.quick:
        items = [clip(i, QUICK_SECONDS) for i in items[:QUICK_FILES]]
    rule = Rule(args.max_send_lag, args.max_growth, args.min_window, args.p95_bound)
    cfg = TranscriberConfig.from_env()
    report = {
        "config": {
            "model": args.model,
            "sessions": counts,
            "variants": [{"name": v.name, "env": v.env} for v in variants],
            "transcribers": args.transcribers,
            "stagger_s": args.stagger,
            "duration_s": args.duration,
            "speed": args.speed,
            "language": args.language,
            "chunk_s": CHUNK_S,
            "rule": {
                "max_send_lag_s": rule.max_send_lag_s,
                "max_growth_per_session": rule.max_growth,
                "min_window_s": rule.min_window_s,
                "p95_bound_s": rule.p95_bound_s,
            },
            **transcriber_settings(cfg),
            "external": args.external,
            "quick": args.quick,
            "data": ",".join(str(d.resolve()) for d in args.data),
            "files": [i.name for i in items],
            "git_commit": git_commit(),
            "cpu_count": os.cpu_count(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "alone": cache,
        "variants": [],
    }
    run_all(args, variants, items, counts, cache, rule, report)
    write_report(args, report)
    if args.json:
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: the stack is stopped; the report holds the steps done", file=sys.stderr)
        sys.exit(130)
