"""The gateway against a real nats-server: good audio is stored once, bad input gets a clear error."""

import asyncio
import contextlib
import time
import uuid

import msgspec
import nats
import numpy as np
import pytest
import soundfile as sf

from jetscribe.client.bot import Audio, BotError, read_audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_checkpoints
from jetscribe.shared.wire import (
    AudioChunk,
    AudioMessage,
    ErrorEvent,
    Reply,
    SessionCheckpoint,
    SessionControl,
    SessionEvent,
    decode,
    encode,
)


@contextlib.asynccontextmanager
async def running_gateway(nats_url, config=IngestConfig(), settings=None):
    """A gateway in this process, and a client connection once it answers."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(settings or StreamSettings(nats_url=nats_url), config, stop))
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    for _ in range(50):  # wait until the gateway answers
        try:
            await nc.request(subjects.ingest_session("probe", "probe"), b"", timeout=0.2)
            break
        except Exception:
            await asyncio.sleep(0.1)
    try:
        yield nc
    finally:
        await nc.close()
        stop.set()
        await task


@pytest.fixture
async def gateway(nats_url):
    async with running_gateway(nats_url) as nc:
        yield nc


async def ask(nc, subject, message) -> Reply:
    data = message if isinstance(message, bytes) else encode(message)
    return decode((await nc.request(subject, data, timeout=5)).data, Reply)


def chunk(tenant, session, seq, **overrides):
    fields = dict(
        tenant=tenant,
        session_id=session,
        seq=seq,
        sent_at=time.time(),
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=np.zeros(1600, "<i2").tobytes(),
    )
    return AudioChunk(**{**fields, **overrides})


async def stored_audio(js, tenant, session):
    sub = await js.subscribe(
        subjects.audio_of_session(tenant, session), stream=subjects.AUDIO_STREAM, ordered_consumer=True
    )
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
    assert (
        await ask(
            nc,
            subjects.ingest_session(tenant, session),
            SessionControl(tenant=tenant, session_id=session, action="start"),
        )
    ).ok
    for seq in range(5):
        reply = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))
        assert reply.ok and reply.last_seq == seq
    repeat = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 3))
    assert repeat.ok and repeat.last_seq == 4  # answered ok, not stored again
    # A reconnecting bot learns where it left off from a new start.
    again = await ask(
        nc, subjects.ingest_session(tenant, session), SessionControl(tenant=tenant, session_id=session, action="start")
    )
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
    await ask(
        nc, subjects.ingest_session(tenant, session), SessionControl(tenant=tenant, session_id=session, action="start")
    )
    stereo = np.zeros((4800, 2), "<f4")
    reply = await ask(
        nc,
        subjects.ingest_audio(tenant, session),
        chunk(tenant, session, 0, sample_rate=48000, channels=2, encoding="pcm_f32le", payload=stereo.tobytes()),
    )
    assert reply.ok
    ((_, stored),) = [x for x in await stored_audio(nc.jetstream(), tenant, session) if isinstance(x[1], AudioChunk)]
    assert (stored.sample_rate, stored.channels, stored.encoding) == (16000, 1, "pcm_s16le")


async def test_bad_input_gets_a_clear_error_and_the_gateway_keeps_serving(gateway):
    nc, tenant, session = gateway, "badco", f"s{uuid.uuid4().hex[:8]}"
    errors = await nc.subscribe(subjects.errors("ingest", tenant))
    audio_subject = subjects.ingest_audio(tenant, session)

    bad_language = await ask(
        nc,
        subjects.ingest_session(tenant, session),
        SessionControl(tenant=tenant, session_id=session, action="start", language="english"),
    )
    assert bad_language.code == "bad_language"
    assert decode((await errors.next_msg(timeout=2)).data, ErrorEvent).code == "bad_language"
    unknown = await ask(nc, audio_subject, chunk(tenant, session, 0))
    assert not unknown.ok and unknown.code == "unknown_session" and "never started" in unknown.message
    assert decode((await errors.next_msg(timeout=2)).data, ErrorEvent).code == "unknown_session"

    await ask(
        nc, subjects.ingest_session(tenant, session), SessionControl(tenant=tenant, session_id=session, action="start")
    )
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
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    # Each gateway is asked only once it answers: a fixed wait for its start (it settles its partitions before it
    # subscribes) met "no responders" on a loaded host.
    async with running_gateway(nats_url) as nc:
        assert (
            await ask(
                nc,
                subjects.ingest_session(tenant, session),
                SessionControl(tenant=tenant, session_id=session, action="start"),
            )
        ).ok
        for seq in range(3):
            assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
    async with running_gateway(nats_url) as nc:  # restarted: it knows the session from the stream alone
        gap = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))
        assert gap.code == "seq_gap" and gap.last_seq == 2
        assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 1))).last_seq == 2
        assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 3))).ok


def control(tenant, session, action):
    return SessionControl(tenant=tenant, session_id=session, action=action)


async def worker_says(nc, tenant, session, event, reason=""):
    """Publish a session event into TRANSCRIPTS as the transcriber does."""
    message = SessionEvent(tenant=tenant, session_id=session, event=event, at=time.time(), reason=reason)
    await nc.jetstream().publish(subjects.session_event(tenant, session, event), encode(message))


async def eventually(ask_again, done, timeout=3.0):
    """The gateway hears worker events on their own subscription: ask until the answer changes."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await ask_again()
        if done(reply) or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.05)


