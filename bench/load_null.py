"""The messaging and persistence path alone, at up to 1,000 sessions: the null model (no Whisper) behind N gateways.

    python bench/load_null.py [--sessions 50,100,250,500,1000] [--gateways 2] [--transcribers 1] [--generators 2]
        [--seconds 30] [--json OUT.json]

Starts the local stack in a temporary folder (nats-server, PostgreSQL, --gateways ingest gateways, --transcribers
transcribers with JETSCRIBE_MODEL=null, the persister; jetscribe.devstack.stack.LocalStack), then for each point
of --sessions runs --generators load-generator processes (this file with --generator), which share the sessions:
each session starts, sends 10 chunks of 100 ms a second in real time for --seconds (speech from
jetscribe.evaluation.speech, then digital silence, so utterances close), and ends. Sessions are spread over 10
tenants and start staggered over the first 100 ms, each at its own point of the speech/silence cycle.

Per point it prints:
- hop latencies, p50/p99 in ms, for every final whose utterance closed during the run: the bot sends the chunk that
  closes the utterance (the one holding its last speech frame + the endpoint silence) -> the gateway stored it
  (its AUDIO message timestamp) -> the transcriber published the final (its TRANSCRIPTS timestamp) -> its row in
  PostgreSQL (`segments.updated_at`, the final's write; the transaction's start, so a batch's own write time is not
  in it), and the total;
- the bots' request round trip p50/p99, how late the generators sent against their schedule (p99), and chunks/s
  answered ok against asked;
- CPU per process over the steady part of the run (% of one core; 200 % is the whole 2-core host), what the rest
  of the host used meanwhile, and the cost per 100 sessions over the idle stack (measured first, 5 s);
- what was left queued when the bots stopped (AUDIO not yet delivered to the transcriber, TRANSCRIPTS not yet
  written by the persister), how long the pipeline took to drain, the busiest process (>= 90 % of a core: each
  service is one Python event loop) and who fell behind (`behind`).
A bot that falls behind its schedule does not send what it could not send within --seconds.
All clocks are this host's wall clock (bots, nats-server, PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import connect_as_root  # noqa: E402
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402
from jetscribe.shared.natsauth import env_connect_options  # noqa: E402

CHUNK_S = 0.1
CHUNK_SAMPLES = int(SAMPLE_RATE * CHUNK_S)
TENANTS = 10
SPEECH_S = 1.8  # each cycle: this much speech, then SILENCE_S of digital silence
SILENCE_S = 1.5
VAD_FRAME = 480  # webrtc's 30 ms frames, the transcriber's default detector
ENDPOINT_SILENCE_S = 0.5  # JETSCRIBE_ENDPOINT_SILENCE_S's default
BOUND_CPU = 90.0  # % of one core: a single-threaded process at this is the bound
BOUND_HOST = 95.0  # % of all cores


# --- pure helpers (tests/unit/bench/test_load_null.py) -----------------------------------------------------------
def closing_seq(speech_end_s: float, endpoint_silence_s: float = ENDPOINT_SILENCE_S, frame: int = VAD_FRAME) -> int:
    """The chunk that closes an utterance whose last speech frame ends at `speech_end_s` (session seconds): the one
    holding the last sample of the frame where the silence after it reaches the endpoint (segmenter.py)."""
    speech_end = round(speech_end_s * SAMPLE_RATE / frame) * frame  # frames start at session sample 0
    endpoint_frames = max(1, round(endpoint_silence_s * SAMPLE_RATE / frame))
    return (speech_end + endpoint_frames * frame - 1) // CHUNK_SAMPLES


def percentiles_ms(values: list[float]) -> tuple[float, float]:
    """(p50, p99) of seconds, in ms; NaN for none."""
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64) * 1000, [50, 99])
    return float(p50), float(p99)


def first_bound(cpu: dict[str, float], host_percent: float) -> str:
    """The first process at >= BOUND_CPU % of a core (the busiest of those), else the host, else none."""
    busy = {name: pct for name, pct in cpu.items() if pct >= BOUND_CPU}
    if busy:
        return max(busy, key=lambda name: busy[name])
    return "host CPU" if host_percent >= BOUND_HOST else "none"


def behind(sessions: int, left_audio: int, left_transcripts: int, late_p99_ms: float, rtt_p99_ms: float) -> list[str]:
    """Who did not keep up: audio the transcriber had not taken when the bots stopped (over 0.1 s per session),
    segments the persister had not written (over one per session), bots sending late (p99 over 100 ms: the
    request round trip, or the generator itself when the round trips are short)."""
    out = []
    if left_audio > sessions:
        out.append(f"transcriber (AUDIO backlog {left_audio})")
    if left_transcripts > sessions:
        out.append(f"persister (TRANSCRIPTS backlog {left_transcripts})")
    if late_p99_ms > 100:
        who = "gateways/NATS (round trips)" if rtt_p99_ms > 100 else "load generators"
        out.append(f"{who}: bots late p99 {late_p99_ms:.0f} ms")
    return out


def cycle_payloads(speech: np.ndarray) -> list[bytes]:
    """One speech/silence cycle as 100 ms chunk payloads (16 kHz mono s16le)."""
    take = int(SPEECH_S * SAMPLE_RATE)
    start = max(0, int(np.argmax(np.abs(speech) > 1000)) - CHUNK_SAMPLES)  # skip the leading silence
    voiced = speech[start : start + take]
    voiced = np.pad(voiced, (0, take - len(voiced)))
    cycle = np.concatenate([voiced, np.zeros(int(SILENCE_S * SAMPLE_RATE), np.int16)]).astype("<i2")
    return [cycle[i : i + CHUNK_SAMPLES].tobytes() for i in range(0, len(cycle), CHUNK_SAMPLES)]


# --- the load generator (a process of its own) --------------------------------------------------------------------
@dataclass
class GeneratorReport:
    sent: dict[str, list[float]] = field(default_factory=dict)  # "tenant/session" -> wall send time by seq
    rtt_s: list[float] = field(default_factory=list)
    late_s: list[float] = field(default_factory=list)  # how late each send was against its schedule
    ok: int = 0
    ok_by_session: dict[str, int] = field(default_factory=dict)  # chunks answered ok, by "tenant/session"
    refused: dict[str, int] = field(default_factory=dict)
    failed_sessions: list[str] = field(default_factory=list)


async def generate(url: str, sessions: list[tuple[str, str, int, float]], seconds: float, out: Path) -> None:
    """Run the bots of `sessions` (tenant, session, cycle phase in chunks, start wall time) and write the report."""
    import nats

    from jetscribe.client.bot import request
    from jetscribe.evaluation.speech import sample_speech
    from jetscribe.shared import subjects
    from jetscribe.shared.wire import AudioChunk, SessionControl

    payloads = cycle_payloads(sample_speech().audio)
    report = GeneratorReport()
    nc = await nats.connect(url, **env_connect_options(url), max_reconnect_attempts=-1)

    async def bot(tenant: str, session: str, phase: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        name, sent = f"{tenant}/{session}", []
        report.sent[name] = sent
        start = SessionControl(tenant=tenant, session_id=session, action="start", sent_at=time.time())
        if not (await request(nc, subjects.ingest_session(tenant, session), start)).ok:
            report.failed_sessions.append(name)
            return
        t0 = time.time()
        for seq in range(int(round(seconds / CHUNK_S))):
            due = t0 + seq * CHUNK_S
            await asyncio.sleep(max(0.0, due - time.time()))
            now = time.time()
            if now >= t0 + seconds:  # fell behind: what it could not send in time is not sent
                break
            report.late_s.append(now - due)
            chunk = AudioChunk(
                tenant=tenant,
                session_id=session,
                seq=seq,
                sent_at=now,
                sample_rate=SAMPLE_RATE,
                channels=1,
                encoding="pcm_s16le",
                payload=payloads[(seq + phase) % len(payloads)],
            )
            reply = await request(nc, subjects.ingest_audio(tenant, session), chunk)
            report.rtt_s.append(time.time() - now)
            sent.append(now)
            if reply.ok:
                report.ok += 1
                report.ok_by_session[name] = report.ok_by_session.get(name, 0) + 1
            else:
                report.refused[reply.code] = report.refused.get(reply.code, 0) + 1
        end = SessionControl(tenant=tenant, session_id=session, action="end", sent_at=time.time())
        await request(nc, subjects.ingest_session(tenant, session), end)

    await asyncio.gather(*(bot(*s) for s in sessions))
    await nc.close()
    out.write_text(json.dumps(asdict(report)))


# --- one point ---------------------------------------------------------------------------------------------------
@dataclass
class Point:
    sessions: int
    chunks_asked_per_s: float
    chunks_ok_per_s: float
    hops_ms: dict[str, tuple[float, float]]
    finals_measured: int
    rtt_ms: tuple[float, float]
    late_p99_ms: float
    refused: dict[str, int]
    cpu_percent: dict[str, float]
    others_cpu_percent: float  # processes not of this bench (other work on the host)
    pipeline_cpu_per_100: float  # % of a core per 100 sessions over the idle stack: servers and services
    generator_cpu_per_100: float
    behind: list[str]
    host_cpu_percent: float
    left_audio: int
    left_transcripts: int
    drain_s: float
    bound: str
    finals: list[tuple] = field(repr=False)  # every final measured: tenant, session, segment, closing seq, 4 times
    not_stored_once_in_order: list[str]  # sessions whose AUDIO is not exactly their ok chunks, once, in order


class Processes:
    """CPU time of the stack's processes and the generators, by name."""

    def __init__(self, local, generators: list[subprocess.Popen]):
        import psutil

        def proc(pid: int) -> psutil.Process:
            return psutil.Process(pid)

        self.groups: dict[str, list] = {"nats-server": [proc(local.nats._proc.pid)]}
        postmaster = proc(local.postgres._proc.pid)
        self.groups["postgres"] = [postmaster]
        self.postmaster = postmaster
        counts: dict[str, int] = {}
        for child in local.children:
            module = child.proc.args[-1].rsplit(".", 1)[-1]
            kind = {"ingest": "gateway"}.get(module, module)
            counts[kind] = counts.get(kind, 0) + 1
            name = kind if kind == "persister" else f"{kind}-{counts[kind] - 1}"
            self.groups[name] = [proc(child.proc.pid)]
        self.groups["generators"] = [proc(g.pid) for g in generators]

    def times(self) -> dict[str, float]:
        import psutil

        self.groups["postgres"] = [self.postmaster, *self.postmaster.children(recursive=True)]
        out = {}
        for name, procs in self.groups.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            out[name] = total
        return out


