"""`LocalStack(transcribers=2)`: two transcriber processes, each with its own worker id and thread share, split
the AUDIO partitions between them (read from KV `partition_leases`), and a session streams through the one that
owns its partition. Real nats-server, PostgreSQL and service processes, tiny.en."""

import asyncio
import json
import os
import socket
from pathlib import Path

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.stack import LocalStack, stack_file
from jetscribe.evaluation.speech import sample_speech
from jetscribe.evaluation.wer import wer
from jetscribe.services.persister.store import final_segments, open_engine, wait_until_ended
from jetscribe.shared import subjects
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.timeout(240)


async def lease_owners(url: str) -> dict[int, str]:
    """Partition -> worker id, as the leases name it (`<worker id>#<incarnation>`)."""
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        kv = await nc.jetstream().key_value(subjects.PARTITION_LEASES_BUCKET)
        owners = {}
        for p in range(16):
            entry = await kv.get(subjects.partition_lease_key(p))
            assert entry.value, f"partition {p} has no lease"
            owners[p] = json.loads(entry.value)["owner"].partition("#")[0]
        return owners
    finally:
        await nc.close()


async def stream_one(url: str, database: tuple, session: str) -> tuple[str, str, int]:
    """Stream the demo sample; return the stored transcript, the worker id stored with the session, and the
    AUDIO partition its chunks went to."""
    speech = sample_speech()
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        await stream_audio(nc, Audio(speech.audio, speech.sample_rate), tenant="t", session_id=session, speed=0.0)
        info = await nc.jetstream().stream_info(
            subjects.AUDIO_STREAM, subjects_filter=subjects.audio_of_session("t", session)
        )
        (stored,) = (info.state.subjects or {}).keys()
    finally:
        await nc.close()
    engine = open_engine(*database)  # (URL, PostgresClient): the stack's readers' role
    try:
        row = await wait_until_ended(engine, "t", session, timeout_s=60)
        text = " ".join(s.text for s in await final_segments(engine, "t", session) if s.text)
    finally:
        await engine.dispose()
    return text, row.worker_id, int(stored.rsplit(".", 1)[1])


def test_two_workers_split_the_partitions_and_a_session_streams_through(tmp_path, monkeypatch):
    for variable in ("NATS_URL", "DATABASE_URL", "JETSCRIBE_CPU_THREADS", "JETSCRIBE_WORKER_ID"):
        monkeypatch.delenv(variable, raising=False)
    quiet = {"JETSCRIBE_LOG_LEVEL": "WARNING"}
    with LocalStack(tmp_path / "home", model="tiny.en", transcribers=2, extra_env=quiet) as local:
        host = socket.gethostname()
        assert local.transcriber_ids == [f"{host}-t0", f"{host}-t1"]
        info = json.loads(stack_file(tmp_path / "home").read_text())
        assert info["transcribers"] == 2 and info["transcriber_ids"] == local.transcriber_ids

        share = str(max(1, len(os.sched_getaffinity(0)) // 2))  # N x threads <= the cores we may use
        workers = [c for c in local.children if c.name.startswith("transcriber ")]
        for child, worker in zip(workers, local.transcriber_ids, strict=True):
            environ = dict(
                item.split("=", 1) for item in Path(f"/proc/{child.proc.pid}/environ").read_text().split("\0") if item
            )
            assert environ["JETSCRIBE_WORKER_ID"] == worker
            assert [environ[v] for v in ("JETSCRIBE_CPU_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")] == [share] * 3

        # start() returned once each worker held what the group assigns it: 8 of 16 each, by the bounded load.
        owners = asyncio.run(lease_owners(local.nats_url))
        by_worker = {w: sorted(p for p, o in owners.items() if o == w) for w in local.transcriber_ids}
        assert sorted(len(ps) for ps in by_worker.values()) == [8, 8], owners
        assert by_worker == local.partitions_held

        text, worker, partition = asyncio.run(stream_one(local.nats_url, local.database("reader"), "two-workers"))
        assert wer(sample_speech().text, text) <= 0.15, text
        assert worker == owners[partition]  # the worker holding the session's partition transcribed it
        local.check()  # no worker exited along the way
