"""`jetscribe follow` against a real nats-server: replay from the start, a time or a seq, and live."""

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import nats
import pytest

from jetscribe.client.follow import consumer_config, follow, tenant_filter
from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_streams
from jetscribe.shared.wire import Segment, SessionEvent, encode

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def segment(tenant, session, segment_id, status, text, revision=0):
    return Segment(
        tenant=tenant,
        session_id=session,
        segment_id=segment_id,
        revision=revision,
        status=status,
        start=float(segment_id),
        end=segment_id + 1.0,
        text=text,
        published_at=time.time(),
    )


def event(tenant, session, name):
    return SessionEvent(tenant=tenant, session_id=session, event=name, at=time.time(), audio_seconds=2.0, segments=2)


async def publish(js, message) -> int:
    """Into TRANSCRIPTS as the transcriber does; returns the stream seq."""
    if isinstance(message, Segment):
        subject = subjects.transcript(message.tenant, message.session_id)
    else:
        subject = subjects.session_event(message.tenant, message.session_id, message.event)
    return (await js.publish(subject, encode(message))).seq


@pytest.fixture
async def transcribed(nats_url):
    """A session in TRANSCRIPTS: two segments with a pause between them, then `ended`.
    Yields (connection, tenant, session, a time inside the pause, stream seq of the second segment)."""
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings(nats_url=nats_url))
    tenant, session = "acme", f"s{uuid.uuid4().hex[:8]}"
    await publish(js, event(tenant, session, "started"))
    await publish(js, segment(tenant, session, 0, "interim", "hello"))
    await publish(js, segment(tenant, session, 0, "final", "hello there", revision=1))
    await asyncio.sleep(0.2)
    pause = datetime.now(UTC)
    await asyncio.sleep(0.2)
    second = await publish(js, segment(tenant, session, 1, "final", "general kenobi"))
    await publish(js, event(tenant, session, "ended"))
    yield nc, tenant, session, pause, second
    await nc.close()


async def run_follow(nc, tenant, session, fmt="text", **start):
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.wait_for(
        follow(nc, tenant, session, consumer_config(tenant, session, **start), fmt=fmt, out=out, err=err), 10
    )
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


async def test_from_start_prints_the_finals_and_exits_after_ended(transcribed):
    nc, tenant, session, _, _ = transcribed
    code, out, err = await run_follow(nc, tenant, session, from_start=True)
    assert code == 0
    assert out == ["[   0.00 -    1.00] hello there", "[   1.00 -    2.00] general kenobi"]
    assert err[0].startswith(f"-- session {session} started") and err[-1].startswith(f"-- session {session} ended")


async def test_since_a_time_replays_only_what_came_after_it(transcribed):
    nc, tenant, session, pause, _ = transcribed
    code, out, _ = await run_follow(nc, tenant, session, since=pause)
    assert code == 0 and out == ["[   1.00 -    2.00] general kenobi"]


async def test_json_from_a_seq_has_every_segment_and_event_with_its_seq(transcribed):
    nc, tenant, session, _, second = transcribed
    code, out, _ = await run_follow(nc, tenant, session, fmt="json", from_seq=second)
    lines = [json.loads(line) for line in out]
    assert code == 0
    assert [(x["type"], x.get("text") or x.get("event"), x["stream_seq"]) for x in lines] == [
        ("segment", "general kenobi", second),
        ("session_event", "ended", second + 1),
    ]
    code, out, _ = await run_follow(nc, tenant, session, fmt="json", from_start=True)
    assert [json.loads(line).get("status") or json.loads(line)["event"] for line in out] == [
        "started",
        "interim",
        "final",
        "final",
        "ended",
    ]


async def test_without_a_start_it_follows_what_comes_next(nats_url):
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings(nats_url=nats_url))
    tenant, session = f"t{uuid.uuid4().hex[:8]}", f"s{uuid.uuid4().hex[:8]}"
    await publish(js, segment(tenant, session, 0, "final", "before"))
    following = asyncio.create_task(run_follow(nc, tenant, session))
    while not any(
        c.config.filter_subject == tenant_filter(tenant) for c in await js.consumers_info(subjects.TRANSCRIPTS_STREAM)
    ):
        await asyncio.sleep(0.05)  # until its consumer exists
    await publish(js, segment(tenant, session, 1, "final", "after"))
    await publish(js, event(tenant, session, "ended"))
    code, out, _ = await following
    assert code == 0 and out == ["[   1.00 -    2.00] after"]
    await nc.close()


async def test_the_cli_follows_from_the_start(transcribed, nats_url):
    _, tenant, session, _, _ = transcribed
    env = {**os.environ, "NATS_URL": nats_url, "PYTHONPATH": ROOT}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jetscribe.cli.main", "follow", session, "--tenant", tenant, "--from-start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[   1.00 -    2.00] general kenobi"
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jetscribe.cli.main", "follow", session, "--since", "last week"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--since" in bad.stderr


async def test_follow_meeting_merges_its_tracks_in_spoken_order(nats_url):
    """Two tracks of a meeting, stored out of spoken order (each track's finals in its own order), plus a
    session of another meeting: `follow --meeting` prints the meeting's finals merged by wall time, with
    speakers and times from the first track's start, and exits once both tracks ended."""
    from jetscribe.client.follow import follow_meeting, meeting_consumer_config

    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings(nats_url=nats_url))
    tenant, meeting = "acme", f"m{uuid.uuid4().hex[:8]}"
    t0 = 1_700_000_000.0

    def said(track, speaker, segment_id, start, text, track_start=t0, meeting_id=meeting):
        return Segment(
            tenant=tenant,
            session_id=f"{meeting}-{track}",
            segment_id=segment_id,
            revision=1,
            status="final",
            start=start,
            end=start + 1.0,
            text=text,
            speaker=speaker,
            speaker_source="bot",
            meeting_id=meeting_id,
            track_start=track_start,
        )

    def track_event(track, name, meeting_id=meeting):
        return SessionEvent(tenant=tenant, session_id=f"{meeting}-{track}", event=name, at=t0, meeting_id=meeting_id)

    try:
        for message in (
            track_event("a", "started"),
            track_event("b", "started"),
            said("a", "Ann", 0, 1.0, "one"),
            said("a", "Ann", 1, 9.0, "four"),  # 9 s
            said("b", "Bob", 0, 0.0, "two", track_start=t0 + 3),  # 3 s
            said("b", "Bob", 1, 2.0, "three", track_start=t0 + 3),  # 5 s
            said("x", "Xi", 0, 0.5, "elsewhere", meeting_id="other"),
            track_event("a", "ended"),
            track_event("b", "ended"),
        ):
            await publish(js, message)
        out, err = io.StringIO(), io.StringIO()
        config = meeting_consumer_config(tenant, meeting, from_start=True)
        code = await asyncio.wait_for(follow_meeting(nc, tenant, meeting, config, out=out, err=err), 10)
    finally:
        await nc.close()
    assert code == 0
    assert out.getvalue().splitlines() == [
        "[   1.00 -    2.00] Ann: one",
        "[   3.00 -    4.00] Bob: two",
        "[   5.00 -    6.00] Bob: three",
        "[   9.00 -   10.00] Ann: four",
    ]
    assert len(err.getvalue().splitlines()) == 4  # the tracks' started and ended
