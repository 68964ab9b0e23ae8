"""`jetscribe up --gateways 2` with JETSCRIBE_MODEL=null: the whole stack as processes, two gateways sharing the
sessions, each utterance stored in PostgreSQL as one `null` final."""

import asyncio

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.stack import LocalStack
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.persister.store import final_segments, open_engine, wait_until_ended
from jetscribe.services.transcriber.null_model import NULL_WORD
from jetscribe.services.transcriber.partitions import decode_lease
from jetscribe.shared import subjects
from jetscribe.shared.natsauth import ClientAuth, env_connect_options

pytestmark = pytest.mark.e2e


async def lease_owners(nc):
    kv = await nc.jetstream().key_value(subjects.INGEST_LEASES_BUCKET)
    owners = {}
    for partition in range(16):
        entry = await kv.get(subjects.partition_lease_key(partition))
        owners[partition] = decode_lease(entry.value, entry.revision).owner.split("#")[0]
    return owners


def test_two_gateways_and_the_null_model_store_one_final_per_utterance(tmp_path, monkeypatch):
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    stack = LocalStack(tmp_path / "stack", model="null", gateways=2, extra_env={"JETSCRIBE_LOG_LEVEL": "WARNING"})
    with stack as local:  # it starts in this thread: LocalStack.start runs event loops of its own
        asyncio.run(stream_and_check(local))


async def stream_and_check(local):
    speech = sample_speech()
    nc = await nats.connect(local.nats_url, **env_connect_options(local.nats_url))
    for _ in range(100):  # both gateways up and sharing the partitions
        try:
            owners = await lease_owners(nc)
        except Exception:
            owners = {}
        if len(set(owners.values())) == 2:
            break
        await asyncio.sleep(0.2)
    assert len(set(owners.values())) == 2
    sessions = [f"s{i}" for i in range(6)]
    assert len({owners[subjects.session_partition("e2e", s, 16)] for s in sessions}) == 2  # both serve some
    await nc.close()
    # The bots connect as tenant e2e's user, as `jetscribe tenant add e2e` makes it, to services each running
    # as its own user.
    local.nats.keyring.add_tenant("e2e")
    local.nats.reload()
    bot_auth = ClientAuth(str(local.nats.keyring.tenant_path("e2e")))
    bot = await nats.connect(local.nats_url, **bot_auth.connect_options(local.nats_url, tenant="e2e"))
    results = await asyncio.gather(
        *(
            stream_audio(bot, Audio(speech.audio, speech.sample_rate), tenant="e2e", session_id=s, speed=0)
            for s in sessions
        )
    )
    await bot.close()
    engine = open_engine(*local.database("reader"))  # as the CLI reads it: the stack's read-only role
    try:
        for session, live in zip(sessions, results, strict=True):
            await wait_until_ended(engine, "e2e", session, timeout_s=30.0)
            stored = await final_segments(engine, "e2e", session)
            assert stored and {s.text.strip() for s in stored} == {NULL_WORD}
            assert len(stored) == len(live.finals)  # every final published was stored
    finally:
        await engine.dispose()
