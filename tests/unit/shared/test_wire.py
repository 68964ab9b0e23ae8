import msgspec
import pytest

from jetscribe.shared import subjects
from jetscribe.shared.wire import (
    AudioChunk,
    AudioMessage,
    DroppedWord,
    Reply,
    Segment,
    SessionControl,
    SessionEvent,
    TranscriptMessage,
    WireError,
    Word,
    decode,
    encode,
)


def chunk(**overrides):
    fields = dict(
        tenant="acme",
        session_id="s1",
        seq=0,
        sent_at=1.0,
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=b"\x00\x00" * 160,
    )
    return AudioChunk(**{**fields, **overrides})


def test_audio_chunk_round_trips_and_union_picks_type():
    data = encode(chunk(seq=7))
    assert decode(data, AudioChunk).seq == 7
    assert isinstance(decode(data, AudioMessage), AudioChunk)
    control = encode(SessionControl(tenant="acme", session_id="s1", action="end"))
    assert decode(control, AudioMessage).action == "end"


def test_segment_round_trips_words():
    seg = Segment(
        tenant="a",
        session_id="b",
        segment_id=3,
        revision=2,
        status="final",
        start=1.0,
        end=2.0,
        text="hi there",
        words=[Word(" hi", 1.0, 1.4, 0.9), Word(" there", 1.4, 2.0, 0.8)],
    )
    assert decode(encode(seg), Segment) == seg


def test_the_guard_fields_round_trip_and_are_optional_both_ways():
    seg = Segment(
        tenant="a",
        session_id="b",
        segment_id=0,
        revision=1,
        status="final",
        start=0.0,
        end=1.0,
        text="",
        dropped=[DroppedWord(" Okay.", 0.1, 0.4, 0.3, "silence")],
    )
    assert decode(encode(seg), Segment).dropped == seg.dropped
    ended = SessionEvent(tenant="a", session_id="b", event="ended", at=1.0, words_dropped=3, empty_finals=1)
    assert (decode(encode(ended), SessionEvent).words_dropped, decode(encode(ended), SessionEvent).empty_finals) == (
        3,
        1,
    )

    class OldSessionEvent(msgspec.Struct, kw_only=True, tag="session_event"):  # a reader from before the fields
        v: int
        tenant: str
        session_id: str
        event: str
        at: float

    assert msgspec.msgpack.decode(encode(ended), type=OldSessionEvent).event == "ended"
    before = msgspec.msgpack.encode(
        {"type": "session_event", "v": 1, "tenant": "a", "session_id": "b", "event": "ended", "at": 1.0}
    )
    assert decode(before, SessionEvent).words_dropped == 0  # a writer from before them


def test_garbage_bytes_are_a_clear_error():
    with pytest.raises(WireError) as err:
        decode(b"\xc1\xff garbage", AudioChunk)
    assert err.value.code == "not_msgpack"


def test_wrong_field_type_names_the_field():
    raw = msgspec.structs.asdict(chunk())
    raw["type"] = "audio"
    raw["seq"] = "seven"
    with pytest.raises(WireError) as err:
        decode(msgspec.msgpack.encode(raw), AudioChunk)
    assert err.value.code == "malformed"
    assert "seq" in str(err.value)


def test_unknown_schema_version_is_refused_even_with_other_fields():
    raw = {"type": "audio", "v": 2, "tenant": "a", "stream": "x"}
    with pytest.raises(WireError) as err:
        decode(msgspec.msgpack.encode(raw), AudioChunk)
    assert err.value.code == "unsupported_version"
    with pytest.raises(WireError) as err:
        decode(encode(chunk(v=3)), AudioChunk)
    assert err.value.code == "unsupported_version"


def test_unsupported_encoding_is_malformed():
    raw = msgspec.structs.asdict(chunk())
    raw.update(type="audio", encoding="mp3")
    with pytest.raises(WireError, match="encoding"):
        decode(msgspec.msgpack.encode(raw), AudioChunk)


def test_reply_defaults():
    assert decode(encode(Reply(ok=True)), Reply).last_seq == -1


def test_subjects_are_built_in_one_place():
    assert subjects.ingest_audio("t", "s") == "ingest.audio.t.s"
    assert subjects.audio("t", "s") == "audio.t.s"
    src, dest = subjects.audio_partition_transform(16)
    assert (src, dest) == ("audio.*.*", "audio.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(16,1,2)}}")
    assert subjects.transcript("t", "s") == "transcript.t.s"
    assert subjects.session_event("t", "s", "ended") == "session.t.s.ended"
    assert subjects.is_valid_token("meet_01-a")
    assert not subjects.is_valid_token("a.b") and not subjects.is_valid_token("*") and not subjects.is_valid_token("")


