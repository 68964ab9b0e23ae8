from datetime import UTC, datetime

import pytest

from jetscribe.services.persister.core import (
    Delivered,
    Unstorable,
    check,
    dropped_event,
    next_status,
    plan_batch,
    replaces,
    segment_row,
    session_row_from_event,
    session_touch,
    subject_route,
    timestamp,
    winning_segments,
)
from jetscribe.shared import subjects
from jetscribe.shared.wire import Segment, SessionEvent, WireError, Word

T0 = 1_700_000_000.0


def seg(segment_id=0, revision=0, status="interim", session="s1", tenant="t1", **kw) -> Segment:
    return Segment(
        tenant=tenant,
        session_id=session,
        segment_id=segment_id,
        revision=revision,
        status=status,
        start=kw.pop("start", 1.0),
        end=kw.pop("end", 2.0),
        text=kw.pop("text", f"r{revision}"),
        **kw,
    )


def started(session="s1", tenant="t1", at=T0, **kw) -> SessionEvent:
    return SessionEvent(tenant=tenant, session_id=session, event="started", at=at, **kw)


def ended(session="s1", tenant="t1", at=T0 + 60, **kw) -> SessionEvent:
    return SessionEvent(tenant=tenant, session_id=session, event="ended", at=at, **kw)


def rejected(session="s1", tenant="t1", at=T0 + 1, **kw) -> SessionEvent:
    return SessionEvent(tenant=tenant, session_id=session, event="rejected", at=at, **kw)


def at(epoch):
    return datetime.fromtimestamp(epoch, UTC)


def test_segment_row_maps_every_column():
    segment = seg(
        3,
        2,
        "final",
        text="hello world",
        start=1.5,
        end=2.5,
        words=[Word("hello", 1.5, 2.0, 0.9, "A"), Word("world", 2.0, 2.5, 0.8, "A")],
        speaker="A",
        speaker_source="bot",
        meeting_id="m1",
        track_start=T0 - 10,
        language="en",
        model="base",
        seq_first=4,
        seq_last=9,
        worker_id="w1",
        published_at=T0,
    )
    assert segment_row(segment) == {
        "tenant": "t1",
        "session_id": "s1",
        "segment_id": 3,
        "revision": 2,
        "status": "final",
        "start_s": 1.5,
        "end_s": 2.5,
        "text": "hello world",
        "words": [["hello", 1.5, 2.0, 0.9, "A"], ["world", 2.0, 2.5, 0.8, "A"]],
        "speaker": "A",
        "speaker_source": "bot",
        "meeting_id": "m1",
        "track_start": T0 - 10,
        "language": "en",
        "model": "base",
        "seq_first": 4,
        "seq_last": 9,
        "worker_id": "w1",
        "published_at": at(T0),
    }


def test_unknown_wire_values_become_null():
    row = segment_row(seg())  # model "", worker_id "", published_at 0.0 on the wire
    assert (row["model"], row["worker_id"], row["published_at"], row["language"]) == (None, None, None, None)
    assert timestamp(0.0) is None


def test_started_event_row():
    row = session_row_from_event(started(language="en", model="base", worker_id="w1"))
    assert row == {
        "tenant": "t1",
        "session_id": "s1",
        "status": "active",
        "reason": None,
        "language": "en",
        "model": "base",
        "created_at": at(T0),
        "last_activity": at(T0),
        "ended_at": None,
        "chunks_received": 0,
        "audio_seconds": 0.0,
        "words_dropped": 0,
        "empty_finals": 0,
        "worker_id": "w1",
    }


def test_started_event_row_has_no_reason_and_no_totals():
    row = session_row_from_event(
        started(reason="whatever", chunks_received=5, audio_seconds=1.0, words_dropped=2, empty_finals=1)
    )
    assert (row["reason"], row["ended_at"], row["chunks_received"], row["audio_seconds"]) == (None, None, 0, 0.0)
    assert (row["words_dropped"], row["empty_finals"]) == (0, 0)


def test_ended_event_row_carries_totals():
    row = session_row_from_event(ended(chunks_received=120, audio_seconds=59.5, words_dropped=12, empty_finals=1))
    assert row["status"] == "ended"
    assert row["reason"] is None  # the bot ended it
    assert row["ended_at"] == at(T0 + 60)
    assert (row["chunks_received"], row["audio_seconds"]) == (120, 59.5)
    assert (row["words_dropped"], row["empty_finals"]) == (12, 1)  # the guards' totals (transcriber)


