"""Speakers from the audio, through the whole pipeline (real nats-server and PostgreSQL, the CAM++ voice model):
a generated two-voice dialog whose turns run into each other, streamed by a bot that says nothing about speakers.
Each script speaker must get one label of its own for the whole session, every final and nearly every word the
label of whoever the script says talks there (a final spanning a change is split)."""

import asyncio
import uuid
from collections import Counter

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speakers import diarization_error, script_speaker, speaker_spans
from jetscribe.evaluation.speech import dialog
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from tests.e2e.test_pipeline import assert_all_audio_acked, persisted
from tests.integration.running import gather_replies

pytest.importorskip("torch", reason="speakers from the audio need the `speakers` extra")
pytestmark = pytest.mark.e2e

DIALOG = [
    ("A", "Could you send me the agenda for the meeting tomorrow?"),
    ("B", "Sure, I will mail it tonight with the budget figures."),
    ("A", "Thanks, and please add the hiring plan as the last item."),
    ("B", "Good idea, we ran out of time for it last week."),
    ("A", "Then we should start with it and keep the budget short."),
    ("B", "Fine by me. I will tell the others before noon."),
]


@pytest.fixture(scope="module")
def speech():
    # Pauses shorter than the endpoint silence (0.5 s): turns run into one utterance, so the voice must split them.
    return dialog(DIALOG, gap_s=0.35, lead_s=0.5, tail_s=1.0)


@pytest.fixture(scope="module")
async def voice_pipeline(tmp_path_factory, postgres_server, tiny_model):
    postgres_server.create_database("voices")
    database_url = postgres_server.url("voices")
    upgrade(database_url)
    with NatsServer(tmp_path_factory.mktemp("voices-nats")) as server:
        settings = StreamSettings(nats_url=server.url)
        stop = asyncio.Event()
        config = TranscriberConfig(model="tiny.en", worker_id="voices-w1", speakers_audio="on")
        tasks = [
            asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
            asyncio.create_task(run_transcriber(settings, config, stop, model=tiny_model)),
            asyncio.create_task(run_persister(settings, PersisterConfig(database_url=database_url), stop)),
        ]
        await asyncio.sleep(0.5)
        yield server.url, database_url
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_two_voice_dialog_gets_one_label_per_voice_and_finals_split_at_each_change(voice_pipeline, speech):
    nats_url, database_url = voice_pipeline
    tenant, session = "e2e", f"voices-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        live = await stream_audio(nc, Audio(speech.audio, SAMPLE_RATE), tenant=tenant, session_id=session, speed=0.0)
    finally:
        await nc.close()
    _, rows = await persisted(database_url, tenant, session)
    rows = [r for r in rows if r.text]
    assert rows and all(r.speaker_source == "audio" and r.speaker for r in rows), [(r.speaker, r.text) for r in rows]
    # One label per script speaker, the same all session long.
    labels = {who: Counter() for who in "AB"}
    for r in rows:
        labels[script_speaker(speech.turns, r.start_s, r.end_s)][r.speaker] += 1
    mapping = {who: c.most_common(1)[0][0] for who, c in labels.items()}
    assert mapping["A"] != mapping["B"], labels
    assert all(len(c) == 1 for c in labels.values()), labels
    # Nearly every word carries its script speaker's label (a word at a change may go either way).
    words = [(w[4] if len(w) > 4 else None, script_speaker(speech.turns, w[1], w[2])) for r in rows for w in r.words]
    wrong = [(said, who) for said, who in words if said != mapping[who]]
    assert len(wrong) <= max(2, len(words) // 20), wrong
    # The turns ran into fewer utterances than turns: the finals were split by voice.
    assert len(rows) >= len(DIALOG) - 1
    spans = speaker_spans([(r.start_s, r.end_s, r.speaker, r.words) for r in rows])
    turns = [{"speaker": t.speaker, "start": t.start_s, "end": t.end_s} for t in speech.turns]
    assert diarization_error(turns, spans) <= 0.15
    assert [r.speaker for r in rows] == [s.speaker for s in live.final_segments() if s.text]
    await assert_all_audio_acked(nats_url)


async def test_a_session_whose_bot_names_the_speaker_embeds_no_voices(voice_pipeline, speech):
    nats_url, database_url = voice_pipeline
    tenant, session = "e2e", f"named-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        before = await _voice_stats(nc)
        live = await stream_audio(
            nc, Audio(speech.audio, SAMPLE_RATE), tenant=tenant, session_id=session, speed=0.0, speaker="ann"
        )
        after = await _voice_stats(nc)
    finally:
        await nc.close()
    finals = [s for s in live.final_segments() if s.text]
    assert finals and all(s.speaker == "ann" and s.speaker_source == "bot" for s in finals)
    # The bot's label wins on every word: not one window embedded, ahead or for a final.
    assert after["windows_embedded"] == before["windows_embedded"] and after["finals"] == before["finals"]


async def _voice_stats(nc) -> dict:
    """The worker's speakers_audio stats, once it has registered (it loads the voice model first)."""
    while not (replies := await gather_replies(nc, "$SRV.STATS.jetscribe-transcriber", 0.3)):
        pass
    [reply] = replies
    return next(e["data"] for e in reply["endpoints"] if e["name"] == "stats")["speakers_audio"]