async def test_a_tenant_over_its_session_limit_is_refused_until_one_ends(nats_url):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    async with running_gateway(nats_url, IngestConfig(max_sessions_per_tenant=2)) as nc:
        errors = await nc.subscribe(subjects.errors("ingest", tenant))
        for session in ("s1", "s2"):
            assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        refused = await ask(nc, subjects.ingest_session(tenant, "s3"), control(tenant, "s3", "start"))
        assert not refused.ok and refused.code == "too_many_sessions" and "limit" in refused.message
        event = decode((await errors.next_msg(timeout=2)).data, ErrorEvent)
        assert (event.code, event.session_id) == ("too_many_sessions", "s3")
        assert (await ask(nc, subjects.ingest_session(tenant, "s1"), control(tenant, "s1", "end"))).ok
        assert (await ask(nc, subjects.ingest_session(tenant, "s3"), control(tenant, "s3", "start"))).ok


async def test_a_session_the_transcriber_rejected_is_refused_with_its_reason(gateway):
    nc, tenant, session = gateway, "acme", f"s{uuid.uuid4().hex[:8]}"
    errors = await nc.subscribe(subjects.errors("ingest", tenant))
    assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
    assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0))).ok
    await worker_says(nc, tenant, session, "rejected", "worker_full")
    # Resending accepted seq 0 is answered ok until the gateway has heard of the rejection.
    reply = await eventually(
        lambda: ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0)), lambda r: not r.ok
    )
    assert (reply.code, reply.last_seq) == ("rejected", 0) and "worker_full" in reply.message
    assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 1))).code == "rejected"
    for action in ("start", "end"):
        assert (
            await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, action))
        ).code == "rejected"
    while True:
        event = decode((await errors.next_msg(timeout=2)).data, ErrorEvent)
        if event.session_id == session and event.code == "rejected":
            break
    assert "worker_full" in event.message


async def test_a_session_the_transcriber_ended_frees_its_slot(nats_url):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    async with running_gateway(nats_url, IngestConfig(max_sessions_per_tenant=1)) as nc:
        assert (await ask(nc, subjects.ingest_session(tenant, "s1"), control(tenant, "s1", "start"))).ok
        assert (
            await ask(nc, subjects.ingest_session(tenant, "s2"), control(tenant, "s2", "start"))
        ).code == "too_many_sessions"
        await worker_says(nc, tenant, "s1", "ended", "idle_timeout")
        reply = await eventually(
            lambda: ask(nc, subjects.ingest_session(tenant, "s2"), control(tenant, "s2", "start")), lambda r: r.ok
        )
        assert reply.ok
        late = await ask(nc, subjects.ingest_audio(tenant, "s1"), chunk(tenant, "s1", 0))
        assert not late.ok and late.code == "session_ended"


