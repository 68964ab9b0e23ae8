"""Speakers the bot knows, through the whole pipeline on a two-voice dialog: every final's speaker, and every
word's, must be the script's. Three ways a bot knows: speaker-change events on one session, one session per
participant's track of a meeting, a 2-channel recording (one participant per channel, split by the gateway).
And an old bot, whose messages know none of this, still works."""

import asyncio
import time
import uuid

import msgspec
import nats
import numpy as np
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.evaluation.speakers import bot_turns, speaker_errors, words_split_wrongly
from jetscribe.evaluation.speech import dialog
from jetscribe.evaluation.wer import wer
from jetscribe.services.persister.store import meeting_segments, open_engine, wait_until_ended
from jetscribe.shared import subjects
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import Reply, decode
from tests.e2e.test_pipeline import assert_all_audio_acked, persisted

pytestmark = pytest.mark.e2e

DIALOG = [
    ("A", "Could you send me the agenda for the meeting tomorrow?"),
    ("B", "Sure, I will mail it tonight with the budget figures."),
    ("A", "Thanks, and please add the hiring plan as the last item."),
    ("B", "Good idea, we ran out of time for it last week."),
]
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def speech():
    # Pauses shorter than the endpoint silence (0.5 s): turns run into one utterance, so finals must be split
    # where the speaker changes.
    return dialog(DIALOG, gap_s=0.35, lead_s=0.5, tail_s=1.0)


def tracks_of(speech):
    """The dialog as each participant's own microphone hears it: their turns, silence elsewhere."""
    changes = bot_turns(speech.turns) + [(len(speech.audio) / SAMPLE_RATE, None)]
    tracks = {"A": np.zeros_like(speech.audio), "B": np.zeros_like(speech.audio)}
    for (at, who), (until, _) in zip(changes, changes[1:], strict=False):
        lo, hi = round(at * SAMPLE_RATE), round(until * SAMPLE_RATE)
        tracks[who][lo:hi] = speech.audio[lo:hi]
    return tracks


def check_against_script(speech, rows, shift=lambda row: 0.0):
    """Every final's and every word's speaker is the script's; the words are the script's in its order."""
    finals = [(r.start_s + shift(r), r.end_s + shift(r), r.speaker, r.text) for r in rows]
    assert not speaker_errors(speech.turns, finals), speaker_errors(speech.turns, finals)
    words = [(r.speaker, [[w[0], w[1] + shift(r), w[2] + shift(r), *w[3:]] for w in r.words]) for r in rows]
    assert not words_split_wrongly(speech.turns, words), words_split_wrongly(speech.turns, words)
    assert all(r.speaker_source == "bot" for r in rows)
    for who in "AB":
        said = " ".join(r.text for r in rows if r.speaker == who)
        script = " ".join(text for speaker, text in DIALOG if speaker == who)
        assert wer(script, said) <= 0.2, (who, said)


async def test_speaker_changes_split_finals_and_label_their_words(pipeline, speech):
    tenant, session = "e2e", f"turns-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        live = await stream_audio(
            nc,
            Audio(speech.audio, SAMPLE_RATE),
            tenant=tenant,
            session_id=session,
            speed=0.0,
            speaker_turns=bot_turns(speech.turns),
        )
    finally:
        await nc.close()
    _, rows = await persisted(pipeline.database_url, tenant, session)
    check_against_script(speech, rows)
    assert [r.speaker for r in rows if r.text] == [s.speaker for s in live.final_segments() if s.text]
    # The turns ran into fewer utterances than turns: at least one final was split at a change.
    assert len({r.seq_first for r in rows}) < len(rows) or len(rows) >= len(DIALOG)
    await assert_all_audio_acked(pipeline.nats_url)


async def meeting(database_url, tenant, meeting_id, tracks):
    engine = open_engine(database_url)
    try:
        for track in tracks:
            await wait_until_ended(engine, tenant, track, timeout_s=60.0)
        return await meeting_segments(engine, tenant, meeting_id)
    finally:
        await engine.dispose()


