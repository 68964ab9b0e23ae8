"""The gateway's rate limits against a real nats-server: a chunk over the limit is refused `rate_limited` with the
wait that lets it through, reported and counted; a bot sending a file as fast as it can is slowed down, not cut off,
and every chunk is stored once, in order."""

import asyncio
import time
import uuid

import nats
import numpy as np

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared import subjects, telemetry
from jetscribe.shared.config import IngestConfig, StreamSettings, TelemetryConfig, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import AudioChunk, ErrorEvent, SessionControl, decode
from tests.integration.test_ingest import ask, chunk, running_gateway, stored_audio
from tests.scrape import scrape, total, wait_until_ready


async def test_a_chunk_over_the_session_rate_is_refused_with_the_wait_that_lets_it_through(nats_url):
    # 5 chunks at once, then 1 a second: the sixth is refused unless serving the five took a whole second (at 10 a
    # second, as before, a tenth of a second of a loaded host let it through).
    config = IngestConfig(session_chunks_per_s=1, rate_burst_s=5)
    tenant, session = "rl", f"s{uuid.uuid4().hex[:8]}"
    async with running_gateway(nats_url, config=config) as nc:
        errors: list[ErrorEvent] = []
        sub = await nc.subscribe(subjects.errors("ingest", tenant), cb=collector(errors))
        start = SessionControl(tenant=tenant, session_id=session, action="start")
        assert (await ask(nc, subjects.ingest_session(tenant, session), start)).ok
        for seq in range(5):
            assert (await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, seq))).ok
        refused = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))
        assert (refused.ok, refused.code, refused.last_seq) == (False, "rate_limited", 4)
        assert 0 < refused.retry_after_s <= 1.0 and "chunks/s" in refused.message
        await asyncio.sleep(refused.retry_after_s)
        again = await ask(nc, subjects.ingest_audio(tenant, session), chunk(tenant, session, 5))
        assert again.ok and again.last_seq == 5
        await nc.flush()
        await sub.unsubscribe()
        assert [(e.code, e.seq) for e in errors] == [("rate_limited", 5)]
        assert errors[0].retry_after_s == refused.retry_after_s


def collector(events: list[ErrorEvent]):
    async def collect(msg):
        events.append(decode(msg.data, ErrorEvent))

    return collect


async def test_the_bot_client_backs_off_when_rate_limited_and_loses_nothing(tmp_path):
    """A file sent as fast as possible (speed 0) at a gateway allowing 10 chunks/s after a burst of 10: the client
    waits each `retry_after_s` and sends the same chunk again, the session ends normally and AUDIO holds every
    chunk once, in order."""
    with NatsServer(tmp_path / "nats") as server:
        settings = StreamSettings(nats_url=server.url)
        stop = asyncio.Event()
        tel = telemetry.Telemetry("ingest", config=TelemetryConfig())
        # The bot is refused only while it sends faster than the rate: at 40 chunks/s it had to average under 17 ms a
        # chunk over the 30 (an ask took up to 19 ms with the cores busy); at 10 chunks/s, under 69 ms.
        gateway = IngestConfig(session_chunks_per_s=10, rate_burst_s=1.0)
        worker = TranscriberConfig(model="null", worker_id="rl-w1", heartbeat_s=0.5, lease_ttl_s=2)
        tasks = [
            asyncio.create_task(run_ingest(settings, gateway, stop, tel)),
            asyncio.create_task(run_transcriber(settings, worker, stop, model=NullModel())),
        ]
        nc = await nats.connect(server.url, **env_connect_options(server.url))
        try:
            await wait_until_ready(tel)
            tenant, session = "rl", f"b{uuid.uuid4().hex[:8]}"
            rng = np.random.default_rng(14)
            audio = Audio((rng.standard_normal(16000 * 3) * 1000).astype("<i2"), 16000)  # 30 chunks of 100 ms
            refusals: list[ErrorEvent] = []
            sub = await nc.subscribe(subjects.errors("ingest", tenant), cb=collector(refusals))
            started = time.monotonic()
            result = await asyncio.wait_for(
                stream_audio(nc, audio, tenant=tenant, session_id=session, speed=0), timeout=120
            )
            took = time.monotonic() - started
            await sub.unsubscribe()
            assert result.ended is not None and sorted(result.sent_by_seq) == list(range(30))
            stored = [
                m.seq for _, m in await stored_audio(nc.jetstream(), tenant, session) if isinstance(m, AudioChunk)
            ]
            assert stored == list(range(30))
            assert refusals and {e.code for e in refusals} == {"rate_limited"}
            assert took >= (30 - 10) / 10 * 0.9  # the sustained rate held it back
            samples = await scrape(tel.metrics_port)
            rate_limited = total(
                samples, "jetscribe_ingest_refusals_total", jetscribe_tenant=tenant, error_type="rate_limited"
            )
            assert rate_limited == len(refusals)
        finally:
            await nc.close()
            stop.set()
            await asyncio.gather(*tasks)
            tel.shutdown()