def test_ended_after_an_idle_timeout_names_it():
    row = session_row_from_event(ended(reason="idle_timeout", worker_id="w2"))
    assert (row["status"], row["reason"], row["worker_id"]) == ("ended", "idle_timeout", "w2")


@pytest.mark.parametrize("reason", ["worker_full", "buffer_full"])
def test_rejected_event_row(reason):
    row = session_row_from_event(rejected(reason=reason, chunks_received=3, audio_seconds=0.3, worker_id="w1"))
    assert (row["status"], row["reason"], row["worker_id"]) == ("rejected", reason, "w1")
    assert row["ended_at"] == at(T0 + 1)  # ended_at is the time of either closing event
    assert (row["chunks_received"], row["audio_seconds"]) == (3, 0.3)


@pytest.mark.parametrize(
    "current, event, expected",
    [
        (None, "started", "active"),  # the first event creates the row
        (None, "ended", "ended"),  # its start may still be on its way
        (None, "rejected", "rejected"),
        ("active", "started", "active"),  # a replayed start
        ("active", "ended", "ended"),
        ("active", "rejected", "rejected"),
        ("ended", "started", "ended"),  # a late start never reopens
        ("ended", "ended", "ended"),  # a replayed end
        ("ended", "rejected", "ended"),  # the first closing state is kept
        ("rejected", "started", "rejected"),
        ("rejected", "rejected", "rejected"),
        ("rejected", "ended", "rejected"),
    ],
)
def test_next_status(current, event, expected):
    assert next_status(current, event) == expected


def test_replaying_any_order_of_events_ends_in_the_first_closing_state():
    def final(events):
        status = None
        for event in events:
            status = next_status(status, event)
        return status

    assert final(["started", "ended", "started", "ended", "rejected"]) == "ended"
    assert final(["ended", "started"]) == "ended"
    assert final(["rejected", "started", "ended"]) == "rejected"
    assert final(["started", "started"]) == "active"


def test_event_without_time_uses_the_stream_time():
    assert session_row_from_event(started(at=0.0), stored_at=T0 + 5)["created_at"] == at(T0 + 5)


def test_touch_uses_published_time_else_stream_time():
    assert session_touch(seg(published_at=T0 + 1), stored_at=T0 + 9)["last_activity"] == at(T0 + 1)
    assert session_touch(seg(), stored_at=T0 + 9)["last_activity"] == at(T0 + 9)
    assert session_touch(seg(), stored_at=T0)["status"] == "active"


@pytest.mark.parametrize(
    "new, old, expected",
    [
        (("final", 0), ("interim", 5), True),  # a final replaces interims, whatever their revision
        (("interim", 9), ("final", 0), False),  # an interim never replaces a final
        (("interim", 3), ("interim", 2), True),  # higher revision of the same status
        (("interim", 2), ("interim", 3), False),
        (("final", 2), ("final", 1), True),
        (("final", 1), ("final", 2), False),
        (("final", 1), ("final", 1), False),  # a repeat changes nothing
        (("interim", 1), ("interim", 1), False),
    ],
)
def test_replaces(new, old, expected):
    as_row = lambda pair: {"status": pair[0], "revision": pair[1]}  # noqa: E731
    assert replaces(as_row(new), as_row(old)) is expected


def test_winning_segments_keeps_one_row_per_segment():
    rows = [
        segment_row(s)
        for s in [
            seg(0, 0),
            seg(0, 1),
            seg(1, 0),
            seg(0, 0, "final", text="first final"),
            seg(0, 2),
            seg(0, 0, "final", text="repeat"),
            seg(1, 1, session="s2"),
        ]
    ]
    won = {(r["session_id"], r["segment_id"]): r for r in winning_segments(rows)}
    assert set(won) == {("s1", 0), ("s1", 1), ("s2", 1)}
    assert won[("s1", 0)]["text"] == "first final"  # later interim and repeated final both lose
    assert won[("s1", 1)]["revision"] == 0


def test_plan_batch():
    batch = plan_batch(
        [
            Delivered(started("s1"), T0),
            Delivered(seg(0, 0, published_at=T0 + 3), T0 + 3),
            Delivered(seg(0, 0, "final", published_at=T0 + 5), T0 + 5),
            Delivered(seg(0, 0, session="s2", published_at=T0 + 4), T0 + 4),
            Delivered(seg(1, 0, session="s2", published_at=T0 + 2), T0 + 2),
            Delivered(ended("s1"), T0 + 60),
        ]
    )
    assert [(e["session_id"], e["status"]) for e in batch.session_events] == [("s1", "active"), ("s1", "ended")]
    assert [(r["session_id"], r["segment_id"], r["status"]) for r in batch.segments] == [
        ("s1", 0, "final"),
        ("s2", 0, "interim"),
        ("s2", 1, "interim"),
    ]
    assert [(t["session_id"], t["created_at"], t["last_activity"]) for t in batch.session_touches] == [
        ("s1", at(T0 + 3), at(T0 + 5)),
        ("s2", at(T0 + 2), at(T0 + 4)),
    ]
    # s2 holds only interims, so its count of finals cannot have changed.
    assert batch.recount == [("t1", "s1")]
    assert batch