def test_session_event_can_say_rejected_and_why():
    event = SessionEvent(tenant="acme", session_id="s1", event="rejected", at=1.0, reason="worker_full")
    assert decode(encode(event), TranscriptMessage) == event
    assert decode(encode(SessionEvent(tenant="a", session_id="b", event="ended", at=1.0)), SessionEvent).reason == ""


def test_session_options_are_checked_key_by_key():
    from jetscribe.shared.wire import OptionRefused, SessionOptions, session_options

    assert session_options({}) == SessionOptions()
    asked = session_options(
        {
            "interim_results": False,
            "endpointing_ms": 200,
            "utterance_end_ms": 1000,
            "vad_events": True,
            "language": "de",
        }
    )
    assert asked == SessionOptions(False, 200, 1000, True, "de")
    assert session_options({"endpointing_ms": False}).endpointing_ms is False
    refused = [
        ({"endpoint": 300}, "endpoint", "unknown option"),
        ({"interim_results": "false"}, "interim_results", "not true or false"),
        ({"endpointing_ms": True}, "endpointing_ms", "whole number"),
        ({"endpointing_ms": 300.5}, "endpointing_ms", "whole number"),
        ({"endpointing_ms": 9}, "endpointing_ms", "outside 10..5000"),
        ({"utterance_end_ms": 999}, "utterance_end_ms", "outside 1000..5000"),
        ({"utterance_end_ms": False}, "utterance_end_ms", "whole number"),
        ({"vad_events": 1}, "vad_events", "not true or false"),
        ({"language": "klingon"}, "language", "not a Whisper language"),
    ]
    for raw, key, why in refused:
        with pytest.raises(OptionRefused) as err:
            session_options(raw)
        assert (err.value.code, err.value.key) == ("bad_option", key) and why in str(err.value), raw


def test_the_new_event_kinds_and_finalize_round_trip_and_old_readers_skip_them():
    from jetscribe.shared.wire import SessionCheckpoint

    ended_gap = SessionEvent(tenant="a", session_id="b", event="utterance_end", at=1.0, last_word_end=3.25)
    assert decode(encode(ended_gap), TranscriptMessage).last_word_end == 3.25
    started = SessionEvent(tenant="a", session_id="b", event="speech_started", at=1.0, timestamp=0.42)
    assert decode(encode(started), SessionEvent).timestamp == 0.42
    finalize = SessionControl(tenant="a", session_id="b", action="finalize", after_seq=7)
    assert decode(encode(finalize), AudioMessage) == finalize
    checkpoint = SessionCheckpoint(tenant="a", session_id="b", options={"endpointing_ms": False}, last_word_end=2.0)
    assert decode(encode(checkpoint), SessionCheckpoint) == checkpoint

    class OldCheckpoint(msgspec.Struct, kw_only=True, tag="checkpoint"):  # a worker from before options
        v: int
        tenant: str
        session_id: str
        acked_seq: int = -1

    assert msgspec.msgpack.decode(encode(checkpoint), type=OldCheckpoint).acked_seq == -1
    before = msgspec.msgpack.encode(
        {"type": "session_event", "v": 1, "tenant": "a", "session_id": "b", "event": "ended", "at": 1.0}
    )
    assert decode(before, SessionEvent).last_word_end is None  # a writer from before the fields


def test_an_ends_reason_is_optional_both_ways_and_keeps_the_version():
    """`SessionControl.reason` came after version 1: an old reader ignores it (the session still ends), an old
    writer's end has none, and the version stays 1."""
    end = SessionControl(tenant="a", session_id="b", action="end", reason="refused: bad_payload")
    assert decode(encode(end), AudioMessage) == end and end.v == 1

    class OldControl(msgspec.Struct, kw_only=True, tag="control"):  # a worker from before the reason
        v: int
        tenant: str
        session_id: str
        action: str

    assert msgspec.msgpack.decode(encode(end), type=OldControl).action == "end"
    before = msgspec.msgpack.encode({"type": "control", "v": 1, "tenant": "a", "session_id": "b", "action": "end"})
    assert decode(before, SessionControl).reason == ""
