"""The three services in this process against real servers, registered on the NATS micro-services API."""

import asyncio
import contextlib
import json
import time

import nats

from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig

NAMES = ("jetscribe-ingest", "jetscribe-persister", "jetscribe-transcriber")


async def gather_replies(nc, subject: str, wait_s: float = 0.5) -> list[dict]:
    """Every JSON reply to one request within `wait_s`: the micro API answers once per instance."""
    replies: list[dict] = []

    async def collect(msg):
        replies.append(json.loads(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait_s)
    await sub.unsubscribe()
    return replies


def endpoint_data(stats_reply: dict, endpoint: str) -> dict:
    return next(e["data"] for e in stats_reply["endpoints"] if e["name"] == endpoint)


async def wait_all_ready(nc, tasks=(), deadline_s: float = 60.0) -> list[dict]:
    """$SRV.STATS until one instance of each service answers and its health says ready (a service task that
    ended meanwhile raises its error)."""
    deadline = time.monotonic() + deadline_s
    while True:
        for task in tasks:
            if task.done():
                task.result()
                raise AssertionError(f"a service stopped before it was ready: {task}")
        replies = await gather_replies(nc, "$SRV.STATS", 0.3)
        ready = {r["name"] for r in replies if endpoint_data(r, "health").get("ready")}
        if ready >= set(NAMES):
            return replies
        assert time.monotonic() < deadline, f"not ready in {deadline_s} s: {replies}"


@contextlib.asynccontextmanager
async def running_services(nats_url: str, database_url: str, model, worker_id: str):
    """Ingest, one transcriber (`worker_id`, the given tiny.en model) and the persister; yields a client once
    all three report ready."""
    upgrade(database_url)
    settings = StreamSettings(nats_url=nats_url)
    config = TranscriberConfig(model="tiny.en", worker_id=worker_id, heartbeat_s=0.5, lease_ttl_s=2)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
        asyncio.create_task(run_transcriber(settings, config, stop, model=model)),
        asyncio.create_task(run_persister(settings, PersisterConfig(database_url=database_url), stop)),
    ]
    nc = await nats.connect(nats_url)
    try:
        await wait_all_ready(nc, tasks)
        yield nc
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)