async def test_restarted_gateway_learns_a_rejection_from_transcripts(nats_url):
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    async with running_gateway(nats_url) as nc:
        assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0))).ok
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    await worker_says(nc, tenant, session, "rejected", "buffer_full")  # while no gateway runs
    await nc.close()
    async with running_gateway(nats_url) as nc:
        reply = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 1))
        assert (reply.code, reply.last_seq) == ("rejected", 0) and "buffer_full" in reply.message


async def test_a_reconnecting_start_is_not_stored_again_so_a_restarted_gateway_still_knows_the_last_seq(tmp_path):
    tenant, session = "acme", "s1"
    start = control(tenant, session, "start")
    with NatsServer(tmp_path / "nats") as server:  # its own server: a short duplicate window
        settings = StreamSettings(nats_url=server.url, duplicate_window_s=0.3)
        async with running_gateway(server.url, settings=settings) as nc:
            assert (await ask(nc, subjects.ingest_session(tenant, session), start)).ok
            for seq in range(3):
                assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
            await asyncio.sleep(0.5)  # past the duplicate window: the stream would store a repeat now
            assert (await ask(nc, subjects.ingest_session(tenant, session), start)).last_seq == 2
        async with running_gateway(server.url, settings=settings) as nc:
            assert (await ask(nc, subjects.ingest_session(tenant, session), start)).last_seq == 2
            stored = [m for _, m in await stored_audio(nc.jetstream(), tenant, session)]
        assert [m.action if isinstance(m, SessionControl) else m.seq for m in stored] == ["start", 0, 1, 2]


async def test_a_bot_that_crashed_resumes_where_the_gateway_left_off(gateway, nats_url, tmp_path):
    observer, tenant, session = gateway, "acme", f"s{uuid.uuid4().hex[:8]}"
    t = np.arange(3 * 48000) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    sf.write(tmp_path / "call.wav", np.stack([tone, tone], axis=1), 48000)
    audio = read_audio(tmp_path / "call.wav")  # 48 kHz stereo: the gateway's resampler must survive the crash too
    total = 30  # stream_audio's 100 ms chunks

    # The first bot crashes just after the gateway stored chunk 10, before the bot heard the reply.
    stored_ten = asyncio.Event()

    async def on_stored(msg):
        stored = decode(msg.data, AudioMessage)
        if isinstance(stored, AudioChunk) and stored.seq >= 10:
            stored_ten.set()

    watch = await observer.subscribe(subjects.audio(tenant, session), cb=on_stored)
    bot = await nats.connect(nats_url, **env_connect_options(nats_url))
    streaming = asyncio.create_task(stream_audio(bot, audio, tenant=tenant, session_id=session, speed=0))
    await asyncio.wait_for(stored_ten.wait(), 10)
    streaming.cancel()  # no end is sent
    with contextlib.suppress(asyncio.CancelledError):
        await streaming
    await bot.close()
    await watch.unsubscribe()

    # A new connection: the reply it never got is answered again, and nothing is stored twice.
    bot = await nats.connect(nats_url, **env_connect_options(nats_url))
    resent = await ask(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, 10))
    assert resent.ok and resent.last_seq >= 10

    async def transcriber(msg):  # stands in for the transcriber: `ended` once the end is stored
        stored = decode(msg.data, AudioMessage)
        if isinstance(stored, SessionControl) and stored.action == "end":
            await worker_says(observer, tenant, session, "ended")

    fake = await observer.subscribe(subjects.audio(tenant, session), cb=transcriber)
    result = await stream_audio(bot, audio, tenant=tenant, session_id=session, speed=0, wait_s=10)
    await bot.close()
    await fake.unsubscribe()
    assert len(result.sent_at) == total - (resent.last_seq + 1)  # the resumed bot sent only the rest

    stored = [m for _, m in await stored_audio(observer.jetstream(), tenant, session)]
    seqs = [m.seq for m in stored if isinstance(m, AudioChunk)]
    assert seqs == list(range(len(seqs))) and len(seqs) in (total, total + 1)  # + the resampler's flushed tail
    assert [m.action for m in stored if isinstance(m, SessionControl)] == ["start", "end"]
    samples = sum(len(m.payload) // 2 for m in stored if isinstance(m, AudioChunk))
    assert abs(samples - 3 * 16000) <= 16


async def test_a_bot_hears_of_a_rejection_that_comes_after_its_end(gateway, nats_url):
    observer, tenant, session = gateway, "acme", f"s{uuid.uuid4().hex[:8]}"

    async def transcriber(msg):  # rejects the session only once its end is stored
        stored = decode(msg.data, AudioMessage)
        if isinstance(stored, SessionControl) and stored.action == "end":
            await worker_says(observer, tenant, session, "rejected", "buffer_full")

    fake = await observer.subscribe(subjects.audio(tenant, session), cb=transcriber)
    bot = await nats.connect(nats_url, **env_connect_options(nats_url))
    with pytest.raises(BotError) as err:
        await stream_audio(
            bot, Audio(np.zeros(3200, "<i2"), 16000), tenant=tenant, session_id=session, speed=0, wait_s=10
        )
    assert err.value.reply.code == "rejected" and "buffer_full" in str(err.value)
    await bot.close()
    await fake.unsubscribe()


async def age_out_audio(nats_url, tenant, session):
    """What AUDIO's max age does to a session's audio, at once."""
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    await nc.jetstream().purge_stream(subjects.AUDIO_STREAM, subject=subjects.audio_of_session(tenant, session))
    await nc.close()


async def stream_ended_session(nats_url, tenant, session, chunks=3):
    async with running_gateway(nats_url) as nc:
        assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        for seq in range(chunks):
            assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
        assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "end"))).ok


