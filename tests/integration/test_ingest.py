"""The gateway against a real nats-server: good audio is stored once, bad input gets a clear error."""
import asyncio
import time
import uuid

import msgspec
import nats
import numpy as np
import pytest

from services.ingest.app import run as run_ingest
from shared import subjects
from shared.config import IngestConfig, StreamSettings
from shared.wire import AudioChunk, AudioMessage, ErrorEvent, Reply, SessionControl, decode, encode


@pytest.fixture
async def gateway(nats_url):
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(StreamSettings(nats_url=nats_url), IngestConfig(), stop))
    nc = await nats.connect(nats_url)
    for _ in range(50):  # wait until the gateway answers
        try:
            await nc.request(subjects.ingest_session("probe", "probe"), b"", timeout=0.2)
            break
        except Exception:
            await asyncio.sleep(0.1)
    yield nc
    await nc.close()
    stop.set()
    await task


async def ask(nc, subject, message) -> Reply:
    data = message if isinstance(message, bytes) else encode(message)
    return decode((await nc.request(subject, data, timeout=5)).data, Reply)


def chunk(tenant, session, seq, **overrides):
    fields = dict(tenant=tenant, session_id=session, seq=seq, sent_at=time.time(), sample_rate=16000, channels=1,
                  encoding="pcm_s16le", payload=np.zeros(1600, "<i2").tobytes())
    return AudioChunk(**{**fields, **overrides})


async def stored_audio(js, tenant, session):
    sub = await js.subscribe(subjects.audio_of_session(tenant, session), stream=subjects.AUDIO_STREAM,
                             ordered_consumer=True)
    out = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except nats.errors.TimeoutError:
            break
        out.append((msg.subject, decode(msg.data, AudioMessage)))
    await sub.unsubscribe()
    return out


async def test_good_session_is_stored_once_in_order_on_one_partition(gateway):
    nc, tenant, session = gateway, "acme", f"s{uuid.uuid4().hex[:8]}"
    assert (await ask(nc, subjects.ingest_session(tenant, session),
                      SessionControl(tenant=tenant, session_id=session, action="start"))).ok
    for seq in range(5):
        reply = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))
        assert reply.ok and reply.last_seq == seq
    repeat = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 3))
    assert repeat.ok and repeat.last_seq == 4  # answered ok, not stored again
    # A reconnecting bot learns where it left off from a new start.
    again = await ask(nc, subjects.ingest_session(tenant, session),
                      SessionControl(tenant=tenant, session_id=session, action="start"))
    assert again.ok and again.last_seq == 4
    end = SessionControl(tenant=tenant, session_id=session, action="end")
    assert (await ask(nc, subjects.ingest_session(tenant, session), end)).ok
    assert (await ask(nc, subjects.ingest_session(tenant, session), end)).ok  # a retried end is fine
    stored = await stored_audio(nc.jetstream(), tenant, session)
    seqs = [m.seq for _, m in stored if isinstance(m, AudioChunk)]
    assert seqs == [0, 1, 2, 3, 4]
    assert [m.action for _, m in stored if isinstance(m, SessionControl)] == ["start", "end"]
    partitions = {subject.split(".")[3] for subject, _ in stored}
    assert len(partitions) == 1 and 0 <= int(partitions.pop()) < 16


async def test_48k_stereo_is_stored_as_16k_mono(gateway):
    nc, tenant, session = gateway, "acme", f"s{uuid.uuid4().hex[:8]}"
    await ask(nc, subjects.ingest_session(tenant, session), SessionControl(tenant=tenant, session_id=session,
                                                                           action="start"))
    stereo = np.zeros((4800, 2), "<f4")
    reply = await ask(nc, subjects.ingest_audio(tenant, session),
                      chunk(tenant, session, 0, sample_rate=48000, channels=2, encoding="pcm_f32le",
                            payload=stereo.tobytes()))
    assert reply.ok
    (_, stored), = [x for x in await stored_audio(nc.jetstream(), tenant, session) if isinstance(x[1], AudioChunk)]
    assert (stored.sample_rate, stored.channels, stored.encoding) == (16000, 1, "pcm_s16le")


async def test_bad_input_gets_a_clear_error_and_the_gateway_keeps_serving(gateway):
    nc, tenant, session = gateway, "badco", f"s{uuid.uuid4().hex[:8]}"
    errors = await nc.subscribe(subjects.errors("ingest", tenant))
    audio_subject = subjects.ingest_audio(tenant, session)

    bad_language = await ask(nc, subjects.ingest_session(tenant, session),
                             SessionControl(tenant=tenant, session_id=session, action="start", language="english"))
    assert bad_language.code == "bad_language"
    assert decode((await errors.next_msg(timeout=2)).data, ErrorEvent).code == "bad_language"
    unknown = await ask(nc, audio_subject, chunk(tenant, session, 0))
    assert not unknown.ok and unknown.code == "unknown_session" and "never started" in unknown.message
    assert decode((await errors.next_msg(timeout=2)).data, ErrorEvent).code == "unknown_session"

    await ask(nc, subjects.ingest_session(tenant, session), SessionControl(tenant=tenant, session_id=session,
                                                                           action="start"))
    raw = msgspec.structs.asdict(chunk(tenant, session, 0))
    raw.update(type="audio", v=99)
    cases = {
        "not_msgpack": b"\xc1 this is not msgpack",
        "unsupported_version": msgspec.msgpack.encode(raw),
        "bad_sample_rate": encode(chunk(tenant, session, 0, sample_rate=0)),
        "too_large": encode(chunk(tenant, session, 0, payload=b"\x00" * 10_000_000)),
        "seq_gap": encode(chunk(tenant, session, 7)),
    }
    next_good = 0
    for code, data in cases.items():
        reply = await ask(nc, audio_subject, data)
        assert not reply.ok and reply.code == code and reply.message
        event = decode((await errors.next_msg(timeout=2)).data, ErrorEvent)
        assert event.code == code and event.tenant == tenant
        good = await ask(nc, audio_subject, chunk(tenant, session, next_good))
        assert good.ok and good.last_seq == next_good, code
        next_good += 1
    seqs = [m.seq for _, m in await stored_audio(nc.jetstream(), tenant, session) if isinstance(m, AudioChunk)]
    assert seqs == list(range(next_good))  # nothing bad was stored, nothing good was lost


async def test_restarted_gateway_learns_last_seq_from_the_stream(nats_url):
    settings, tenant, session = StreamSettings(nats_url=nats_url), "acme", f"s{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_url)
    for round_ in range(2):
        stop = asyncio.Event()
        task = asyncio.create_task(run_ingest(settings, IngestConfig(), stop))
        await asyncio.sleep(0.3)
        if round_ == 0:
            await ask(nc, subjects.ingest_session(tenant, session),
                      SessionControl(tenant=tenant, session_id=session, action="start"))
            for seq in range(3):
                assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
        else:
            gap = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))
            assert gap.code == "seq_gap" and gap.last_seq == 2
            assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 1))).last_seq == 2
            assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 3))).ok
        stop.set()
        await task
    await nc.close()
