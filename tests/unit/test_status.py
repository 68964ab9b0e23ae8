"""`jetscribe status`'s pure parts: the snapshot from micro-service answers and consumer info, and its drawing."""

import io
from datetime import UTC, datetime

from rich.console import Console

from jetscribe.cli.status import Observation, _ranges, render, snapshot

AT = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def stats_reply(name: str, instance: str, stats: dict, ready: bool = True, metadata: dict | None = None) -> dict:
    service = name.removeprefix("jetscribe-")
    checks = {"streams": "ok"} if ready else {"streams": "starting"}
    return {
        "type": "io.nats.micro.v1.stats_response",
        "name": name,
        "id": instance,
        "version": "0.1.0",
        "started": "2026-12-01T11:58:30.000Z",
        "metadata": {"host": "h1", "pid": "1", **(metadata or {})},
        "endpoints": [
            {
                "name": "health",
                "subject": f"jetscribe.svc.{service}.{instance}.health",
                "data": {"service": service, "ready": ready, "checks": checks},
            },
            {"name": "stats", "subject": f"jetscribe.svc.{service}.{instance}.stats", "data": stats},
        ],
    }


def worker_stats(worker_id: str, partitions: list[int], sessions: list[tuple[str, str, int, float]], **more) -> dict:
    return {
        "service": "transcriber",
        "worker_id": worker_id,
        "partitions": partitions,
        "sessions": len(sessions),
        "speaking": 1,
        "tenants": {t: sum(1 for s in sessions if s[0] == t) for t, *_ in sessions},
        "session_list": [{"tenant": t, "session": s, "partition": p, "backlog_s": b} for t, s, p, b in sessions],
        "backlog_s": sum(s[3] for s in sessions),
        "decode_busy": 0.42,
        "finals_last_min": 12,
        "final_latency_s": {"p50": 0.8, "p95": 2.5},
        **more,
    }


def observation() -> Observation:
    return Observation(
        at=AT,
        infos=[
            {
                "name": "jetscribe-ingest",
                "id": "G1",
                "description": "gateway",
                "endpoints": [{"name": "health", "subject": "jetscribe.svc.ingest.G1.health"}],
            }
        ],
        stats=[
            stats_reply(
                "jetscribe-transcriber",
                "T2",
                worker_stats(
                    "w2", [2, 3], [("beta", "s9", 2, 0.5)], errors={"malformed": 1}, rejected={"worker_full": 2}
                ),
            ),
            stats_reply(
                "jetscribe-transcriber",
                "T1",
                worker_stats("w1", [0, 1, 3], [("acme", "s1", 0, 4.0), ("acme", "s2", 1, 1.0)]),
            ),
            stats_reply(
                "jetscribe-ingest",
                "G1",
                {
                    "gateway_id": "gw-1",
                    "partitions": list(range(16)),
                    "forwarded": 5,
                    "sessions": 3,
                    "tenants": {"acme": 2, "beta": 1},
                    "chunks_last_min": 600,
                    "audio_s_last_min": 60.0,
                    "refusals": {"seq_gap": 4},
                },
            ),
            stats_reply(
                "jetscribe-persister",
                "P1",
                {"rows_last_min": 80, "write_latency_s": {"p50": 0.01, "p95": 0.05}, "behind_s": 0.0, "dropped": {}},
                ready=False,
            ),
            stats_reply("some-other-service", "X", {}),
        ],
        consumers=[
            {"stream": "AUDIO", "name": f"transcriber-p{p}", "pending": p * 10, "unacked": p, "redelivered": 0}
            for p in (3, 0, 1, 2, 4)
        ]
        + [
            {"stream": "AUDIO", "name": "someone-elses", "pending": 5, "unacked": 0, "redelivered": 0},
            {"stream": "TRANSCRIPTS", "name": "persister", "pending": 7, "unacked": 2, "redelivered": 1},
        ],
    )


def test_snapshot_joins_services_workers_sessions_tenants_and_partitions():
    view = snapshot(observation())
    assert view["at"] == "2026-12-01T12:00:00+00:00"
    assert view["missing"] == []
    assert [(s["service"], s["id"]) for s in view["services"]] == [
        ("ingest", "G1"),
        ("persister", "P1"),
        ("transcriber", "T1"),
        ("transcriber", "T2"),
    ]  # not someone else's
    ingest = view["services"][0]
    assert ingest["uptime_s"] == 90.0 and ingest["description"] == "gateway" and ingest["ready"]
    assert ingest["endpoints"] == ["jetscribe.svc.ingest.G1.health"]
    assert [w["worker_id"] for w in view["workers"]] == ["w1", "w2"]
    assert view["workers"][0]["final_latency_p50_s"] == 0.8 and view["workers"][0]["decode_busy"] == 0.42
    assert [(s["session"], s["worker_id"]) for s in view["sessions"]] == [("s1", "w1"), ("s2", "w1"), ("s9", "w2")]
    assert view["tenants"] == [
        {"tenant": "acme", "sessions": 2, "workers": {"w1": 2}},
        {"tenant": "beta", "sessions": 1, "workers": {"w2": 1}},
    ]
    assert [(p["partition"], p["worker_id"], p["pending"]) for p in view["partitions"]] == [
        (0, "w1", 0),
        (1, "w1", 10),
        (2, "w2", 20),
        (3, "w1,w2", 30),
        (4, "", 40),
    ]  # 3: mid hand-over; 4: nobody
    [gateway] = view["gateways"]
    assert (gateway["id"], gateway["gateway_id"], gateway["forwarded"]) == ("G1", "gw-1", 5)
    [persister] = view["persisters"]
    assert (persister["ready"], persister["consumer_pending"], persister["consumer_unacked"]) == (False, 7, 2)
    assert view["errors"] == [
        {"service": "ingest", "instance": "gw-1", "code": "seq_gap", "count": 4},
        {"service": "transcriber", "instance": "w2", "code": "malformed", "count": 1},
        {"service": "transcriber", "instance": "w2", "code": "rejected: worker_full", "count": 2},
    ]


def test_snapshot_names_the_services_nobody_answers_for():
    view = snapshot(Observation(at=AT, problems=["stream AUDIO does not exist"]))
    assert view["missing"] == ["jetscribe-ingest", "jetscribe-transcriber", "jetscribe-persister"]
    assert view["problems"] == ["stream AUDIO does not exist"]


def test_render_draws_every_table():
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(render(snapshot(observation())))
    text = out.getvalue()
    for title in (
        "services",
        "transcriber workers",
        "sessions per tenant",
        "AUDIO partitions",
        "ingest gateways",
        "persisters",
        "errors by code",
        "sessions (3 of 3",
    ):
        assert title in text, title
    assert "4 of 5 ready" not in text and "3 of 4 ready" in text
    assert "0-1,3" in text and "0-15" in text  # w1's and the gateway's partitions
    assert "streams: starting" in text  # the persister's failing check


def test_partition_ranges():
    assert _ranges([]) == "-"
    assert _ranges([5]) == "5"
    assert _ranges([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
