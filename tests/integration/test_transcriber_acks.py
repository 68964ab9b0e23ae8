"""Acks of the transcriber on a real nats-server: each audio message acked exactly once, whatever runs
concurrently while a checkpoint is being written."""

import asyncio
import uuid

import nats

from jetscribe.services.transcriber.app import TranscriberWorker
from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_checkpoints, ensure_streams
from jetscribe.shared.wire import AudioChunk, SessionCheckpoint, decode, encode

CHUNK = 1600  # 100 ms


class SlowCheckpoints:
    """The real checkpoint bucket, except that the first save after `hold()` waits for `release()`."""

    def __init__(self, kv):
        self.kv = kv
        self._holding = False
        self.held = asyncio.Event()
        self._go = asyncio.Event()

    def hold(self):
        self._holding = True

    def release(self):
        self._go.set()

    async def get(self, key):
        return await self.kv.get(key)

    async def put(self, key, value):
        if self._holding:
            self._holding = False
            self.held.set()
            await self._go.wait()
        return await self.kv.put(key, value)


async def stored_silence(js, tenant, session, chunks):
    """Store `chunks` chunks of silence in AUDIO as the gateway does, and take them back as JetStream messages."""
    for seq in range(chunks):
        chunk = AudioChunk(
            tenant=tenant,
            session_id=session,
            seq=seq,
            sent_at=0.0,
            sample_rate=16000,
            channels=1,
            encoding="pcm_s16le",
            payload=bytes(2 * CHUNK),
        )
        await js.publish(
            subjects.audio(tenant, session),
            encode(chunk),
            headers={"Nats-Msg-Id": subjects.message_id(tenant, session, seq)},
        )
    sub = await js.pull_subscribe(
        subjects.audio_of_session(tenant, session), durable=f"acks-{session}", stream=subjects.AUDIO_STREAM
    )
    msgs = []
    while len(msgs) < chunks:
        msgs += await sub.fetch(chunks - len(msgs), timeout=5)
    return msgs


async def test_a_second_settle_during_a_slow_checkpoint_acks_nothing_twice(nats_url):
    """Regression: `_settle` ran from `_receive` and `_decode_one` at once, both acked the same messages
    across the checkpoint write, and nats-py raised MsgAlreadyAckdError."""
    settings = StreamSettings(nats_url=nats_url)
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        tenant, session = "acks", uuid.uuid4().hex[:12]
        msgs = await stored_silence(js, tenant, session, 35)
        worker = TranscriberWorker(nc, settings, TranscriberConfig(model="tiny.en", worker_id="w-acks"), model=None)
        slow = worker.checkpoints = SlowCheckpoints(await ensure_checkpoints(js, settings))
        await worker._receive(0, msgs[0])  # opens the session
        slow.hold()
        first, taken = None, 1
        for msg in msgs[1:]:  # silence is accounted for as it comes; a checkpoint is due within 2-3 s of it
            taken += 1
            task = asyncio.create_task(worker._receive(0, msg))
            waiting = asyncio.create_task(slow.held.wait())
            await asyncio.wait({task, waiting}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if slow.held.is_set():
                first = task
                break
            await task
        assert first is not None, "no checkpoint came due"
        second = asyncio.create_task(worker._receive(0, msgs[taken]))  # settles while the first waits
        await asyncio.sleep(0.5)
        slow.release()
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        entry = await slow.kv.get(subjects.checkpoint_key(tenant, session))
        checkpoint = decode(entry.value, SessionCheckpoint)
        acked = [m for m in msgs if m._ackd]
        assert len(acked) == checkpoint.acked_seq + 1  # acked: exactly what the stored checkpoint covers
        assert checkpoint.chunks_received == len(acked)
    finally:
        await nc.close()
