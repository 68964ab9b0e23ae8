"""A session that moves between workers, as the log tells it: the first worker logs its start and its hand-over,
the second its takeover (from the first one's checkpoint) and its end, with the whole session's totals. Real
nats-server of its own, the gateway and two transcribers in this process with the null model."""

import asyncio
import logging
import re

import nats
import pytest
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.partitions import assign, decode_lease
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.timeout(120)

TENANT = "movelog"


async def lease_owners(nc, partitions: int) -> dict[int, str]:
    try:
        kv = await nc.jetstream().key_value(subjects.PARTITION_LEASES_BUCKET)
    except BucketNotFoundError:  # no worker has made it yet
        return {}
    owners = {}
    for partition in range(partitions):
        try:
            entry = await kv.get(subjects.partition_lease_key(partition))
        except KeyNotFoundError:
            continue
        if entry.value:
            owners[partition] = decode_lease(entry.value, entry.revision).owner.split("#")[0]
    return owners


@pytest.fixture
def own_nats(tmp_path):
    """A nats-server of this test's own: the shared one's AUDIO stream holds other tests' unacked sessions, which
    workers joining the group would take over (and log) first."""
    with NatsServer(tmp_path / "nats") as server:
        yield server.url


async def test_start_hand_over_takeover_and_end_are_one_line_each(own_nats, caplog):
    nats_url = own_nats
    caplog.set_level(logging.INFO, logger="jetscribe")
    settings = StreamSettings(nats_url=nats_url)
    stops = {name: asyncio.Event() for name in ("ingest", "wa", "wb")}
    tasks = [asyncio.create_task(run_ingest(settings, IngestConfig(gateway_id="gw-movelog"), stops["ingest"]))]
    for worker in ("wa", "wb"):
        config = TranscriberConfig(model="null", worker_id=f"{worker}-movelog", heartbeat_s=0.5, lease_ttl_s=2)
        tasks.append(asyncio.create_task(run_transcriber(settings, config, stops[worker])))
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        # Until the two workers share the partitions as the group settles them: both holding some is not enough,
        # as a partition wa is still handing over would still name wa, and a session chosen on it starts on wb.
        settled = assign(settings.partitions, ["wa-movelog", "wb-movelog"])
        for _ in range(300):
            owners = await lease_owners(nc, settings.partitions)
            if owners == settled:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the workers did not share the partitions: {owners}")
        session = next(
            f"s{i}"
            for i in range(100)
            if owners[subjects.session_partition(TENANT, f"s{i}", settings.partitions)] == "wa-movelog"
        )
        partition = subjects.session_partition(TENANT, session, settings.partitions)
        first_final = asyncio.Event()

        def on_segment(segment):
            if segment.status == "final":
                first_final.set()

        speech = sample_speech()
        streaming = asyncio.create_task(
            stream_audio(
                nc,
                Audio(speech.audio, speech.sample_rate),
                tenant=TENANT,
                session_id=session,
                speed=3,
                on_segment=on_segment,
                wait_s=60,
            )
        )
        await asyncio.wait_for(first_final.wait(), 60)
        stops["wa"].set()  # a graceful stop: it hands its partitions, this session's too, to wb
        result = await streaming
    finally:
        await nc.close()
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks)

    name = f"session {TENANT}/{session}"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(name)]
    started = [line for line in lines if line.startswith(f"{name} started")]
    handed = [line for line in lines if line.startswith(f"{name} handed over")]
    taken = [line for line in lines if line.startswith(f"{name} taken over")]
    ended = [line for line in lines if line.startswith(f"{name} ended")]
    assert (len(started), len(handed), len(taken), len(ended)) == (1, 1, 1, 1), lines
    assert started[0].startswith(f"{name} started on worker wa-movelog, partition {partition}:")
    assert handed[0].startswith(f"{name} handed over by worker wa-movelog, partition {partition}:")
    resumed_after = int(re.search(r"resumes after seq (-?\d+)", handed[0])[1])
    assert re.match(
        rf"{name} taken over on worker wb-movelog, partition {partition}, from wa-movelog's checkpoint: "
        rf"acked up to seq {resumed_after} \(",
        taken[0],
    ), taken[0]
    event = result.ended
    assert event.worker_id == "wb-movelog"
    assert ended[0].startswith(
        f"{name} ended (the bot ended it) on worker wb-movelog, partition {partition}: "
        f"{event.audio_seconds:.1f} s of audio, {event.chunks_received} chunks, {event.segments} finals, "
    )
    assert "words (since the takeover)" in ended[0]
    assert ended[0].endswith(", Silero VAD on 0% of the frames")  # the default hybrid VAD: clean speech never wakes it
    assert event.audio_seconds == pytest.approx(speech.duration_s, abs=0.2)  # the whole session, over both workers
