"""The transcriber's limits and lifecycle on a real nats-server: idle sessions end, sessions beyond
a worker's limit or buffer are rejected, and the bot hears it from the gateway."""
import asyncio
import contextlib
import time
import uuid

import nats
import numpy as np
import pytest

from jetscribe.servers import NatsServer
from jetscribe.speech import sample_speech
from services.ingest.app import run as run_ingest
from services.transcriber.app import run as run_transcriber
from services.transcriber.model import load_model
from shared import subjects
from shared.config import IngestConfig, StreamSettings, TranscriberConfig
from shared.wire import AudioChunk, Reply, Segment, SessionControl, SessionEvent, decode, encode


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    """Its own server: the consumer group's leases and consumers are per server."""
    with NatsServer(tmp_path_factory.mktemp("limits-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny.en")


@contextlib.asynccontextmanager
async def pipeline(url, tiny, **transcriber):
    settings = StreamSettings(nats_url=url)
    config = TranscriberConfig(model="tiny.en", worker_id=f"w-{uuid.uuid4().hex[:6]}", heartbeat_s=0.5,
                               lease_ttl_s=2, **transcriber)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
             asyncio.create_task(run_transcriber(settings, config, stop, model=tiny))]
    nc = await nats.connect(url)
    try:
        await asyncio.sleep(1.0)  # the worker takes its partitions
        yield nc
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


async def ask(nc, subject, message) -> Reply:
    return decode((await nc.request(subject, encode(message), timeout=5)).data, Reply)


async def send(nc, tenant, session, samples, first_seq=0):
    seq = first_seq
    for off in range(0, len(samples), 1600):
        reply = await ask(nc, subjects.ingest_audio(tenant, session), AudioChunk(
            tenant=tenant, session_id=session, seq=seq, sent_at=time.time(), sample_rate=16000, channels=1,
            encoding="pcm_s16le", payload=samples[off:off + 1600].astype("<i2").tobytes()))
        if not reply.ok:
            return reply
        seq += 1
    return None


async def watch_event(nc, tenant, session, event):
    """Subscribe now; `await` the result for the event."""
    sub = await nc.subscribe(subjects.session_event(tenant, session, event))

    async def first(timeout):
        try:
            return decode((await sub.next_msg(timeout=timeout)).data, SessionEvent)
        finally:
            await sub.unsubscribe()
    return first


async def start(nc, tenant, session):
    reply = await ask(nc, subjects.ingest_session(tenant, session),
                      SessionControl(tenant=tenant, session_id=session, action="start", sent_at=time.time()))
    assert reply.ok, reply


async def test_an_idle_session_is_flushed_and_ended(own_nats, tiny):
    speech = sample_speech()
    async with pipeline(own_nats.url, tiny, idle_timeout_s=2.0) as nc:
        ended = await watch_event(nc, "lim", "idle", "ended")
        finals = []

        async def keep(msg):
            finals.append(decode(msg.data, Segment))
        sub = await nc.subscribe(subjects.transcript("lim", "idle"), cb=keep)
        await start(nc, "lim", "idle")
        # Four seconds of speech, cut mid-sentence, then the bot goes quiet without ending the session.
        assert await send(nc, "lim", "idle", speech.audio[:4 * 16000]) is None
        event = await ended(20)
        assert event.reason == "idle_timeout"
        assert any(s.status == "final" and s.text for s in finals)  # what it had heard was flushed
        await sub.unsubscribe()
        # The gateway heard it too: the session is over for the bot.
        reply = await send(nc, "lim", "idle", np.zeros(1600, np.int16), first_seq=40)
        assert reply is not None and reply.code == "session_ended"


async def test_a_session_beyond_the_worker_limit_is_rejected_with_a_reason(own_nats, tiny):
    async with pipeline(own_nats.url, tiny, max_sessions=1) as nc:
        started = await watch_event(nc, "lim", "first", "started")
        await start(nc, "lim", "first")
        await started(20)  # the worker holds it before the second one comes
        rejected = await watch_event(nc, "lim", "second", "rejected")
        await start(nc, "lim", "second")
        event = await rejected(20)
        assert event.reason == "worker_full"
        await asyncio.sleep(0.3)  # the gateway hears the event
        reply = await send(nc, "lim", "second", np.zeros(1600, np.int16))
        assert reply is not None and reply.code == "rejected" and "worker_full" in reply.message
        assert await send(nc, "lim", "first", np.zeros(1600, np.int16)) is None  # the first one goes on


async def test_a_session_whose_audio_piles_up_is_rejected(own_nats, tiny):
    speech = sample_speech()
    async with pipeline(own_nats.url, tiny, max_buffered_s=1.5, max_utterance_s=30.0) as nc:
        rejected = await watch_event(nc, "lim", "flood", "rejected")
        await start(nc, "lim", "flood")
        await send(nc, "lim", "flood", speech.audio[:6 * 16000])
        event = await rejected(20)
        assert event.reason == "buffer_full"
