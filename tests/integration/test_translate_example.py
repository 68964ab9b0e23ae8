"""examples/translate_finals.py against a real stack (null model): killed mid-way and started again, it translates
every final of its tenant exactly once, in stream order, and nothing of another tenant or any interim."""

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.client.readers import provision_reader
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared import subjects
from jetscribe.shared.wire import Segment, decode
from tests.integration.running import running_services

pytestmark = pytest.mark.timeout(240)
EXAMPLE = Path(__file__).parents[2] / "examples" / "translate_finals.py"
ACK_WAIT_S = 15.0  # longer than it is down: a redelivery then competes with the newer finals


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    """Its own server: the services' readiness check counts the workers on it."""
    with NatsServer(tmp_path_factory.mktemp("translate-nats")) as server:
        yield server


async def start_example(nats_url: str, tenant: str, durable: str, out: Path, log: Path, creds: Path):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--nats",
        nats_url,
        "--tenant",
        tenant,
        "--creds",  # the tenant's own NATS user: only its subjects, its consumers, its inboxes
        str(creds),
        "--durable",
        durable,
        "--out",
        str(out),
        "--work-s",
        "0.5",  # each stand-in translation takes this long, so the kill lands in the middle of one
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def written(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


async def wait_written(out: Path, count: int, example, log: Path, deadline_s: float = 60.0) -> list[dict]:
    """Until --out holds `count` finals (the example's own record of what it handled)."""
    deadline = time.monotonic() + deadline_s
    while len(lines := written(out)) < count:
        assert example.returncode is None, f"the example exited {example.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"{len(lines)} of {count} finals after {deadline_s} s: {log.read_text()}"
        await asyncio.sleep(0.1)
    return lines


async def finals_in_stream(js, tenant: str) -> list[tuple[int, str, int, str]]:
    """(stream seq, session, segment id, text) of every final of the tenant TRANSCRIPTS holds, in stream order."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await js.subscribe(
        f"transcript.{tenant}.>", stream=subjects.TRANSCRIPTS_STREAM, ordered_consumer=True, config=config
    )
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            segment = decode(msg.data, Segment)
            if segment.status == "final":
                found.append((msg.metadata.sequence.stream, segment.session_id, segment.segment_id, segment.text))
            if msg.metadata.num_pending == 0:
                return found
    finally:
        await sub.unsubscribe()


async def test_the_translation_example_handles_every_final_once_in_order_across_a_kill(
    own_nats, database_url, tmp_path, nats_keys
):
    tenant, other = f"tr{uuid.uuid4().hex[:6]}", f"ot{uuid.uuid4().hex[:6]}"
    creds = nats_keys.add_tenant(tenant)  # `jetscribe tenant add`
    reader, filter_subject = nats_keys.add_reader(tenant, "translate")  # `jetscribe tenant reader T translate`
    own_nats.reload()
    durable = "translate"
    out, log = tmp_path / "translations.jsonl", tmp_path / "example.log"
    speech = sample_speech()
    audio = Audio(speech.audio, speech.sample_rate)
    async with running_services(own_nats.url, database_url, NullModel(), "translate-w1") as nc:
        js = nc.jetstream()
        # --in-order --ack-wait 15, made with rights the tenant has not (the test's root user here)
        await provision_reader(nc, reader, filter_subject, ACK_WAIT_S, max_ack_pending=1)
        example = await start_example(own_nats.url, tenant, durable, out, log, creds)
        first, _ = await asyncio.gather(  # the tenant's session, and another tenant's that it must not see
            stream_audio(nc, audio, tenant=tenant, session_id="s1", speed=0),
            stream_audio(nc, audio, tenant=other, session_id="s1", speed=0),
        )
        assert len(first.finals) >= 3, "the null model gave too few finals for a kill in the middle"

        before = await wait_written(out, 2, example, log)
        example.kill()  # SIGKILL: no clean-up, whatever it had in hand is unacked
        await example.wait()
        before = written(out)
        assert len(before) >= 2
        info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, reader)
        # Killed while translating a final (or just after writing one): that one is delivered and not acked, and it
        # is the only one, so it comes again before any later final.
        assert info.num_ack_pending <= 1, info

        second = await stream_audio(nc, audio, tenant=tenant, session_id="s2", speed=0)  # while it is down
        expected = await finals_in_stream(js, tenant)
        assert len(expected) == len(first.finals) + len(second.finals)
        assert len(before) < len(expected)

        example = await start_example(own_nats.url, tenant, durable, out, log, creds)
        await wait_written(out, len(expected), example, log)
        deadline = time.monotonic() + 30
        while True:  # every message of the filter acked: nothing is left to hand out again
            info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, reader)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.1)
        example.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(example.wait(), 30) == 0, log.read_text()

    got = [(line["stream_seq"], line["session_id"], line["segment_id"], line["text"]) for line in written(out)]
    assert got == expected, log.read_text()
    assert got[: len(before)] == [(b["stream_seq"], b["session_id"], b["segment_id"], b["text"]) for b in before]
    assert all(line["tenant"] == tenant and line["translation_is_a_stand_in"] for line in written(out))
    assert "translate: stopped; " in log.read_text()


async def test_the_example_says_in_one_line_that_it_cannot_connect(tmp_path):
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--nats",
        "nats://127.0.0.1:1",
        "--tenant",
        "acme",
        "--out",
        str(tmp_path / "t.jsonl"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(run.communicate(), 30)
    assert run.returncode == 2
    assert err.decode().strip().startswith("translate: cannot connect to nats://127.0.0.1:1")
