"""The persister against a schema older than it needs: it stops with one line and an error event, instead of
retrying forever; what it could not write stays unacked in the stream."""

import asyncio
import time

import nats
import pytest

from jetscribe.devstack.servers import NatsServer
from jetscribe.services.persister.app import run
from jetscribe.services.persister.migrate import SchemaBehind, downgrade, revisions, upgrade
from jetscribe.shared import subjects, wire
from jetscribe.shared.config import PersisterConfig, StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_streams
from tests.integration.running import persister_process

pytestmark = pytest.mark.timeout(90)
FIRST, HEAD = revisions()[0], revisions()[-1]


@pytest.fixture
def own_nats(tmp_path):
    """Its own server: a persister stopped with unacked messages must not leave them in the shared durable."""
    with NatsServer(tmp_path / "nats") as server:
        yield server.url


async def connected(url: str):
    nc = await nats.connect(url, **env_connect_options(url))
    await ensure_streams(nc.jetstream(), StreamSettings(nats_url=url))
    errors: asyncio.Queue[wire.ErrorEvent] = asyncio.Queue()

    async def on_error(msg):
        await errors.put(wire.decode(msg.data, wire.ErrorEvent))

    await nc.subscribe(subjects.errors("persister", ""), cb=on_error)
    return nc, errors


async def test_started_on_an_older_schema_it_stops_and_says_so(own_nats, database_url):
    await asyncio.to_thread(upgrade, database_url, FIRST)
    nc, errors = await connected(own_nats)
    try:
        config = PersisterConfig(database_url=database_url, retry_max_s=0.5)
        with pytest.raises(SchemaBehind, match=f"schema is at {FIRST}, this jetscribe needs {HEAD}"):
            await asyncio.wait_for(run(StreamSettings(nats_url=own_nats), config, asyncio.Event()), 30)
        event = await asyncio.wait_for(errors.get(), 5)
        assert event.code == "schema_behind" and "jetscribe db upgrade" in event.message
    finally:
        await nc.close()


async def test_a_schema_stepped_back_under_it_stops_it_and_nothing_is_acked(own_nats, database_url):
    await asyncio.to_thread(upgrade, database_url)
    nc, errors = await connected(own_nats)
    js = nc.jetstream()
    try:
        config = PersisterConfig(database_url=database_url, retry_max_s=0.5)
        task = asyncio.create_task(run(StreamSettings(nats_url=own_nats), config, asyncio.Event()))
        deadline = time.monotonic() + 30
        while True:  # subscribed: its durable exists
            try:
                await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
                break
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
        await asyncio.to_thread(downgrade, database_url, FIRST)
        # 0001 has no `reason` column: the ended event's write fails on the schema, not on the event.
        ended = wire.SessionEvent(tenant="acme", session_id="s1", event="ended", at=time.time(), audio_seconds=1.0)
        stored = await js.publish(subjects.session_event("acme", "s1", "ended"), wire.encode(ended))
        with pytest.raises(SchemaBehind):
            await asyncio.wait_for(task, 30)
        assert (await asyncio.wait_for(errors.get(), 5)).code == "schema_behind"
        info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
        assert info.ack_floor.stream_seq < stored.seq  # still there for the persister after the upgrade
    finally:
        await nc.close()


async def test_the_service_process_exits_nonzero_with_one_line(own_nats, database_url):
    await asyncio.to_thread(upgrade, database_url, FIRST)
    async with persister_process(own_nats, database_url) as proc:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    assert text.splitlines()[-1] == (
        f"jetscribe-persister: the database schema is at {FIRST}, this jetscribe needs {HEAD}: "
        "run `jetscribe db upgrade`"
    )