async def test_a_reused_session_id_is_refused_after_its_audio_aged_out_and_the_gateway_restarted(nats_url):
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    await stream_ended_session(nats_url, tenant, session)
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    await worker_says(nc, tenant, session, "ended")
    await nc.close()
    await age_out_audio(nats_url, tenant, session)
    async with running_gateway(nats_url) as nc:
        again = await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))
        assert (again.ok, again.code) == (False, "session_ended")
        late = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 0))
        assert (late.ok, late.code) == (False, "session_ended")
        assert await stored_audio(nc.jetstream(), tenant, session) == []  # nothing of the reuse was stored


async def test_a_reused_session_id_is_refused_from_the_transcribers_checkpoint_alone(nats_url):
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    await stream_ended_session(nats_url, tenant, session)
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    checkpoints = await ensure_checkpoints(nc.jetstream(), StreamSettings(nats_url=nats_url))
    await checkpoints.put(
        subjects.checkpoint_key(tenant, session),
        encode(SessionCheckpoint(tenant=tenant, session_id=session, acked_seq=2, finished=True)),
    )
    await nc.close()
    await age_out_audio(nats_url, tenant, session)
    async with running_gateway(nats_url) as nc:
        again = await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))
        assert (again.ok, again.code, again.last_seq) == (False, "session_ended", 2)


async def test_a_refusal_not_about_the_seq_answers_the_last_accepted_seq(nats_url):
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    audio_subject = subjects.ingest_audio(tenant, session)
    garbage = {
        "not_msgpack": b"\xc1 this is not msgpack",
        "malformed": msgspec.msgpack.encode({"type": "audio", "v": 1, "tenant": tenant}),
        "subject_mismatch": encode(chunk(tenant, "another", 3)),
    }
    async with running_gateway(nats_url) as nc:
        assert (await ask(nc, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        for seq in range(3):
            assert (await ask(nc, audio_subject, chunk(tenant, session, seq))).ok
        for code, data in garbage.items():
            reply = await ask(nc, audio_subject, data)
            assert (reply.code, reply.last_seq) == (code, 2)
        reply = await ask(nc, subjects.ingest_session(tenant, session), b"\xc1")
        assert (reply.code, reply.last_seq) == ("not_msgpack", 2)
    async with running_gateway(nats_url) as nc:  # a restarted gateway learns it from the stream first
        for code, data in garbage.items():
            reply = await ask(nc, audio_subject, data)
            assert (reply.code, reply.last_seq) == (code, 2)
        never = await ask(nc, subjects.ingest_audio(tenant, "never-started"), b"\xc1")
        assert (never.code, never.last_seq) == ("not_msgpack", -1)
