"""The three services in this process against real servers, registered on the NATS micro-services API."""

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import nats

from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import Segment, Word

NAMES = ("jetscribe-ingest", "jetscribe-persister", "jetscribe-transcriber")
PARTITIONS = StreamSettings().partitions


async def gather_replies(nc, subject: str, wait_s: float = 0.5) -> list[dict]:
    """Every JSON reply to one request within `wait_s`: the micro API answers once per instance."""
    replies: list[dict] = []

    async def collect(msg):
        if msg.data:  # an empty message is the server's "no responders" status: no service is registered yet
            replies.append(json.loads(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait_s)
    await sub.unsubscribe()
    return replies


def endpoint_data(stats_reply: dict, endpoint: str) -> dict:
    return next(e["data"] for e in stats_reply["endpoints"] if e["name"] == endpoint)


async def wait_all_ready(nc, tasks=(), workers: int = 1, deadline_s: float = 60.0) -> list[dict]:
    """$SRV.STATS until a gateway, a persister and `workers` transcribers answer ready, and the workers hold every
    partition between them, each once (a service task that ended meanwhile raises its error)."""
    deadline = time.monotonic() + deadline_s
    while True:
        for task in tasks:
            if task.done():
                task.result()
                raise AssertionError(f"a service stopped before it was ready: {task}")
        replies = await gather_replies(nc, "$SRV.STATS", 0.3)
        ready = Counter(r["name"] for r in replies if endpoint_data(r, "health").get("ready"))
        held = [p for r in replies if r["name"] == NAMES[2] for p in endpoint_data(r, "stats").get("partitions", [])]
        if set(ready) >= set(NAMES) and ready[NAMES[2]] == workers and sorted(held) == list(range(PARTITIONS)):
            return replies
        assert time.monotonic() < deadline, f"not ready in {deadline_s} s: {replies}"


@contextlib.asynccontextmanager
async def running_services(nats_url: str, database_url: str, model, *worker_ids: str):
    """Ingest, a transcriber per worker id (all on the given tiny.en model) and the persister; yields a client
    once all report ready and the workers have shared out the partitions."""
    upgrade(database_url)
    settings = StreamSettings(nats_url=nats_url)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
        asyncio.create_task(run_persister(settings, PersisterConfig(database_url=database_url), stop)),
    ]
    for worker_id in worker_ids:
        config = TranscriberConfig(
            model="tiny.en", worker_id=worker_id, heartbeat_s=0.5, lease_ttl_s=2, speakers_audio="off"
        )
        tasks.append(asyncio.create_task(run_transcriber(settings, config, stop, model=model)))
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        await wait_all_ready(nc, tasks, workers=len(worker_ids))
        yield nc
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def persister_process(nats_url: str, database_url: str):
    """`python -m jetscribe.services.persister` on these servers, stderr piped; killed if it still runs at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jetscribe.services.persister",
        env={**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url},
        cwd=Path(__file__).parents[2],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def two_word_final(tenant: str, session: str, first: str, second: str) -> Segment:
    """A final of two words ("first second", 0-0.9 s) as a transcriber publishes it: what the Postgres tests store."""
    return Segment(
        tenant=tenant,
        session_id=session,
        segment_id=0,
        revision=0,
        status="final",
        start=0.0,
        end=0.9,
        text=f"{first} {second}",
        words=[Word(first, 0.0, 0.4, 0.9), Word(second, 0.4, 0.9, 0.9)],
        model="base",
        worker_id="w1",
        published_at=1_700_000_000.0,
    )