async def wait_ready(local, gateways: int, timeout_s: float = 120.0) -> None:
    """Until the streams and consumers exist and the gateways share the partitions."""
    import nats

    from jetscribe.services.transcriber.partitions import decode_lease
    from jetscribe.shared import subjects

    nc = await nats.connect(local.nats_url, **env_connect_options(local.nats_url))
    deadline = time.monotonic() + timeout_s
    while True:
        local.check()
        try:
            await backlog(nc)
            kv = await nc.jetstream().key_value(subjects.INGEST_LEASES_BUCKET)
            owners = set()
            for partition in range(16):
                entry = await kv.get(subjects.partition_lease_key(partition))
                owners.add(decode_lease(entry.value, entry.revision).owner)
            if len(owners) == gateways:
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the stack was not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)
    await nc.close()


async def backlog(nc) -> tuple[int, int]:
    """(AUDIO messages no transcriber took yet, TRANSCRIPTS messages the persister has not written)."""
    from jetscribe.shared import subjects

    js = nc.jetstream()
    audio = 0
    for partition in range(16):  # not yet delivered (what a worker holds unacked waits for its utterance's end)
        info = await js.consumer_info(subjects.AUDIO_STREAM, subjects.transcriber_consumer(partition))
        audio += info.num_pending
    info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
    return audio, info.num_pending + info.num_ack_pending


