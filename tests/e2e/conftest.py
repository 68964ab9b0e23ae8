"""The whole pipeline, in this process, against the session's real nats-server and PostgreSQL."""

import asyncio
from dataclasses import dataclass

import pytest

from jetscribe.devstack.servers import NatsServer, free_port
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.model import load_model
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig


@dataclass
class Pipeline:
    nats_url: str
    database_url: str
    ws_url: str  # the gateway's WebSocket (/v1/listen), keys from the session's keyring


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny.en")


@pytest.fixture(scope="session")
def e2e_nats(tmp_path_factory):
    """Its own NATS server: no other test's gateway may answer this pipeline's bots."""
    with NatsServer(tmp_path_factory.mktemp("e2e-nats")) as server:
        yield server


@pytest.fixture(scope="session")
async def pipeline(e2e_nats, postgres_server, tiny_model, nats_keys):
    postgres_server.create_database("e2e")
    database_url = postgres_server.url("e2e")
    upgrade(database_url)
    nats_url = e2e_nats.url
    settings = StreamSettings(nats_url=nats_url)
    ws_port = free_port()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_ingest(settings, IngestConfig(ws_port=ws_port, api_keys=str(nats_keys.api_keys_path)), stop)
        ),
        asyncio.create_task(
            run_transcriber(
                settings,
                TranscriberConfig(model="tiny.en", worker_id="e2e-w1", speakers_audio="off"),
                stop,
                model=tiny_model,
            )
        ),
        asyncio.create_task(run_persister(settings, PersisterConfig(database_url=database_url), stop)),
    ]
    await asyncio.sleep(0.5)
    yield Pipeline(nats_url, database_url, f"ws://127.0.0.1:{ws_port}")
    stop.set()
    await asyncio.gather(*tasks)
