"""`jetscribe up --nats-cluster 3` (`LocalStack(nats_nodes=3)`): three nats-servers in one cluster, the services
connected through all three URLs, the streams and buckets kept in three copies, and a session streams through.
Real servers and service processes, tiny.en."""

import asyncio
import json

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.stack import LocalStack, running_stack_urls, stack_file
from jetscribe.evaluation.speech import sample_speech
from jetscribe.evaluation.wer import wer
from jetscribe.services.persister.store import final_segments, open_engine, wait_until_ended
from jetscribe.shared import subjects
from jetscribe.shared.config import nats_servers
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.timeout(240)


async def replicas_and_session(url: str, database: tuple) -> tuple[dict[str, int], str]:
    speech = sample_speech()
    nc = await nats.connect(nats_servers(url), **env_connect_options(url))
    try:
        copies = {}
        for stream in (subjects.AUDIO_STREAM, subjects.TRANSCRIPTS_STREAM, f"KV_{subjects.PARTITION_LEASES_BUCKET}"):
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
            copies[stream] = json.loads(reply.data)["config"]["num_replicas"]
        await stream_audio(nc, Audio(speech.audio, speech.sample_rate), tenant="t", session_id="c1", speed=0.0)
    finally:
        await nc.close()
    engine = open_engine(*database)  # (URL, PostgresClient): the stack's readers' role
    try:
        await wait_until_ended(engine, "t", "c1", timeout_s=60)
        text = " ".join(s.text for s in await final_segments(engine, "t", "c1") if s.text)
    finally:
        await engine.dispose()
    return copies, text


def test_up_with_a_three_node_cluster_keeps_three_copies_and_transcribes(tmp_path, monkeypatch):
    for variable in ("NATS_URL", "DATABASE_URL", "JETSCRIBE_REPLICAS"):
        monkeypatch.delenv(variable, raising=False)
    quiet = {"JETSCRIBE_LOG_LEVEL": "WARNING"}
    home = tmp_path / "home"
    with LocalStack(home, model="tiny.en", transcribers=1, nats_nodes=3, extra_env=quiet) as local:
        assert local.nats_cluster is not None and local.nats is None
        assert nats_servers(local.nats_url) == local.nats_cluster.urls and len(local.nats_cluster.urls) == 3
        info = json.loads(stack_file(home).read_text())
        assert info["nats_nodes"] == 3 and running_stack_urls(home)["nats_url"] == local.nats_url
        copies, text = asyncio.run(replicas_and_session(local.nats_url, local.database("reader")))
        assert copies == {subjects.AUDIO_STREAM: 3, subjects.TRANSCRIPTS_STREAM: 3, "KV_partition_leases": 3}
        assert wer(sample_speech().text, text) <= 0.15, text
        local.check()
    assert not any(node.running for node in local.nats_cluster.nodes)
