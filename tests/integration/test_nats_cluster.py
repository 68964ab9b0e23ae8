"""The services' streams and buckets on a three-node NATS cluster (the session's `nats_cluster`): kept in three
copies, reached through a NATS_URL that lists every node, and the partition owners' writes fenced there too."""

import asyncio
import json
import time

import nats
import nats.js.errors
import pytest

from jetscribe.services.transcriber.group import PartitionGroup, PartitionLost
from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import connect, ensure_checkpoints, ensure_streams
from tests.integration.test_partition_group import HEARTBEAT_S, TTL_S, Setup, freeze, stored_on, wait_for


async def cluster_info(nc, stream):
    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
    return json.loads(reply.data)["config"]["num_replicas"], json.loads(reply.data)["cluster"]


async def test_streams_and_buckets_get_three_copies_through_a_url_listing_every_node(nats_cluster):
    settings = StreamSettings(nats_url=nats_cluster.url)  # replicas auto: the server says it is in a cluster
    assert len(settings.nats_servers) == 3
    nc = await connect(settings, "cluster-test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await ensure_checkpoints(js, settings)
        config = TranscriberConfig(worker_id="cluster-w1", heartbeat_s=HEARTBEAT_S, lease_ttl_s=TTL_S)
        group = PartitionGroup.from_config(nc, settings, config)
        await group.start()
        await wait_for(lambda: len(group.owned) == settings.partitions, 10)
        streams = [subjects.AUDIO_STREAM, subjects.TRANSCRIPTS_STREAM, subjects.ERRORS_STREAM]
        streams += [f"KV_{b}" for b in (subjects.SESSION_CHECKPOINTS_BUCKET, subjects.PARTITION_LEASES_BUCKET)]
        streams.append(f"KV_{subjects.TRANSCRIBER_MEMBERS_BUCKET}")
        for stream in streams:
            copies, cluster = await cluster_info(nc, stream)
            assert copies == 3, stream
            names = {cluster["leader"], *(r["name"] for r in cluster.get("replicas", []))}
            assert names == {"n1", "n2", "n3"}, (stream, cluster)
        # The owner's writes go through its claims on the cluster's streams as on one server.
        claim = group._held[0].claims["transcripts"]
        await group.write(0, "transcripts", subjects.transcript("clustertest", "s1"), b"fenced")
        stored = await stored_on(js, subjects.TRANSCRIPTS_STREAM, subjects.transcript("clustertest", "s1"))
        assert stored[-1][1]["Nats-Expected-Last-Subject-Sequence"] == str(claim.seq)
        await group.stop()
    finally:
        await nc.close()


@pytest.fixture
async def cluster_env(nats_cluster):
    setup = Setup()
    conns = []

    async def join():
        nc = await nats.connect(nats_cluster.urls, **env_connect_options(nats_cluster.url))
        conns.append(nc)
        return nc

    js = (await join()).jetstream()
    await setup.create(js)
    await setup.create_fenced(js)
    yield setup, js, join
    for stream in (setup.stream, setup.out_stream):
        await js.delete_stream(stream)
    for bucket in (setup.members_bucket, setup.leases_bucket, setup.kv_bucket):
        await js.delete_key_value(bucket)
    for nc in conns:
        await nc.close()


async def test_a_frozen_owners_write_is_refused_by_a_clustered_stream(cluster_env):
    """The fence is one step on the stream's leader, wherever the writer is connected."""
    setup, js, join = cluster_env
    a = setup.group(await join(), "a", fences=setup.fences())
    await a.start()
    await wait_for(lambda: len(a.owned) == 16, 10)
    await a.write(7, "out", setup.out(7), b"a before")
    freeze(a, 7)
    b = setup.group(await join(), "b", fences=setup.fences())
    await b.start()
    started = time.monotonic()
    await wait_for(lambda: len(b.owned) == 16, TTL_S + HEARTBEAT_S + 5)
    print(f"b took the partitions over {time.monotonic() - started:.2f} s after it started")
    with pytest.raises(PartitionLost):
        await a.write(7, "out", setup.out(7), b"a after")
    await b.write(7, "out", setup.out(7), b"b after")
    assert [data for data, _ in await stored_on(js, setup.out_stream, setup.out(7))] == [b"a before", b"b after"]
    assert a.refused_writes == 1
    await b.stop()
    await a.stop(release=False)


async def test_a_bucket_made_with_one_copy_is_brought_to_three(nats_cluster):
    """A bucket made before the servers were a cluster (or before JETSCRIBE_REPLICAS) gets its copies at start."""
    from nats.js.api import KeyValueConfig

    from jetscribe.shared.streams import ensure_key_value

    nc = await nats.connect(nats_cluster.urls, **env_connect_options(nats_cluster.url))
    try:
        js = nc.jetstream()
        bucket = f"upgrade_{time.monotonic_ns()}"
        kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=1))
        for _ in range(50):  # a bucket just made on a cluster takes writes once its copy has a leader
            try:
                await kv.put("k", b"kept")
                break
            except nats.js.errors.NoStreamResponseError:
                await asyncio.sleep(0.1)
        await ensure_key_value(js, KeyValueConfig(bucket=bucket, history=1, replicas=3))
        copies, _ = await cluster_info(nc, f"KV_{bucket}")
        assert copies == 3
        assert (await (await js.key_value(bucket)).get("k")).value == b"kept"
        await js.delete_key_value(bucket)
    finally:
        await nc.close()
