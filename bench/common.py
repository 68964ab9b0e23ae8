"""What the streaming benchmarks (bench/accuracy.py, bench/load.py) share: the files they stream and how they are
chosen, the local stack they stream through, a service death failing the run, latencies as a bot sees them, and
their tables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, whatever is installed

from jetscribe.client.bot import Audio, StreamResult, read_audio, stream_audio  # noqa: E402
from jetscribe.evaluation.metrics import send_time  # noqa: E402
from jetscribe.shared.config import TranscriberConfig  # noqa: E402

CHUNK_S = 0.1
T = TypeVar("T")


@dataclass
class Item:
    name: str
    path: Path
    audio: Audio
    reference: str
    turns: list[dict]
    condition: str | None = None  # with --conditions: the condition, and the source file's name
    source: str | None = None


# --- the files -------------------------------------------------------------------------------------
# Where a benchmark's files come from without --data; --help, the errors and the README say the same.
DEFAULT_DATA = (
    "$JETSCRIBE_DEVSET if set, else ../shared/devset beside the clone if it is there (the team's devset, not in "
    "the repository), else a small set synthesised once with Piper into $JETSCRIBE_CACHE/bench-devset "
    "(~/.cache/jetscribe/bench-devset)"
)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, --files, --conditions, --seed, --every: which files a benchmark streams (`items_from_arguments`)."""
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        help=f"folder of <name>.wav + <name>.json, repeatable (default: {DEFAULT_DATA}; with --conditions also "
        "bench/data/real)",
    )
    parser.add_argument("--files", help="comma list of names to run (default: all in --data)")
    parser.add_argument(
        "--conditions",
        help="comma list of clean, room, noise, phone, opus, quiet, crosstalk: "
        "run the realistic set (each file in two of them)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the realistic set (with --conditions)")
    parser.add_argument("--every", action="store_true", help="with --conditions: every file in every condition")


def items_from_arguments(args: argparse.Namespace) -> tuple[list[Item], list[str] | None]:
    """The items `add_data_arguments`' options name, and the conditions (None without --conditions); sets
    `args.data` to the folders used. A missing folder exits with a one-line error."""
    conditions = None
    if args.conditions:
        from bench.make_realistic import parse_conditions

        conditions = parse_conditions(args.conditions)
    if args.data:
        missing = [str(d) for d in args.data if not d.is_dir()]
        if missing:
            sys.exit(f"--data {', '.join(missing)}: no such folder (leave --data out to use {DEFAULT_DATA})")
    args.data = args.data or default_data(with_real=conditions is not None)
    if conditions:
        return load_condition_items(args.data, args.files, conditions, args.seed, args.every), conditions
    return load_items(args.data, args.files), None


def load_items(data: list[Path], files: str | None) -> list[Item]:
    from bench.make_realistic import load_sources

    items = []
    for s in load_sources(data, files):
        items.append(Item(s.name, s.wav, read_audio(s.wav), s.meta["text"], s.meta.get("turns") or []))
    return items


def load_condition_items(
    data: list[Path], files: str | None, conditions: list[str], seed: int, every: bool
) -> list[Item]:
    """The realistic set: each file in two of `conditions` (all with `every`), made or read from the cache."""
    from bench.make_realistic import load_sources, plan, print_coverage, realize, variants

    everything = load_sources(data)  # also the other speech for babble and crosstalk
    sources = load_sources(data, files) if files else everything
    pairs = plan(sources, conditions, len(conditions) if every else 2)
    print_coverage(pairs, conditions)
    items = []
    for (source, condition), options in zip(pairs, variants(pairs), strict=False):
        print(f"preparing {source.name}@{condition} ...", file=sys.stderr, flush=True)
        wav, js = realize(source, condition, seed, everything, options=options)
        meta = json.loads(js.read_text())
        items.append(
            Item(
                f"{source.name}@{condition}",
                wav,
                read_audio(wav),
                meta["text"],
                meta.get("turns") or [],
                condition,
                source.name,
            )
        )
    return items


def default_data(with_real: bool) -> list[Path]:
    """The folders a benchmark reads without --data: see DEFAULT_DATA (with_real: also bench/data/real)."""
    named = os.environ.get("JETSCRIBE_DEVSET")
    if named and not Path(named).is_dir():
        sys.exit(f"JETSCRIBE_DEVSET={named}: no such folder")
    devset = Path(named) if named else REPO.parent / "shared" / "devset"
    folders = [devset] if devset.is_dir() else [generated_devset()]
    real = REPO / "bench" / "data" / "real"
    return folders + ([real] if with_real and real.is_dir() else [])


SMALL_SET = {
    "mono_market": (
        "mono",
        [
            ("A", t)
            for t in (
                "Every Saturday morning we walk to the farmers market near the old train station.",
                "We usually buy two loaves of fresh bread and six brown eggs.",
                "The woman at the fruit stand always saves us a basket of ripe peaches.",
                "My brother likes to stop for a cup of coffee before we head back home.",
            )
        ],
    ),
    "dialog_library": (
        "dialog",
        [
            ("A", "Good morning. I would like to renew the two books I borrowed last month."),
            ("B", "Of course. Can I see your library card, please?"),
            ("A", "Here it is. One of them is a cookbook and the other is a travel guide."),
            ("B", "Both are renewed for three more weeks. Is there anything else?"),
            ("A", "No, that is all. Thank you very much for your help."),
            ("B", "You are welcome. Have a nice day."),
        ],
    ),
}


