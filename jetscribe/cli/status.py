"""`jetscribe status`: the running pipeline at a glance, from NATS alone (no Prometheus needed).

Where each number comes from:
- `$SRV.INFO` and `$SRV.STATS` (the NATS micro-services API, `shared/discovery.py`): every running gateway, worker
  and persister, its version, metadata, readiness (the `health` endpoint's data) and activity (the `stats`
  endpoint's data, `shared/activity.py`);
- JetStream consumer info: pending (not yet delivered) and unacked messages of each `transcriber-p<N>` consumer on
  AUDIO and of the `persister` consumer on TRANSCRIPTS.

`observe` asks, `snapshot` turns the answers into one JSON-ready dict (what `--format json` prints), `render`
draws it with rich.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from nats.js.errors import NotFoundError
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from jetscribe.shared import subjects
from jetscribe.shared.discovery import HEALTH_ENDPOINT, STATS_ENDPOINT, service_name

SERVICES = ("ingest", "transcriber", "persister")
REPLY_WAIT_S = 1.0  # how long `$SRV.*` answers are collected: every instance answers, each once
PARTITIONS_PER_ROW = 16
SESSIONS_SHOWN = 20  # the text view lists this many sessions, most backlog first (the JSON lists them all)

Json = dict[str, Any]


@dataclass
class Observation:
    """What NATS answered, as received."""

    at: float  # wall time of the observation
    infos: list[Json] = field(default_factory=list)  # $SRV.INFO replies
    stats: list[Json] = field(default_factory=list)  # $SRV.STATS replies
    consumers: list[Json] = field(default_factory=list)  # {stream, name, pending, unacked, redelivered}
    problems: list[str] = field(default_factory=list)  # what could not be asked (a stream missing...)


async def ask_all(nc: Any, subject: str, wait_s: float = REPLY_WAIT_S) -> list[Json]:
    """Publish one request and collect every JSON reply for `wait_s` (the micro API answers once per instance)."""
    replies: list[Json] = []
    inbox = nc.new_inbox()

    async def collect(msg: Any) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            pass  # not a micro-service answer: nothing to show

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait_s)  # scatter-gather: there is no count of who will answer
    finally:
        await sub.unsubscribe()
    return replies


async def observe(nc: Any, wait_s: float = REPLY_WAIT_S) -> Observation:
    """Ask NATS everything the view shows: the micro-services' INFO and STATS, and the consumers' state."""
    found = Observation(at=time.time())
    found.infos, found.stats = await asyncio.gather(ask_all(nc, "$SRV.INFO", wait_s), ask_all(nc, "$SRV.STATS", wait_s))
    js = nc.jetstream()
    try:
        audio = await js.consumers_info(subjects.AUDIO_STREAM)
        found.consumers += [_consumer(subjects.AUDIO_STREAM, c) for c in audio]
    except NotFoundError:
        found.problems.append(f"stream {subjects.AUDIO_STREAM} does not exist: no service has started on this NATS")
    except Exception as exc:  # JetStream away: say so in the view
        found.problems.append(f"could not read the {subjects.AUDIO_STREAM} consumers: {exc!r}")
    try:
        persister = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
        found.consumers.append(_consumer(subjects.TRANSCRIPTS_STREAM, persister))
    except NotFoundError:
        found.problems.append(f"consumer {subjects.PERSISTER_CONSUMER} does not exist: no persister has started")
    except Exception as exc:
        found.problems.append(f"could not read the {subjects.PERSISTER_CONSUMER} consumer: {exc!r}")
    return found


def _consumer(stream: str, info: Any) -> Json:
    return {
        "stream": stream,
        "name": info.name,
        "pending": info.num_pending or 0,
        "unacked": info.num_ack_pending or 0,
        "redelivered": info.num_redelivered or 0,
    }


def snapshot(found: Observation) -> Json:
    """The view as one JSON-ready dict; pure, so tests feed it answers by hand."""
    ours = {service_name(s): s for s in SERVICES}
    infos = {info.get("id"): info for info in found.infos if info.get("name") in ours}
    instances: list[Json] = []
    for stats in sorted(found.stats, key=lambda s: (s.get("name", ""), s.get("id", ""))):
        if stats.get("name") not in ours:
            continue
        data = {e.get("name"): e.get("data") or {} for e in stats.get("endpoints", [])}
        health, activity = data.get(HEALTH_ENDPOINT, {}), data.get(STATS_ENDPOINT, {})
        info = infos.get(stats.get("id"), {})
        instances.append(
            {
                "service": ours[stats["name"]],
                "id": stats.get("id", ""),
                "version": stats.get("version", ""),
                "description": info.get("description", ""),
                "endpoints": [e.get("subject") for e in info.get("endpoints", [])],
                "metadata": stats.get("metadata") or {},
                "uptime_s": _uptime(stats.get("started"), found.at),
                "ready": bool(health.get("ready")),
                "checks": health.get("checks", {}),
                "stats": activity,
            }
        )
    by_service = defaultdict(list)
    for instance in instances:
        by_service[instance["service"]].append(instance)
    workers = [_worker(i) for i in by_service["transcriber"]]
    return {
        "at": datetime.fromtimestamp(found.at, UTC).isoformat(timespec="seconds"),
        "services": instances,
        "missing": [service_name(s) for s in SERVICES if not by_service[s]],
        "gateways": [_gateway(i) for i in by_service["ingest"]],
        "workers": workers,
        "sessions": _sessions(workers),
        "tenants": _tenants(workers),
        "partitions": _partitions(found.consumers, workers),
        "persisters": _persisters(by_service["persister"], found.consumers),
        "errors": _errors(instances),
        "problems": found.problems,
    }


def _uptime(started: str | None, now: float) -> float | None:
    if not started:
        return None
    try:
        at = datetime.strptime(started, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return round(now - at.timestamp(), 1)


def _worker(instance: Json) -> Json:
    stats, meta = instance["stats"], instance["metadata"]
    latency = stats.get("final_latency_s") or {}
    return {
        "id": instance["id"],
        "worker_id": stats.get("worker_id") or meta.get("worker_id", ""),
        "ready": instance["ready"],
        "model": meta.get("model", ""),
        "device": meta.get("device", ""),
        "partitions": stats.get("partitions", []),
        "sessions": stats.get("sessions", 0),
        "speaking": stats.get("speaking", 0),
        "tenants": stats.get("tenants", {}),
        "session_list": stats.get("session_list", []),
        "backlog_s": stats.get("backlog_s", 0.0),
        "backlog_max_s": stats.get("backlog_max_s", 0.0),
        "decode_busy": stats.get("decode_busy", 0.0),
        "finals_last_min": stats.get("finals_last_min", 0),
        "final_latency_p50_s": latency.get("p50"),
        "final_latency_p95_s": latency.get("p95"),
        "errors": stats.get("errors", {}),
        "rejected": stats.get("rejected", {}),
    }


def _gateway(instance: Json) -> Json:
    stats = instance["stats"]
    return {
        "id": instance["id"],
        "gateway_id": _who(instance),
        "ready": instance["ready"],
        "partitions": stats.get("partitions", []),
        "forwarded": stats.get("forwarded", 0),
        "sessions": stats.get("sessions", 0),
        "tenants": stats.get("tenants", {}),
        "chunks_last_min": stats.get("chunks_last_min", 0),
        "audio_s_last_min": stats.get("audio_s_last_min", 0.0),
        "refusals": stats.get("refusals", {}),
    }


def _sessions(workers: list[Json]) -> list[Json]:
    rows = [{**s, "worker_id": w["worker_id"]} for w in workers for s in w["session_list"]]
    return sorted(rows, key=lambda row: (-row.get("backlog_s", 0.0), row.get("tenant", ""), row.get("session", "")))


def _tenants(workers: list[Json]) -> list[Json]:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for worker in workers:
        for tenant, n in worker["tenants"].items():
            per[tenant][worker["worker_id"]] += n
    return [
        {"tenant": tenant, "sessions": sum(by_worker.values()), "workers": dict(sorted(by_worker.items()))}
        for tenant, by_worker in sorted(per.items())
    ]


def _partitions(consumers: list[Json], workers: list[Json]) -> list[Json]:
    owners: dict[int, list[str]] = defaultdict(list)
    for worker in workers:
        for partition in worker["partitions"]:
            owners[partition].append(worker["worker_id"])
    rows = []
    for consumer in consumers:
        partition = subjects.partition_of_consumer(consumer["name"])
        if consumer["stream"] != subjects.AUDIO_STREAM or partition is None:
            continue
        rows.append(
            {
                "partition": partition,
                "worker_id": ",".join(owners.get(partition, [])),  # two during a hand-over; empty: nobody
                "pending": consumer["pending"],
                "unacked": consumer["unacked"],
                "redelivered": consumer["redelivered"],
            }
        )
    return sorted(rows, key=lambda row: row["partition"])


def _persisters(instances: list[Json], consumers: list[Json]) -> list[Json]:
    consumer = next(
        (
            c
            for c in consumers
            if (c["stream"], c["name"]) == (subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
        ),
        {},
    )
    rows = []
    for instance in instances:
        stats = instance["stats"]
        latency = stats.get("write_latency_s") or {}
        rows.append(
            {
                "id": instance["id"],
                "ready": instance["ready"],
                "rows_last_min": stats.get("rows_last_min", 0),
                "write_latency_p50_s": latency.get("p50"),
                "write_latency_p95_s": latency.get("p95"),
                "behind_s": stats.get("behind_s", 0.0),
                "retries": stats.get("retries", 0),
                "dropped": stats.get("dropped", {}),
                # the consumer is shared by every persister: its lag is the pipeline's, not one instance's
                "consumer_pending": consumer.get("pending"),
                "consumer_unacked": consumer.get("unacked"),
            }
        )
    return rows


def _errors(instances: list[Json]) -> list[Json]:
    """Errors by code, per instance: gateway refusals, worker errors and rejections, persister drops."""
    rows = []
    for instance in instances:
        stats, who = instance["stats"], _who(instance)
        kinds = {"refusals": "", "errors": "", "rejected": "rejected: ", "dropped": "dropped: "}
        for key, prefix in kinds.items():
            for code, count in (stats.get(key) or {}).items():
                rows.append({"service": instance["service"], "instance": who, "code": prefix + code, "count": count})
    return rows


def _who(instance: Json) -> str:
    """A worker's or gateway's own id, else the micro-service instance id."""
    stats, meta = instance["stats"], instance["metadata"]
    for key in ("worker_id", "gateway_id"):
        if found := stats.get(key) or meta.get(key):
            return str(found)
    return str(instance["id"])


# --- drawing ----------------------------------------------------------------------------------------
def render(view: Json) -> RenderableType:
    """The snapshot as rich tables: services, workers, tenants, partitions, gateways, persisters, errors, sessions."""
    parts: list[RenderableType] = [_headline(view), _services_table(view)]
    if view["workers"]:
        parts.append(_workers_table(view["workers"]))
    if view["tenants"]:
        parts.append(_tenants_table(view["tenants"]))
    if view["partitions"]:
        parts.extend(_partitions_tables(view["partitions"], view["workers"]))
    if view["gateways"]:
        parts.append(_gateways_table(view["gateways"]))
    if view["persisters"]:
        parts.append(_persisters_table(view["persisters"]))
    if view["errors"]:
        parts.append(_errors_table(view["errors"]))
    if view["sessions"]:
        parts.append(_sessions_table(view["sessions"]))
    parts += [Text(f"! {problem}", style="yellow") for problem in view["problems"]]
    return Group(*parts)


def _headline(view: Json) -> Text:
    counts = Counter(i["service"] for i in view["services"])
    ready = sum(1 for i in view["services"] if i["ready"])
    line = Text(f"jetscribe status  {view['at']}  ", style="bold")
    line.append(", ".join(f"{counts[s]} {s}" for s in SERVICES) + f"; {ready} of {len(view['services'])} ready")
    if view["missing"]:
        line.append(f"  not answering: {', '.join(view['missing'])}", style="red")
    return line


def _services_table(view: Json) -> Table:
    rows = []
    for i in view["services"]:
        failing = ", ".join(f"{name}: {why}" for name, why in i["checks"].items() if why != "ok")
        meta = i["metadata"]
        rows.append(
            [i["service"], _who(i), meta.get("host", ""), meta.get("metrics_port", "-"), i["version"]]
            + [_yes(i["ready"]), _duration(i["uptime_s"]), failing]
        )
    columns = ["service", "instance", "host", "metrics port", "version", "ready", "up", "checks not ok"]
    return _table("services", columns, rows)


def _workers_table(workers: list[Json]) -> Table:
    columns = ["#", "worker", "ready", "partitions", "sessions", "speaking", "backlog s", "decode busy"]
    columns += ["finals/min", "final p50", "final p95", "errors"]
    rows = [
        [n, w["worker_id"], _yes(w["ready"]), _ranges(w["partitions"]), w["sessions"], w["speaking"]]
        + [f"{w['backlog_s']:.1f}", f"{100 * w['decode_busy']:.0f}%", w["finals_last_min"]]
        + [_seconds(w["final_latency_p50_s"]), _seconds(w["final_latency_p95_s"])]
        + [sum(w["errors"].values()) + sum(w["rejected"].values())]
        for n, w in enumerate(workers, 1)
    ]
    return _table("transcriber workers (last minute)", columns, rows)


def _tenants_table(tenants: list[Json]) -> Table:
    rows = [[t["tenant"], t["sessions"], ", ".join(f"{w}: {n}" for w, n in t["workers"].items())] for t in tenants]
    return _table("sessions per tenant", ["tenant", "sessions", "by worker"], rows)


def _partitions_tables(partitions: list[Json], workers: list[Json]) -> list[Table]:
    """Partitions across, PARTITIONS_PER_ROW at a time: the worker holding each (its # in the workers table),
    and its consumer's lag."""
    number = {w["worker_id"]: str(n) for n, w in enumerate(workers, 1)}
    tables = []
    for first in range(0, len(partitions), PARTITIONS_PER_ROW):
        block = partitions[first : first + PARTITIONS_PER_ROW]
        owners = [",".join(number.get(w, "?") for w in p["worker_id"].split(",") if w) or "-" for p in block]
        rows = [["worker #", *owners]]
        rows += [[key, *(p[key] for p in block)] for key in ("pending", "unacked", "redelivered")]
        title = "AUDIO partitions: transcriber consumers" if first == 0 else ""
        tables.append(_table(title, ["partition", *(str(p["partition"]) for p in block)], rows))
    return tables


def _gateways_table(gateways: list[Json]) -> Table:
    columns = ["gateway", "ready", "partitions", "streaming", "chunks/min", "audio s/min", "forwarded", "refusals"]
    rows = [
        [g["gateway_id"], _yes(g["ready"]), _ranges(g["partitions"]), g["sessions"], g["chunks_last_min"]]
        + [f"{g['audio_s_last_min']:.1f}", g["forwarded"], sum(g["refusals"].values())]
        for g in gateways
    ]
    return _table("ingest gateways", columns, rows)


def _persisters_table(persisters: list[Json]) -> Table:
    columns = ["persister", "ready", "rows/min", "write p50", "write p95", "pending", "unacked", "behind s"]
    columns += ["dropped"]
    rows = [
        [p["id"], _yes(p["ready"]), p["rows_last_min"]]
        + [_seconds(p["write_latency_p50_s"]), _seconds(p["write_latency_p95_s"])]
        + [_number(p["consumer_pending"]), _number(p["consumer_unacked"]), f"{p['behind_s']:.1f}"]
        + [sum(p["dropped"].values())]
        for p in persisters
    ]
    return _table("persisters", columns, rows)


def _errors_table(errors: list[Json]) -> Table:
    rows = [[e["service"], e["instance"], e["code"], e["count"]] for e in errors]
    return _table("errors by code (since each instance started)", ["service", "instance", "code", "count"], rows)


def _sessions_table(sessions: list[Json]) -> Table:
    shown = sessions[:SESSIONS_SHOWN]
    rows = [[s["tenant"], s["session"], s["worker_id"], s["partition"], f"{s['backlog_s']:.1f}"] for s in shown]
    title = f"sessions ({len(shown)} of {len(sessions)}, most backlog first)"
    return _table(title, ["tenant", "session", "worker", "partition", "backlog s"], rows)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:1] else "right", overflow="fold")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else str(cell) for cell in row))
    return table


def _yes(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="red")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _ranges(partitions: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


# --- the command ------------------------------------------------------------------------------------
async def run(
    connect: Callable[[], Awaitable[Any]],
    *,
    once: bool,
    fmt: str,
    every_s: float,
    wait_s: float = REPLY_WAIT_S,
    out: IO[str] | None = None,
) -> int:
    """`jetscribe status`: one snapshot (`once`) as text or JSON, else a live view until Ctrl-C."""
    nc = await connect()
    try:
        if once or fmt == "json":
            view = snapshot(await observe(nc, wait_s))
            if fmt == "json":
                print(json.dumps(view, indent=2), file=out, flush=True)
            else:
                Console(file=out, width=140, soft_wrap=False).print(render(view))
            return 0 if not view["missing"] else 1
        await _live(nc, every_s, wait_s, out)
        return 0
    finally:
        await nc.close()


async def _live(nc: Any, every_s: float, wait_s: float, out: IO[str] | None) -> None:
    from rich.live import Live

    console = Console(file=out)
    with Live(Text("asking NATS..."), console=console, auto_refresh=False, screen=False) as live:
        while True:
            started = time.monotonic()
            live.update(render(snapshot(await observe(nc, wait_s))), refresh=True)
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))