async def test_a_meeting_sent_as_one_track_per_participant(pipeline, speech):
    tenant, meeting_id = "e2e", f"meet-{uuid.uuid4().hex[:8]}"
    tracks = tracks_of(speech)
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        await asyncio.gather(
            *(
                stream_audio(
                    nc,
                    Audio(audio, SAMPLE_RATE),
                    tenant=tenant,
                    session_id=f"{meeting_id}-{who}",
                    speed=0.0,
                    speaker=who,
                    meeting_id=meeting_id,
                    track_start=T0,
                )
                for who, audio in tracks.items()
            )
        )
    finally:
        await nc.close()
    rows = await meeting(pipeline.database_url, tenant, meeting_id, [f"{meeting_id}-A", f"{meeting_id}-B"])
    assert {(r.session_id, r.speaker) for r in rows} == {(f"{meeting_id}-A", "A"), (f"{meeting_id}-B", "B")}
    assert all(r.track_start == T0 for r in rows)
    check_against_script(speech, rows)
    merged = " ".join(r.text for r in rows)
    assert wer(speech.text, merged) <= 0.2, merged  # spoken order: the merge interleaves the tracks right


async def test_a_two_channel_recording_is_split_into_labelled_tracks(pipeline, speech):
    tenant, session = "e2e", f"stereo-{uuid.uuid4().hex[:8]}"
    tracks = tracks_of(speech)
    stereo = np.stack([tracks["A"], tracks["B"]], axis=1)
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        live = await stream_audio(
            nc, Audio(stereo, SAMPLE_RATE), tenant=tenant, session_id=session, speed=0.0, channel_speakers=["A", "B"]
        )
    finally:
        await nc.close()
    channels = [subjects.channel_track(session, 0), subjects.channel_track(session, 1)]
    rows = await meeting(pipeline.database_url, tenant, session, channels)
    assert {(r.session_id, r.speaker) for r in rows} == {(channels[0], "A"), (channels[1], "B")}
    starts = {r.track_start for r in rows}
    assert len(starts) == 1 and abs(starts.pop() - time.time()) < 300  # both tracks start at the bot's start
    check_against_script(speech, rows)
    assert [r.text for r in rows] == [s.text for s in live.final_segments() if s.text]
    await assert_all_audio_acked(pipeline.nats_url)


class OldControl(msgspec.Struct, kw_only=True, tag="control"):
    """A SessionControl as a bot built before speakers wrote it (schema version 1, none of the new fields)."""

    v: int = 1
    tenant: str
    session_id: str
    action: str
    language: str = "auto"
    sent_at: float = 0.0


class OldChunk(msgspec.Struct, kw_only=True, tag="audio"):
    v: int = 1
    tenant: str
    session_id: str
    seq: int
    sent_at: float
    sample_rate: int
    channels: int
    encoding: str
    payload: bytes


async def test_an_old_bot_without_speakers_still_works(pipeline, speech):
    tenant, session = "e2e", f"old-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))

    async def ask(subject, message):
        reply = decode((await nc.request(subject, msgspec.msgpack.encode(message), timeout=10)).data, Reply)
        assert reply.ok, reply
        return reply

    try:
        await ask(
            subjects.ingest_session(tenant, session), OldControl(tenant=tenant, session_id=session, action="start")
        )
        step = SAMPLE_RATE // 10
        for seq, off in enumerate(range(0, len(speech.audio), step)):
            piece = speech.audio[off : off + step].astype("<i2").tobytes()
            chunk = OldChunk(
                tenant=tenant,
                session_id=session,
                seq=seq,
                sent_at=time.time(),
                sample_rate=SAMPLE_RATE,
                channels=1,
                encoding="pcm_s16le",
                payload=piece,
            )
            await ask(subjects.ingest_audio(tenant, session), chunk)
        await ask(subjects.ingest_session(tenant, session), OldControl(tenant=tenant, session_id=session, action="end"))
    finally:
        await nc.close()
    row, rows = await persisted(pipeline.database_url, tenant, session)
    assert row.status == "ended" and rows
    assert all(r.speaker is None and r.speaker_source is None and r.meeting_id is None for r in rows)
    assert all(len(w) == 4 for r in rows for w in r.words)  # words as before: no speaker item
    assert wer(speech.text, " ".join(r.text for r in rows)) <= 0.2