def test_live_signal_events_are_acked_with_their_batch_and_not_stored():
    gap = SessionEvent(tenant="t1", session_id="s1", event="utterance_end", at=T0 + 2, last_word_end=1.5)
    onset = SessionEvent(tenant="t1", session_id="s1", event="speech_started", at=T0 + 1, timestamp=0.3)
    assert check(subjects.session_event("t1", "s1", "utterance_end"), gap) is None  # not refused: known
    batch = plan_batch([Delivered(started("s1"), T0), Delivered(onset, T0 + 1), Delivered(gap, T0 + 2)])
    assert [(e["session_id"], e["status"]) for e in batch.session_events] == [("s1", "active")]
    assert not plan_batch([Delivered(gap, T0 + 2)]).session_events


def test_plan_of_nothing_writes_nothing():
    batch = plan_batch([])
    assert not (batch.segments or batch.session_events or batch.session_touches)


def test_check_accepts_messages_on_their_own_subject():
    assert check(subjects.transcript("t1", "s1"), seg()) is None
    assert check(subjects.session_event("t1", "s1", "ended"), ended()) is None


@pytest.mark.parametrize(
    "subject, message",
    [
        ("transcript.t2.s1", seg()),  # another tenant's subject
        ("transcript.t1.other", seg()),
        ("session.t1.s1.started", ended()),  # event token disagrees
        ("session.t1.s1.ended", seg()),  # a segment on an event subject
    ],
)
def test_check_refuses_a_message_on_someone_elses_subject(subject, message):
    assert check(subject, message).code == "subject_mismatch"


@pytest.mark.parametrize(
    "message",
    [
        seg(segment_id=2**63),
        seg(revision=-(2**63) - 1),
        seg(start=float("nan")),
        seg(words=[Word("a", 0.0, 1.0, float("inf"))]),
        seg(text="a\x00b"),
        seg(words=[Word("a\x00", 0.0, 1.0, 0.5)]),
        seg(speaker="\x00"),
        ended(chunks_received=2**64),
        ended(words_dropped=2**63),
        ended(audio_seconds=float("nan")),
        ended(worker_id="w\x00"),
        rejected(reason="worker\x00full"),
    ],
)
def test_check_refuses_what_postgres_cannot_store(message):
    if isinstance(message, Segment):
        subject = subjects.transcript(message.tenant, message.session_id)
    else:
        subject = subjects.session_event(message.tenant, message.session_id, message.event)
    assert check(subject, message).code == "malformed"


def test_check_refuses_ids_that_are_not_subject_tokens():
    long_tenant = "t" * 65
    assert check(subjects.transcript(long_tenant, "s1"), seg(tenant=long_tenant)).code == "malformed"


def test_subject_route():
    assert subject_route("transcript.t1.s1") == ("t1", "s1")
    assert subject_route("session.t1.s1.ended") == ("t1", "s1")
    assert subject_route("weird") == ("", None)


def test_dropped_event_names_tenant_session_and_cause():
    event = dropped_event("transcript.t1.s1", WireError("not_msgpack", "invalid message: boom"), T0)
    assert (event.tenant, event.session_id, event.code, event.at) == ("t1", "s1", "not_msgpack", T0)
    assert "transcript.t1.s1" in event.message and "boom" in event.message
    event = dropped_event("transcript.t1.s1", Unstorable("subject_mismatch", "nope"), T0)
    assert (event.code, event.message) == ("subject_mismatch", "transcript.t1.s1: nope")


@pytest.mark.parametrize("at", [1e20, -1e20, 2.6e11])
def test_check_refuses_times_no_datetime_holds(at):
    # Before: plan_batch raised OverflowError/ValueError on them, out of the persister's loop, and the service died.
    assert check(subjects.transcript("t1", "s1"), seg(published_at=at)).code == "malformed"
    assert check(subjects.session_event("t1", "s1", "ended"), ended(at=at)).code == "malformed"
