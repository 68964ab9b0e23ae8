"""The transcriber's limits and lifecycle on a real nats-server: idle sessions end (and only idle ones),
sessions beyond a worker's limit or buffer are rejected, the bot hears it from the gateway, and audio
for a finished session is reported."""

import asyncio
import contextlib
import time
import uuid

import nats
import numpy as np
import pytest

from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.model import load_model
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import ErrorEvent, Segment, SessionControl, SessionEvent, decode, encode
from tests.integration.test_ingest import ask, chunk, eventually
from tests.integration.test_session_options import until_serving


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
    config = TranscriberConfig(
        model="tiny.en",
        worker_id=f"w-{uuid.uuid4().hex[:6]}",
        heartbeat_s=0.5,
        lease_ttl_s=2,
        **{"speakers_audio": "off", **transcriber},
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
        asyncio.create_task(run_transcriber(settings, config, stop, model=tiny)),
    ]
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        await until_serving(nc, tasks)  # the tests ask the gateway at once, with no retry
        yield nc
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


async def send(nc, tenant, session, samples, first_seq=0):
    seq = first_seq
    for off in range(0, len(samples), 1600):
        payload = samples[off : off + 1600].astype("<i2").tobytes()
        reply = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq, payload=payload))
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
    reply = await ask(
        nc,
        subjects.ingest_session(tenant, session),
        SessionControl(tenant=tenant, session_id=session, action="start", sent_at=time.time()),
    )
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
        assert await send(nc, "lim", "idle", speech.audio[: 4 * 16000]) is None
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
        # The gateway hears the event on a subscription of its own, maybe after this test did: the same chunk is
        # answered ok (stored once) until it has.
        reply = await eventually(
            lambda: ask(nc, subjects.ingest_audio("lim", "second"), chunk("lim", "second", 0)), lambda r: not r.ok
        )
        assert reply.code == "rejected" and "worker_full" in reply.message
        assert await send(nc, "lim", "first", np.zeros(1600, np.int16)) is None  # the first one goes on


async def test_a_session_whose_audio_piles_up_is_rejected(own_nats, tiny):
    speech = sample_speech()
    async with pipeline(own_nats.url, tiny, max_buffered_s=1.5, max_utterance_s=30.0) as nc:
        rejected = await watch_event(nc, "lim", "flood", "rejected")
        await start(nc, "lim", "flood")
        await send(nc, "lim", "flood", speech.audio[: 6 * 16000])
        event = await rejected(20)
        assert event.reason == "buffer_full"


async def test_a_bot_that_sends_its_first_chunk_late_keeps_its_session(own_nats, tiny):
    """Regression: a session with no audio yet counted as idle since the host booted, and was ended at once."""
    async with pipeline(own_nats.url, tiny, idle_timeout_s=5.0) as nc:
        started = await watch_event(nc, "lim", "late", "started")
        await start(nc, "lim", "late")
        await started(20)
        ended = await watch_event(nc, "lim", "late", "ended")
        await asyncio.sleep(2.5)  # a meeting bot in a silent room
        assert await send(nc, "lim", "late", np.zeros(16000, np.int16)) is None
        with pytest.raises(nats.errors.TimeoutError):
            await ended(1.5)
        assert await send(nc, "lim", "late", np.zeros(16000, np.int16), first_seq=10) is None


async def test_an_idle_session_with_nothing_to_decode_ends_and_frees_its_slot(tmp_path, tiny):
    """Regression: `ended` went out only from a later decode or message, so a bot that vanished after
    silence left its session active and its slot taken until the worker restarted."""
    with NatsServer(tmp_path / "nats") as fresh:  # no sessions left over by other tests
        async with pipeline(fresh.url, tiny, idle_timeout_s=2.0, max_sessions=1) as nc:
            ended = await watch_event(nc, "lim", "vanished", "ended")
            await start(nc, "lim", "vanished")
            assert await send(nc, "lim", "vanished", np.zeros(8000, np.int16)) is None  # a little audio, then gone
            event = await ended(20)
            assert event.reason == "idle_timeout" and event.chunks_received == 5
            started = await watch_event(nc, "lim", "next", "started")
            await start(nc, "lim", "next")
            assert (await started(20)).event == "started"  # the slot is free: not worker_full


async def test_audio_for_a_finished_session_is_reported_once(own_nats, tiny):
    """Regression: audio stored for an ended session id was acked away with no word to anyone."""
    async with pipeline(own_nats.url, tiny) as nc:
        ended = await watch_event(nc, "lim", "reused", "ended")
        await start(nc, "lim", "reused")
        assert await send(nc, "lim", "reused", np.zeros(3200, np.int16)) is None
        reply = await ask(
            nc,
            subjects.ingest_session("lim", "reused"),
            SessionControl(tenant="lim", session_id="reused", action="end", sent_at=time.time()),
        )
        assert reply.ok
        await ended(20)
        errors = await nc.subscribe(subjects.errors("transcriber", "lim"))
        js = nc.jetstream()
        # The same id used again, stored as a gateway that no longer remembers it would store it.
        again = [SessionControl(tenant="lim", session_id="reused", action="start", sent_at=time.time())]
        again += [chunk("lim", "reused", seq) for seq in range(3)]
        for i, message in enumerate(again):
            await js.publish(
                subjects.audio("lim", "reused"), encode(message), headers={"Nats-Msg-Id": f"lim:reused:again:{i}"}
            )
        error = decode((await errors.next_msg(timeout=20)).data, ErrorEvent)
        assert (error.code, error.session_id) == ("session_ended", "reused")
        with pytest.raises(nats.errors.TimeoutError):
            await errors.next_msg(timeout=2)  # once per session, not per chunk
        await errors.unsubscribe()


async def test_audio_whose_tenant_differs_from_its_subject_is_refused_and_the_session_goes_on(own_nats, tiny):
    """The transcriber trusts the subject (what NATS permissions check), not the payload: audio stored on
    tenant `lim`'s subject but claiming tenant `other` is reported on errors.transcriber.lim and dropped, and the
    session's own audio around it is still transcribed to its end."""
    async with pipeline(own_nats.url, tiny) as nc:
        errors = await nc.subscribe(subjects.errors("transcriber", "lim"))
        ended = await watch_event(nc, "lim", "mixed", "ended")
        await start(nc, "lim", "mixed")
        assert await send(nc, "lim", "mixed", np.zeros(6400, np.int16)) is None
        # Stored as a client allowed to write AUDIO directly would: another tenant's session in the payload.
        forged = chunk("other", "mixed", 4)
        await nc.jetstream().publish(
            subjects.audio("lim", "mixed"), encode(forged), headers={"Nats-Msg-Id": "lim:mixed:forged"}
        )
        error = decode((await errors.next_msg(timeout=20)).data, ErrorEvent)
        assert error.code == "subject_mismatch" and "other/mixed" in error.message
        reply = await ask(
            nc,
            subjects.ingest_session("lim", "mixed"),
            SessionControl(tenant="lim", session_id="mixed", action="end", sent_at=time.time()),
        )
        assert reply.ok
        event = await ended(20)
        assert event.chunks_received == 4  # the session's own four, not the forged one
        await errors.unsubscribe()
