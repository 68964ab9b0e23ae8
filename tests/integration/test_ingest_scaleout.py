"""Several gateways against a real nats-server: sessions spread over them by partition, each chunk stored once and
in order, a killed gateway's sessions go on through another, and the per-tenant limit counts over all of them."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import nats
import numpy as np

from jetscribe.client.bot import Audio, request, stream_audio
from jetscribe.services.ingest import app as ingest_app
from jetscribe.services.ingest.app import IngestGateway
from jetscribe.services.ingest.core import encode_tenant_sessions
from jetscribe.services.transcriber.partitions import decode_lease
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import AudioChunk, AudioMessage, SessionControl, decode, encode
from tests.integration.test_ingest import ask, chunk, control, stored_audio, worker_says

FAST = dict(heartbeat_s=0.3, lease_ttl_s=1.0)  # a dead gateway's partitions move after about 1.3 s


async def start_gateway(nats_url, gateway_id, **config):
    """A gateway in this process, on its own connection; `stop()` it and close its `nc`."""
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    gateway = IngestGateway(
        nc, StreamSettings(nats_url=nats_url), IngestConfig(gateway_id=gateway_id, **{**FAST, **config})
    )
    await gateway.start()
    return gateway


async def stop_gateway(gateway):
    await gateway.stop()
    await gateway.nc.close()


@contextlib.asynccontextmanager
async def gateways(nats_url, count, **config):
    """`count` gateways in this process, once each holds its share of the partitions."""
    run = uuid.uuid4().hex[:6]
    started = []
    try:
        for i in range(count):
            started.append(await start_gateway(nats_url, f"gw{i}-{run}", **config))
        await until(
            lambda: (
                sum(len(g.group.owned) for g in started) == 16
                and all(len(g.group.owned) >= 16 // count for g in started)
            )
        )
        yield started
    finally:
        for gateway in started:
            await stop_gateway(gateway)


async def until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def owner_of(gws, tenant, session):
    partition = subjects.session_partition(tenant, session, 16)
    (owner,) = [g for g in gws if partition in g.group.owned]
    return owner


async def chunk_seqs(nc, tenant, session):
    return [m.seq for _, m in await stored_audio(nc.jetstream(), tenant, session) if isinstance(m, AudioChunk)]


async def test_two_gateways_share_the_sessions_and_store_every_chunk_once_in_order(nats_url):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    sessions = [f"s{i}" for i in range(12)]
    async with gateways(nats_url, 2) as gws:
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))

        async def one_session(session):
            assert (await ask(bot, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
            for seq in range(8):
                reply = await ask(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))
                assert (reply.ok, reply.last_seq) == (True, seq)
            assert (await ask(bot, subjects.ingest_session(tenant, session), control(tenant, session, "end"))).ok

        await asyncio.gather(*(one_session(s) for s in sessions))
        owners = {owner_of(gws, tenant, s).gateway_id for s in sessions}
        assert len(owners) == 2  # the sessions are spread over both
        assert all(g.forwarded > 0 for g in gws)  # each took requests for the other's partitions and handed them on
        for session in sessions:
            stored = await stored_audio(bot.jetstream(), tenant, session)
            kinds = [m.action if isinstance(m, SessionControl) else m.seq for _, m in stored]
            assert kinds == ["start", *range(8), "end"], session
            # the stream put it where the gateways' own partition function says
            assert {int(subject.split(".")[3]) for subject, _ in stored} == {
                subjects.session_partition(tenant, session, 16)
            }
        await bot.close()


async def test_sessions_go_on_while_a_gateway_joins_and_another_leaves(nats_url):
    tenant, sessions, chunks = f"t{uuid.uuid4().hex[:6]}", [f"s{i}" for i in range(8)], 30
    bot = await nats.connect(nats_url, **env_connect_options(nats_url))
    progress = dict.fromkeys(sessions, 0)

    async def one_session(session):
        assert (await request(bot, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        seq = 0
        while seq < chunks:
            reply = await request(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))
            assert reply.ok or reply.code == "seq_gap", reply
            seq = progress[session] = reply.last_seq + 1
            await asyncio.sleep(0.02)
        assert (await request(bot, subjects.ingest_session(tenant, session), control(tenant, session, "end"))).ok

    leaver = await start_gateway(nats_url, f"leaver-{uuid.uuid4().hex[:6]}")
    streaming = asyncio.gather(*(one_session(s) for s in sessions))
    await until(lambda: min(progress.values()) >= 5)
    joiner = await start_gateway(nats_url, f"joiner-{uuid.uuid4().hex[:6]}")
    try:
        await until(lambda: min(progress.values()) >= 12)
        assert joiner.group.owned and len(leaver.group.owned) < 16  # partitions moved to the joiner meanwhile
        await stop_gateway(leaver)  # a graceful stop hands its partitions over
        await streaming
        assert joiner.group.owned == frozenset(range(16))
    finally:
        await stop_gateway(joiner)
    for session in sessions:
        stored = await stored_audio(bot.jetstream(), tenant, session)
        assert [m.action if isinstance(m, SessionControl) else m.seq for _, m in stored] == [
            "start",
            *range(chunks),
            "end",
        ], session
    await bot.close()


async def test_a_gateway_that_missed_a_store_learns_the_session_again_from_the_stream(nats_url):
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    async with gateways(nats_url, 1) as (gateway,):
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))
        assert (await ask(bot, subjects.ingest_session(tenant, session), control(tenant, session, "start"))).ok
        for seq in range(3):
            assert (await ask(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
        # Another writer (a gateway that held the session while this one was frozen) stores chunk 3 and 4.
        for seq in (3, 4):
            await bot.jetstream().publish(
                subjects.audio(tenant, session),
                encode(chunk(tenant, session, seq)),
                headers={"Nats-Msg-Id": subjects.message_id(tenant, session, seq)},
            )
        # This gateway's ledger still says 2: chunk 3 passes its own check, the stream refuses the store, and
        # the gateway learns the session again: chunk 3 is a repeat, chunk 5 the next one.
        repeat = await ask(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, 3))
        assert (repeat.ok, repeat.last_seq, gateway.relearned) == (True, 4, 1)
        assert (await ask(bot, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))).last_seq == 5
        assert await chunk_seqs(bot, tenant, session) == [0, 1, 2, 3, 4, 5]
        await bot.close()


async def test_a_flooded_gateway_serves_a_bounded_number_of_requests_at_once(nats_url, monkeypatch):
    monkeypatch.setattr(ingest_app, "MAX_IN_FLIGHT", 4)
    tenant = f"t{uuid.uuid4().hex[:6]}"
    async with gateways(nats_url, 1, max_sessions_per_tenant=1000) as (gateway,):
        serve, running, most = gateway._serve, 0, 0

        async def counted(*args):
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await serve(*args)
            finally:
                running -= 1

        gateway._serve = counted
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))
        replies = await asyncio.gather(
            *(ask(bot, subjects.ingest_session(tenant, f"s{i}"), control(tenant, f"s{i}", "start")) for i in range(200))
        )
        assert all(r.ok for r in replies)  # every request answered, none dropped
        assert most == 4  # the rest waited in the subscription's queue, not as tasks
        await bot.close()


async def test_the_tenant_limit_holds_over_two_gateways(nats_url):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    async with gateways(nats_url, 2, max_sessions_per_tenant=3) as gws:
        # Sessions of both gateways, all started at once.
        candidates = [f"s{i}" for i in range(40)]
        by_owner = {g.gateway_id: [s for s in candidates if owner_of(gws, tenant, s) is g][:4] for g in gws}
        sessions = [s for group in by_owner.values() for s in group]
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))
        replies = await asyncio.gather(
            *(ask(bot, subjects.ingest_session(tenant, s), control(tenant, s, "start")) for s in sessions)
        )
        admitted = [s for s, r in zip(sessions, replies, strict=True) if r.ok]
        assert len(admitted) == 3
        assert {r.code for r in replies if not r.ok} == {"too_many_sessions"}
        # A slot freed on one gateway lets a session of the other start.
        ender = admitted[0]
        other = next(
            s for s in sessions if s not in admitted and owner_of(gws, tenant, s) is not owner_of(gws, tenant, ender)
        )
        assert (await ask(bot, subjects.ingest_session(tenant, other), control(tenant, other, "start"))).code == (
            "too_many_sessions"
        )
        assert (await ask(bot, subjects.ingest_session(tenant, ender), control(tenant, ender, "end"))).ok
        assert (await ask(bot, subjects.ingest_session(tenant, other), control(tenant, other, "start"))).ok
        # The transcriber ending a session frees its slot too, whichever gateway hears of it.
        third = next(s for s in sessions if s not in admitted and s != other)
        await worker_says(bot, tenant, admitted[1], "ended", "idle_timeout")
        for _ in range(100):
            reply = await ask(bot, subjects.ingest_session(tenant, third), control(tenant, third, "start"))
            if reply.ok:
                break
            await asyncio.sleep(0.05)
        assert reply.ok
        await bot.close()


async def test_a_slot_whose_session_was_never_stored_is_freed_when_the_tenant_is_at_its_limit(nats_url):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    async with gateways(nats_url, 1, max_sessions_per_tenant=2) as (gateway,):
        # A gateway died after taking these slots and before storing the sessions' starts, two minutes ago.
        kv = await gateway.js.key_value(subjects.TENANT_SESSIONS_BUCKET)
        await kv.put(tenant, encode_tenant_sessions({"ghost": time.time() - 120, "recent": time.time()}))
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))
        reply = await ask(bot, subjects.ingest_session(tenant, "s1"), control(tenant, "s1", "start"))
        assert reply.ok and gateway.slots.freed_stale == 1
        assert sorted(await gateway.slots.open_sessions(tenant)) == ["recent", "s1"]  # a recent slot is left alone
        refused = await ask(bot, subjects.ingest_session(tenant, "s2"), control(tenant, "s2", "start"))
        assert refused.code == "too_many_sessions"
        await bot.close()


def start_gateway_process(nats_url, gateway_id, log_path):
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "JETSCRIBE_GATEWAY_ID": gateway_id,
        "JETSCRIBE_HEARTBEAT_S": str(FAST["heartbeat_s"]),
        "JETSCRIBE_LEASE_TTL_S": str(FAST["lease_ttl_s"]),
    }
    log = open(log_path, "ab")  # noqa: SIM115 (the child writes it until it ends)
    return subprocess.Popen(
        [sys.executable, "-m", "jetscribe.services.ingest"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def lease_owner(js, partition):
    try:  # None until a gateway made the bucket and wrote the lease
        kv = await js.key_value(subjects.INGEST_LEASES_BUCKET)
        entry = await kv.get(subjects.partition_lease_key(partition))
    except Exception:
        return None
    return decode_lease(entry.value, entry.revision).owner.split("#")[0]


async def test_a_killed_gateways_session_goes_on_through_the_other(nats_url, tmp_path):
    run = uuid.uuid4().hex[:6]
    tenant, ids = "acme", (f"gwa-{run}", f"gwb-{run}")
    procs = {gid: start_gateway_process(nats_url, gid, tmp_path / f"{gid}.log") for gid in ids}
    observer = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = observer.jetstream()
    try:
        # Both up and sharing the partitions.
        async def owners():
            return {p: await lease_owner(js, p) for p in range(16)}

        deadline = time.monotonic() + 20
        while set((await owners()).values()) != set(ids):
            assert time.monotonic() < deadline, "the two gateways did not share the partitions"
            await asyncio.sleep(0.2)
        victim = ids[0]
        held = await owners()
        session = next(f"s{i}" for i in range(100) if held[subjects.session_partition(tenant, f"s{i}", 16)] == victim)

        total = 40  # 4 s of 16 kHz audio, 100 ms chunks, sent at twice real time
        killed = asyncio.Event()

        async def on_stored(msg):
            stored = decode(msg.data, AudioMessage)
            if isinstance(stored, AudioChunk) and stored.seq == 12 and not killed.is_set():
                procs[victim].send_signal(signal.SIGKILL)
                killed.set()
            if isinstance(stored, SessionControl) and stored.action == "end":
                await worker_says(observer, tenant, session, "ended")  # stands in for the transcriber

        watch = await observer.subscribe(subjects.audio(tenant, session), cb=on_stored)
        tone = (3000 * np.sin(np.arange(total * 1600) * 0.05)).astype("<i2")
        bot = await nats.connect(nats_url, **env_connect_options(nats_url))
        result = await stream_audio(bot, Audio(tone, 16000), tenant=tenant, session_id=session, speed=2.0, wait_s=30)
        await bot.close()
        await watch.unsubscribe()
        assert killed.is_set() and procs[victim].wait(5) == -signal.SIGKILL
        assert len(result.sent_at) == total  # every chunk answered ok
        stored = [m for _, m in await stored_audio(js, tenant, session)]
        assert [m.action if isinstance(m, SessionControl) else m.seq for m in stored] == [
            "start",
            *range(total),
            "end",
        ]
        assert await lease_owner(js, subjects.session_partition(tenant, session, 16)) == ids[1]
    finally:
        await observer.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