def generated_devset() -> Path:
    """A small devset-format folder (a monologue and a dialog, Piper voices joe and joe-high), made once."""
    from jetscribe.evaluation.speech import default_cache_dir

    folder = default_cache_dir().parent / "bench-devset"
    for name, (kind, turns) in SMALL_SET.items():
        if not (folder / f"{name}.json").exists():
            print(f"no devset: making {folder / name}.wav with Piper (once) ...", file=sys.stderr, flush=True)
            write_devset_file(folder, name, kind, turns)
    return folder


def write_devset_file(folder: Path, name: str, kind: str, turns: list[tuple[str, str]]) -> None:
    """<name>.wav and <name>.json in devset format: `turns` of (speaker A or B, text) spoken by Piper."""
    from jetscribe.evaluation.speech import dialog, write_wav

    folder.mkdir(parents=True, exist_ok=True)
    speech = dialog(turns, gap_s=0.7, lead_s=0.6, tail_s=0.0)
    write_wav(folder / f"{name}.wav", speech)
    meta = {
        "text": speech.text,
        "kind": kind,
        "synthetic": True,
        "sample_rate": speech.sample_rate,
        "duration": round(speech.duration_s, 3),
        "voices": {"A": "piper joe", "B": "piper joe-high"},
        "turns": [
            {"speaker": t.speaker, "start": round(t.start_s, 3), "end": round(t.end_s, 3), "text": t.text}
            for t in speech.turns
        ],
    }
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def session_id(name: str, suffix: str) -> str:
    """A session id for a file's run: its name cut to fit, then `suffix` (ids are 1-64 of [A-Za-z0-9_-])."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[: 63 - len(suffix)]}-{suffix}"


# --- the stack -------------------------------------------------------------------------------------
@contextmanager
def local_stack(home: Path, model: str, extra_env: dict[str, str] | None = None, **options) -> Iterator:
    """A `LocalStack` with its services logging at WARNING (unless JETSCRIBE_LOG_LEVEL says otherwise), stopped on
    any exit. `options` go to LocalStack as they are."""
    from jetscribe.devstack.stack import LocalStack

    env = {"JETSCRIBE_LOG_LEVEL": os.environ.get("JETSCRIBE_LOG_LEVEL", "WARNING"), **(extra_env or {})}
    print(f"starting the stack in {home} with model {model} ...", file=sys.stderr, flush=True)
    with LocalStack(home, model=model, extra_env=env, **options) as stack:
        connect_as_root(stack)
        yield stack


def run_on_servers(args, work: Callable[[str, object], Awaitable[T]], extra_env: dict[str, str] | None = None) -> T:
    """Run `work(nats_url, stack)` on the servers the arguments ask for: with --external the running ones (stack
    None; --nats-url / --database-url or the stack in this folder), else a throwaway `local_stack` of --model."""
    use_servers(args.nats_url, args.database_url)
    if args.external:
        from jetscribe.devstack.stack import nats_url

        return asyncio.run(work(nats_url(), None))
    with (
        tempfile.TemporaryDirectory(prefix="jetscribe-bench-") as home,
        local_stack(Path(home), args.model, extra_env=extra_env) as local,  # stopped on any exit
    ):
        return asyncio.run(work(local.nats_url, local))


def connect_as_root(stack) -> None:
    """The benchmark's own connections (bots of many tenants, purges, stats) use a user allowed everything, made in
    the stack's keys for it (NATS_CREDS, so generator processes inherit it); the services keep their own users."""
    if stack.nats is None or stack.nats.keyring is None:
        return  # NATS of someone else's: NATS_CREDS is the user they gave
    os.environ["NATS_CREDS"] = str(stack.nats.keyring.ensure_root())
    stack.nats.reload()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--nats-url, --database-url, --external: which servers and services a benchmark uses (`use_servers`)."""
    parser.add_argument("--nats-url", help="use this NATS server (default $NATS_URL, else start one)")
    parser.add_argument("--database-url", help="use this PostgreSQL (default $DATABASE_URL, else start one)")
    parser.add_argument(
        "--external", action="store_true", help="start nothing: use the services already running against --nats-url"
    )


def use_servers(nats_url: str | None, database_url: str | None) -> None:
    """--nats-url / --database-url: LocalStack then uses those servers instead of starting its own."""
    for flag, var in ((nats_url, "NATS_URL"), (database_url, "DATABASE_URL")):
        if flag:
            os.environ[var] = flag


class Watchdog:
    """Awaits a benchmark's coroutines so that a local service that dies fails the run, not leaves it waiting.
    With no stack (services started elsewhere), it only awaits."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self._task: asyncio.Future | None = None

    async def __aenter__(self) -> Watchdog:
        self._task = asyncio.ensure_future(self._watch() if self.stack else asyncio.Event().wait())
        return self

    async def __aexit__(self, *exc_info) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            self.stack.check()
            await asyncio.sleep(1.0)

    async def run(self, coro: Awaitable[T]) -> T:
        """`coro`'s result; raises what stopped a service if one died first."""
        assert self._task is not None, "use the watchdog in `async with`"
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # a service died, or Ctrl-C: let the bot unsubscribe before NATS closes
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return task.result() if task in done else self._task.result()


