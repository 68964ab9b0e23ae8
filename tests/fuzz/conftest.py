"""The three services in this process, on a NATS server of their own and the session's PostgreSQL, each with its
telemetry endpoint (its /readyz and /metrics are read after every barrage). The transcriber runs the null model:
what is fuzzed is the messaging path, not Whisper."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import nats
import pytest

from jetscribe.devstack.servers import NatsServer
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.persister.store import open_engine
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared import telemetry
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TelemetryConfig, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from tests.integration.running import wait_all_ready

MAX_CHUNK_BYTES = 64 * 1024  # small, so that `too_large` chunks are cheap to make
# Leases that outlast a loaded host's pauses (this event loop also runs other test modules' services): a partition
# moving mid-barrage redelivers what was in hand, refused and reported again, and the counts would not be exact.
LEASE_TTL_S = 15


@dataclass
class FuzzStack:
    nc: object
    nats_url: str
    database_url: str
    engine: object
    tasks: list[asyncio.Task]
    tels: dict[str, telemetry.Telemetry] = field(default_factory=dict)
    ws_url: str = ""  # the gateway's WebSocket listener, when `gateway_config` gives it a port

    def port(self, service: str) -> int:
        port = self.tels[service].metrics_port
        assert port is not None, f"{service} has no telemetry endpoint"
        return port


@pytest.fixture(scope="module")
def gateway_config() -> IngestConfig:
    """The gateway's settings; a test module may override this fixture (the WebSocket fuzz gives it a listener)."""
    return IngestConfig(max_chunk_bytes=MAX_CHUNK_BYTES, lease_ttl_s=LEASE_TTL_S)


@pytest.fixture(scope="module")
def worker_config() -> TranscriberConfig:
    """The transcriber's settings; a test module may override this fixture too."""
    return TranscriberConfig(model="null", worker_id="fuzz-w1", heartbeat_s=1.0, lease_ttl_s=LEASE_TTL_S)


@pytest.fixture(scope="module")
async def fuzz_stack(tmp_path_factory, postgres_server, fuzz_cases, gateway_config, worker_config):
    """`fuzz_cases` first: they are generated before the services start (see there)."""
    postgres_server.create_database(name := f"fuzz_{tmp_path_factory.mktemp('db').name.replace('-', '_')}")
    database_url = postgres_server.url(name)
    upgrade(database_url)
    with NatsServer(tmp_path_factory.mktemp("fuzz-nats")) as server:
        settings = StreamSettings(nats_url=server.url)
        tels = {
            name: telemetry.Telemetry(name, config=TelemetryConfig()) for name in ("ingest", "transcriber", "persister")
        }
        stop = asyncio.Event()
        worker = worker_config
        gateway = gateway_config
        tasks = [
            asyncio.create_task(run_ingest(settings, gateway, stop, tels["ingest"])),
            asyncio.create_task(run_transcriber(settings, worker, stop, model=NullModel(), tel=tels["transcriber"])),
            asyncio.create_task(
                run_persister(settings, PersisterConfig(database_url=database_url), stop, tels["persister"])
            ),
        ]
        nc = await nats.connect(server.url, max_reconnect_attempts=0, **env_connect_options(server.url))
        engine = open_engine(database_url)
        try:
            await wait_all_ready(nc, tasks, workers=1)
            ws_url = f"ws://{gateway.ws_host}:{gateway.ws_port}" if gateway.ws_port else ""
            yield FuzzStack(nc, server.url, database_url, engine, tasks, tels, ws_url)
        finally:
            await nc.close()
            await engine.dispose()
            stop.set()
            await asyncio.gather(*tasks)
            for tel in tels.values():
                tel.shutdown()
