"""Real speech through ingest -> transcriber -> persister, checked in PostgreSQL."""

import asyncio
import os
import subprocess
import sys
import uuid

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.evaluation.speech import dialog, sample_speech
from jetscribe.evaluation.wer import normalize, wer
from jetscribe.services.persister.store import final_segments, open_engine, wait_until_ended
from jetscribe.shared import subjects
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.e2e


async def persisted(database_url, tenant, session):
    engine = open_engine(database_url)
    try:
        row = await wait_until_ended(engine, tenant, session, timeout_s=30.0)
        return row, await final_segments(engine, tenant, session)
    finally:
        await engine.dispose()


async def assert_all_audio_acked(url):
    """Once a session has ended, no audio may be left unacknowledged or undelivered on any partition."""
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        jsm = nc.jetstream()
        for _attempt in range(30):  # acks are asynchronous: give the last ones a moment
            infos = [
                await jsm.consumer_info(subjects.AUDIO_STREAM, subjects.transcriber_consumer(p)) for p in range(16)
            ]
            left = [(i.name, i.num_ack_pending, i.num_pending) for i in infos if i.num_ack_pending or i.num_pending]
            if not left:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"audio left unacknowledged: {left}")
    finally:
        await nc.close()


@pytest.mark.parametrize("speed", [0.0, 4.0])
async def test_speech_is_transcribed_and_persisted(pipeline, speed):
    speech = sample_speech()
    tenant, session = "e2e", f"sample-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        live = await stream_audio(
            nc, Audio(speech.audio, speech.sample_rate), tenant=tenant, session_id=session, speed=speed
        )
    finally:
        await nc.close()
    row, segments = await persisted(pipeline.database_url, tenant, session)
    await assert_all_audio_acked(pipeline.nats_url)

    text = " ".join(s.text for s in segments if s.text)
    assert wer(speech.text, text) <= 0.15, text
    assert text == live.text  # what the bot heard live is what was stored
    ids = [s.segment_id for s in segments]
    assert len(ids) == len(set(ids))
    assert all(s.status == "final" for s in segments)
    duration = len(speech.audio) / speech.sample_rate
    for before, after in zip(segments, segments[1:], strict=False):
        assert before.end_s <= after.start_s + 1e-6
    assert segments[0].start_s >= 0 and segments[-1].end_s <= duration + 1e-6
    words = [w[0].strip().lower() for s in segments for w in s.words]
    assert all(a != b for a, b in zip(words, words[1:], strict=False)), words  # no word twice in a row
    assert row.segment_count == len(segments)
    assert abs(row.audio_seconds - duration) < 0.05
    assert row.chunks_received == (len(speech.audio) + 1599) // 1600


def test_demo_command_prints_the_transcript(tmp_path):
    """`jetscribe demo` as a user runs it: its own servers and service processes, then the transcript."""
    env = {**os.environ, "JETSCRIBE_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", "demo", "--model", "tiny.en"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    speech = sample_speech()
    assert wer(speech.text, done.stdout) <= 0.15, done.stdout
    assert not (tmp_path / "home" / "demo" / "stack.json").exists()  # stopped cleanly


# No numbers: Whisper writes digits ("9") where a reference spells them, and WER would count that.
DIALOG = [
    ("A", "Good morning, could you tell me when the next train to the city leaves?"),
    ("B", "The next one leaves in a few minutes from the platform by the main entrance."),
    ("A", "Thank you. Is there a place to buy coffee near the platform?"),
    ("B", "Yes, there is a small kiosk right next to the stairs."),
    ("A", "Perfect, I will grab a cup before the train arrives."),
]


async def test_two_voice_dialog_streams_live_without_repeats(pipeline):
    """A dialog of two voices at twice real time, so interims and early finals happen as they would live."""
    speech = dialog(DIALOG, gap_s=0.7)
    tenant, session = "e2e", f"dialog-{uuid.uuid4().hex[:8]}"
    heard = []
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        live = await stream_audio(
            nc,
            Audio(speech.audio, speech.sample_rate),
            tenant=tenant,
            session_id=session,
            speed=2.0,
            on_segment=heard.append,
        )
    finally:
        await nc.close()
    row, segments = await persisted(pipeline.database_url, tenant, session)
    text = " ".join(s.text for s in segments if s.text)
    assert wer(speech.text, text) <= 0.12, text
    assert text == live.text
    words = [normalize(w[0]) for s in segments for w in s.words]
    # no word twice in a row, inside or across segments
    assert all(a != b for a, b in zip(words, words[1:], strict=False)), words
    interims = [s for s in heard if s.status == "interim"]
    assert interims, "no interim was published"
    # Stable interim words never shrink within a segment: what was agreed stays agreed.
    for segment_id in {s.segment_id for s in interims}:
        revisions = sorted((s for s in interims if s.segment_id == segment_id), key=lambda s: s.revision)
        for before, after in zip(revisions, revisions[1:], strict=False):
            assert after.stable_words >= before.stable_words
            assert [w.word for w in after.words[: before.stable_words]] == [
                w.word for w in before.words[: before.stable_words]
            ]