async def warm_up(nc, watchdog: Watchdog, item: Item, tenant: str, language: str, run: str, sessions: int = 1) -> None:
    """Not measured: the transcriber loads its model, and its first decodes are slow. Several `sessions` at once
    spread over the partitions, so that several transcribers all get some."""
    warm = Audio(item.audio.samples[: item.audio.sample_rate * 3], item.audio.sample_rate)
    print("warming up the transcriber ...", file=sys.stderr, flush=True)
    await watchdog.run(
        asyncio.gather(
            *[
                stream_audio(nc, warm, tenant=tenant, session_id=f"warmup-{run}-{i}", speed=0.0, language=language)
                for i in range(sessions)
            ]
        )
    )


# --- what a bot saw -----------------------------------------------------------------------------------
def segment_latencies(result: StreamResult, sample_rate: int) -> tuple[list[dict], list[float]]:
    """The finals with words, each with its latency (received by the bot minus the send time of the chunk holding
    its last word's end; `latency_published` from the worker's `published_at`), and the first-interim latency of
    every segment that had an interim with words (minus the send time of its first word's end)."""
    per_chunk = result.frames_per_chunk
    final_at, first_interim = {}, {}
    for received, seg in result.heard:
        if seg.status == "final":
            final_at.setdefault(seg.segment_id, received)
        elif seg.words:
            first_interim.setdefault(seg.segment_id, (received, seg))
    segments = []
    for seg in result.final_segments():
        if not seg.words:
            continue
        sent = send_time(seg.words[-1].end, result.sent_by_seq, sample_rate, per_chunk)
        segments.append(
            {
                "id": seg.segment_id,
                "start": seg.start,
                "end": seg.end,
                "text": seg.text,
                "latency": round(final_at[seg.segment_id] - sent, 3),
                "latency_published": round(seg.published_at - sent, 3),
            }
        )
    interims = [
        round(received - send_time(seg.words[0].end, result.sent_by_seq, sample_rate, per_chunk), 3)
        for received, seg in first_interim.values()
    ]
    # The finals one decode published together (a final split where the speaker changes: its parts arrive within
    # UTTERANCE_GAP_S of each other) are one utterance: its latency runs from the send time of its last word, so a
    # split does not count as later words that were never held back (each part's own latency is `latency`).
    group: list[dict] = []
    for seg_dict, received in sorted(((d, final_at[d["id"]]) for d in segments), key=lambda x: (x[1], x[0]["end"])):
        if group and received - final_at[group[-1]["id"]] > UTTERANCE_GAP_S:
            _utterance_latency(group, final_at)
            group = []
        group.append(seg_dict)
    if group:
        _utterance_latency(group, final_at)
    return segments, interims


UTTERANCE_GAP_S = 0.1


def _utterance_latency(group: list[dict], final_at: dict) -> None:
    last = max(group, key=lambda d: d["end"])
    latency = round(max(final_at[d["id"]] for d in group) - (final_at[last["id"]] - last["latency"]), 3)
    for k, d in enumerate(group):
        d["latency_utterance"] = latency if k == 0 else None  # one value per utterance


# --- reports ---------------------------------------------------------------------------------------
def transcriber_settings(cfg: TranscriberConfig) -> dict:
    """The transcriber settings a benchmark's results depend on, for its JSON."""
    return {
        "beam_size": cfg.beam_size,
        "interim_beam_size": cfg.interim_beam_size,
        "endpoint_silence_s": cfg.endpoint_silence_s,
        "max_utterance_s": cfg.max_utterance_s,
        "interim_every_s": cfg.interim_every_s,
        "vad": cfg.vad,
        "vad_threshold": cfg.vad_threshold,
        "vad_aggressiveness": cfg.vad_aggressiveness,
        "vad_above_floor_db": cfg.vad_above_floor_db,
        "device": cfg.device,
        "compute_type": cfg.compute_type,
        "cpu_threads": cfg.cpu_threads,
    }


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(head: tuple[str, ...], rows: list[tuple[str, ...]], total: tuple[str, ...] | None = None) -> str:
    """Aligned columns (the first left, the others right), a rule under the head, and one above `total`."""
    every = [head, *rows, *([total] if total else [])]
    widths = [max(len(r[i]) for r in every) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, rows), *([rule, line(total)] if total else [])])


def interrupted(signum, frame):
    raise KeyboardInterrupt  # like Ctrl-C: unwinds through LocalStack, which stops every child
