"""The gateway's checks of what a bot says about speakers, and the split of multichannel audio into tracks."""

import msgspec
import numpy as np
import pytest

from jetscribe.services.ingest.core import IngestBook, RequestRefused, split_channels
from jetscribe.shared.config import IngestConfig
from jetscribe.shared.subjects import channel_track
from jetscribe.shared.wire import AudioChunk, SessionControl, SpeakerChange


def chunk(samples, channels=1, rate=16000, **fields):
    return AudioChunk(
        tenant="acme",
        session_id="m1",
        seq=0,
        sent_at=0.0,
        sample_rate=rate,
        channels=channels,
        encoding="pcm_s16le",
        payload=np.asarray(samples, dtype="<i2").tobytes(),
        **fields,
    )


def refused(call):
    with pytest.raises(RequestRefused) as err:
        call()
    return err.value.code


def test_a_chunk_with_speakers_is_stored_with_them():
    book = IngestBook(IngestConfig())
    book.start(SessionControl(tenant="acme", session_id="m1", action="start", speaker="Ann", meeting_id="meet-1"))
    said = chunk(np.zeros(1600), speaker="Ann", speaker_changes=[SpeakerChange(0.05, "Bob")])
    stored = book.check_chunk(said).store
    assert stored.speaker == "Ann" and stored.speaker_changes == [SpeakerChange(0.05, "Bob")]


@pytest.mark.parametrize(
    "fields",
    [
        {"speaker": ""},
        {"speaker": "a\nb"},
        {"speaker": "x" * 129},
        {"speaker_changes": [SpeakerChange(0.2, "Bob")]},  # the chunk holds 0.1 s
        {"speaker_changes": [SpeakerChange(float("nan"), "Bob")]},
        {"speaker_changes": [SpeakerChange(0.0, "\x00")]},
        {"speaker_changes": [SpeakerChange(0.0, "Bob")] * 65},
    ],
)
def test_bad_speakers_on_a_chunk_are_refused(fields):
    book = IngestBook(IngestConfig())
    book.start(SessionControl(tenant="acme", session_id="m1", action="start"))
    assert refused(lambda: book.check_chunk(chunk(np.zeros(1600), **fields))) == "bad_speaker"


def test_a_bad_track_start_is_refused():
    book = IngestBook(IngestConfig())
    start = SessionControl(tenant="acme", session_id="m1", action="start")
    assert refused(lambda: book.start(msgspec.structs.replace(start, meeting_id="a b"))) == "bad_id"
    assert refused(lambda: book.start(msgspec.structs.replace(start, track_start=float("inf")))) == "bad_track_start"
    assert refused(lambda: book.start(msgspec.structs.replace(start, speaker="\t"))) == "bad_speaker"


def test_each_channel_becomes_a_track_of_the_meeting():
    start = SessionControl(
        tenant="acme", session_id="m1", action="start", channel_speakers=["Ann", "Bob"], sent_at=5.0, language="en"
    )
    tracks = split_channels(start)
    assert [(t.session_id, t.speaker, t.meeting_id, t.track_start, t.language) for t in tracks] == [
        ("m1-ch0", "Ann", "m1", 5.0, "en"),
        ("m1-ch1", "Bob", "m1", 5.0, "en"),
    ]
    assert all(not t.channel_speakers for t in tracks)
    left, right = np.arange(0, 100, dtype="<i2"), -np.arange(0, 100, dtype="<i2")
    stereo = chunk(np.stack([left, right], axis=1).reshape(-1), channels=2, channel_speakers=["Ann", "Bob"])
    parts = split_channels(stereo)
    assert [p.session_id for p in parts] == [channel_track("m1", 0), channel_track("m1", 1)]
    assert np.array_equal(np.frombuffer(parts[0].payload, "<i2"), left)
    assert np.array_equal(np.frombuffer(parts[1].payload, "<i2"), right)
    assert all(p.channels == 1 and p.seq == 0 for p in parts)


def test_what_cannot_be_split_is_refused():
    two = ["Ann", "Bob"]
    assert refused(lambda: split_channels(chunk(np.zeros(300), channels=3, channel_speakers=two))) == "bad_channels"
    assert refused(lambda: split_channels(chunk(np.zeros(100), channel_speakers=["Ann"]))) == "bad_channels"
    odd = chunk(np.zeros(3), channels=2, channel_speakers=two)
    assert refused(lambda: split_channels(odd)) == "bad_payload"
    labelled = chunk(np.zeros(4), channels=2, channel_speakers=two, speaker="Ann")
    assert refused(lambda: split_channels(labelled)) == "bad_speaker"
    big = chunk(np.zeros(1000), channels=2, channel_speakers=two)
    assert refused(lambda: split_channels(big, max_chunk_bytes=1999)) == "too_large"
    assert len(split_channels(big, max_chunk_bytes=2000)) == 2
    long_id = SessionControl(tenant="acme", session_id="m" * 62, action="start", channel_speakers=two)
    assert refused(lambda: split_channels(long_id)) == "bad_id"