async def stored_times(nc, stream: str, subject: str, start_seq: int, keep) -> dict:
    """Read `stream` from `start_seq` (headers only where the payload is not needed) into {key: (timestamp, msg)}
    for messages `keep(msg)` gives a key to."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    js = nc.jetstream()
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE,
        headers_only=stream == "AUDIO",
        inactive_threshold=60.0,
    )
    psub = await js.pull_subscribe(subject, durable=None, stream=stream, config=config)
    last = (await js.stream_info(stream)).state.last_seq
    found: dict = {}
    seen = start_seq - 1
    while seen < last:
        try:
            msgs = await psub.fetch(4096, timeout=2.0)
        except Exception:
            break
        for msg in msgs:
            seen = msg.metadata.sequence.stream
            key = keep(msg)
            if key is not None:
                found[key] = (msg.metadata.timestamp.timestamp(), msg)
    await psub.unsubscribe()
    return found


async def idle_cpu(local, seconds: float = 5.0) -> dict[str, float]:
    """CPU % per process of the stack with no sessions (heartbeats, lease renewals, polling)."""
    watch = Processes(local, [])
    before, started = watch.times(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = watch.times(), time.monotonic() - started
    return {name: 100 * (after[name] - before[name]) / elapsed for name in after if name != "generators"}


async def run_point(local, sessions: int, generators: int, seconds: float, tmp: Path, idle: dict[str, float]) -> Point:
    import nats
    from sqlalchemy import text

    from jetscribe.services.persister.store import open_engine
    from jetscribe.shared import subjects
    from jetscribe.shared.wire import Segment, decode

    nc = await nats.connect(local.nats_url, **env_connect_options(local.nats_url))
    js = nc.jetstream()
    audio_from = (await js.stream_info(subjects.AUDIO_STREAM)).state.last_seq + 1
    transcripts_from = (await js.stream_info(subjects.TRANSCRIPTS_STREAM)).state.last_seq + 1
    rng = random.Random(sessions)
    cycle = int(round((SPEECH_S + SILENCE_S) / CHUNK_S))
    start_at = time.time() + 3.0  # the generators' processes start and connect meanwhile
    plan = [
        (f"bench{i % TENANTS}", f"p{sessions}-{i}", rng.randrange(cycle), start_at + CHUNK_S * i / sessions)
        for i in range(sessions)
    ]
    procs, outs = [], []
    for g in range(generators):
        share = plan[g::generators]
        spec, out = tmp / f"gen{sessions}-{g}.json", tmp / f"gen{sessions}-{g}.out.json"
        spec.write_text(json.dumps(share))
        outs.append(out)
        args = [sys.executable, __file__, "--generator", str(spec), "--nats-url", local.nats_url, "--out", str(out)]
        procs.append(subprocess.Popen([*args, "--seconds", str(seconds)]))
    import psutil

    watch = Processes(local, procs)
    warm, steady_end = start_at + min(5.0, seconds / 4), start_at + seconds
    await asyncio.sleep(max(0.0, warm - time.time()))
    before, host_before, at_before = watch.times(), psutil.cpu_times(), time.monotonic()
    await asyncio.sleep(max(0.0, steady_end - time.time()))
    after, host_after, elapsed = watch.times(), psutil.cpu_times(), time.monotonic() - at_before
    cpu = {name: 100 * (after[name] - before[name]) / elapsed for name in after}
    busy = (
        sum(host_after)
        - host_after.idle
        - host_after.iowait
        - (sum(host_before) - host_before.idle - host_before.iowait)
    )
    host = 100 * busy / elapsed / (psutil.cpu_count() or 1)
    others = 100 * busy / elapsed - sum(cpu.values())  # whatever else runs on the host meanwhile
    left_audio, left_transcripts = await backlog(nc)
    for proc in procs:
        await asyncio.to_thread(proc.wait)
    stopped = time.monotonic()
    while (await backlog(nc)) != (0, 0) and time.monotonic() - stopped < 180:
        await asyncio.sleep(0.5)
    drain = time.monotonic() - stopped
    reports = [GeneratorReport(**json.loads(out.read_text())) for out in outs]
    sent = {k: v for r in reports for k, v in r.sent.items()}

    def final_key(msg):
        segment = decode(msg.data, Segment)
        if segment.status != "final" or not segment.session_id.startswith(f"p{sessions}-") or not segment.words:
            return None
        return segment.tenant, segment.session_id, segment.segment_id

    finals = await stored_times(nc, subjects.TRANSCRIPTS_STREAM, subjects.TRANSCRIPTS_ALL, transcripts_from, final_key)
    closing: dict[tuple[str, str, int], tuple[str, str, int]] = {}  # (tenant, session, chunk seq) -> final key
    for key, (_, msg) in finals.items():
        segment = decode(msg.data, Segment)
        seq = closing_seq(segment.words[-1].end)
        if seq < len(sent.get(f"{key[0]}/{key[1]}", [])):  # closed by audio the bot sent, not by its end
            closing[(key[0], key[1], seq)] = key

    stored_seqs: dict[str, list[int]] = {}  # every chunk stored, by session, in stream order

    def audio_key(msg):
        tenant, session, seq = (msg.headers or {}).get("Nats-Msg-Id", "::").split(":")
        if not seq.isdigit():
            return None  # a start or an end
        stored_seqs.setdefault(f"{tenant}/{session}", []).append(int(seq))
        key = (tenant, session, int(seq))
        return key if key in closing else None

    stored = await stored_times(nc, subjects.AUDIO_STREAM, "audio.>", audio_from, audio_key)
    engine = open_engine(*local.database("reader"))
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT tenant, session_id, segment_id, extract(epoch FROM updated_at) FROM segments "
                "WHERE status = 'final' AND session_id LIKE :prefix"
            ),
            {"prefix": f"p{sessions}-%"},
        )
        row_at = {(t, s, i): float(at) for t, s, i, at in rows}
    await engine.dispose()
    await js.purge_stream(subjects.AUDIO_STREAM)  # the next point needs no old audio, and the disk does not either
    await nc.close()

    hops: dict[str, list[float]] = {"send->stored": [], "stored->final": [], "final->row": [], "total": []}
    finals_seen: list[tuple] = []  # (tenant, session, segment, closing seq, sent, stored, final, row) for the JSON
    for (tenant, session, seq), key in closing.items():
        if (tenant, session, seq) not in stored or key not in row_at:
            continue
        t_sent = sent[f"{tenant}/{session}"][seq]
        t_stored, t_final, t_row = stored[(tenant, session, seq)][0], finals[key][0], row_at[key]
        hops["send->stored"].append(t_stored - t_sent)
        hops["stored->final"].append(t_final - t_stored)
        hops["final->row"].append(t_row - t_final)
        hops["total"].append(t_row - t_sent)
        finals_seen.append((tenant, session, key[2], seq, t_sent, t_stored, t_final, t_row))
    answered = {name: n for r in reports for name, n in r.ok_by_session.items()}
    broken = [name for name in sent if stored_seqs.get(name, []) != list(range(answered.get(name, 0)))]
    rtt = percentiles_ms([x for r in reports for x in r.rtt_s])
    late_p99 = percentiles_ms([x for r in reports for x in r.late_s])[1]
    refused: dict[str, int] = {}
    for r in reports:
        for code, n in r.refused.items():
            refused[code] = refused.get(code, 0) + n
        if r.failed_sessions:
            refused["session_not_started"] = refused.get("session_not_started", 0) + len(r.failed_sessions)
    return Point(
        sessions=sessions,
        chunks_asked_per_s=sessions / CHUNK_S,
        chunks_ok_per_s=sum(r.ok for r in reports) / seconds,
        hops_ms={name: percentiles_ms(values) for name, values in hops.items()},
        finals_measured=len(hops["total"]),
        rtt_ms=rtt,
        late_p99_ms=late_p99,
        refused=refused,
        cpu_percent={name: round(pct, 1) for name, pct in cpu.items()},
        others_cpu_percent=round(max(0.0, others), 1),
        pipeline_cpu_per_100=round(100 * (sum(cpu.values()) - cpu["generators"] - sum(idle.values())) / sessions, 1),
        generator_cpu_per_100=round(100 * cpu["generators"] / sessions, 1),
        behind=behind(sessions, left_audio, left_transcripts, late_p99, rtt[1]),
        host_cpu_percent=round(host, 1),
        left_audio=left_audio,
        left_transcripts=left_transcripts,
        drain_s=round(drain, 1),
        bound=first_bound(cpu, host),
        finals=finals_seen,
        not_stored_once_in_order=broken,
    )


def show(point: Point) -> None:
    hops = "  ".join(f"{name} {p50:.0f}/{p99:.0f}" for name, (p50, p99) in point.hops_ms.items())
    print(
        f"\n{point.sessions} sessions: chunks/s {point.chunks_ok_per_s:.0f} of {point.chunks_asked_per_s:.0f} asked; "
        f"{point.finals_measured} finals measured; refused {point.refused or 'none'}; sessions not stored exactly "
        f"once in order: {len(point.not_stored_once_in_order)}",
        flush=True,
    )
    print(f"  latency p50/p99 ms: {hops}", flush=True)
    print(
        f"  bot round trip p50/p99 ms {point.rtt_ms[0]:.1f}/{point.rtt_ms[1]:.1f}; generators late p99 "
        f"{point.late_p99_ms:.0f} ms",
        flush=True,
    )
    cpu = "  ".join(f"{name} {pct:.0f}" for name, pct in sorted(point.cpu_percent.items(), key=lambda x: -x[1]))
    print(
        f"  CPU % of a core: {cpu}; not this bench {point.others_cpu_percent:.0f}; host {point.host_cpu_percent:.0f} "
        "% of all cores",
        flush=True,
    )
    print(
        f"  cost per 100 sessions over the idle stack: pipeline {point.pipeline_cpu_per_100:.0f} % of a core, "
        f"generators {point.generator_cpu_per_100:.0f} %",
        flush=True,
    )
    print(
        f"  left when the bots stopped: AUDIO {point.left_audio}, TRANSCRIPTS {point.left_transcripts}; drained in "
        f"{point.drain_s:.1f} s; busiest: {point.bound}; fell behind: {', '.join(point.behind) or 'nobody'}",
        flush=True,
    )


def _stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt  # so the stack's child processes are stopped too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="50,100,250,500,1000")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--transcribers", type=int, default=1, help="transcriber processes (they share partitions)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", help="write every point here")
    parser.add_argument("--generator", help=argparse.SUPPRESS)  # a generator process: its sessions (JSON file)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generator:
        sessions = [tuple(s) for s in json.loads(Path(args.generator).read_text())]
        asyncio.run(generate(args.nats_url, sessions, args.seconds, Path(args.out)))
        return
    try:
        points = [int(s) for s in args.sessions.split(",")]
    except ValueError:
        raise SystemExit(f"--sessions {args.sessions!r}: a comma list of whole numbers, like 50,100,250") from None
    if min(points) < 1 or min(args.gateways, args.generators, args.transcribers) < 1 or args.seconds < 5:
        raise SystemExit(
            "--sessions, --gateways, --generators and --transcribers must be at least 1, --seconds at least 5"
        )

    from jetscribe.devstack.stack import LocalStack

    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    env = {
        "JETSCRIBE_LOG_LEVEL": "WARNING",
        "JETSCRIBE_MAX_SESSIONS_PER_WORKER": "100000",
        "JETSCRIBE_MAX_SESSIONS_PER_TENANT": "100000",
    }
    results = []
    print(
        f"null model, {args.gateways} gateways, {args.transcribers} transcribers, {args.generators} load generators, "
        f"{args.seconds:.0f} s "
        f"per point, {os.cpu_count()} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="load-null-") as tmp:
        for name in ("NATS_URL", "DATABASE_URL"):  # always a stack of its own: the bench purges AUDIO
            os.environ.pop(name, None)
        stack = LocalStack(
            Path(tmp) / "stack", model="null", transcribers=args.transcribers, gateways=args.gateways, extra_env=env
        )
        with stack as local:
            connect_as_root(local)
            asyncio.run(wait_ready(local, args.gateways))
            idle = asyncio.run(idle_cpu(local))
            print(
                "idle stack, CPU % of a core: " + "  ".join(f"{name} {pct:.0f}" for name, pct in idle.items()),
                flush=True,
            )
            for sessions in points:
                point = asyncio.run(run_point(local, sessions, args.generators, args.seconds, Path(tmp), idle))
                local.check()
                show(point)
                results.append(asdict(point))
    if args.json:
        Path(args.json).write_text(json.dumps({"gateways": args.gateways, "points": results}, indent=1))


if __name__ == "__main__":
    main()
