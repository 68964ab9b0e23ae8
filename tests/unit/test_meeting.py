"""Merging a meeting's tracks for `follow --meeting`: spoken order, holds, ends."""

import math

from jetscribe.client.meeting import MeetingMerge
from jetscribe.shared.wire import Segment, SessionEvent

T0 = 1_700_000_000.0


def seg(track, segment_id, start, status="final", meeting="m1", track_start=T0):
    return Segment(
        tenant="t",
        session_id=track,
        segment_id=segment_id,
        revision=1,
        status=status,
        start=start,
        end=start + 1.0,
        text=f"{track}{segment_id}",
        meeting_id=meeting,
        track_start=track_start,
    )


def event(track, kind, meeting="m1"):
    return SessionEvent(tenant="t", session_id=track, event=kind, at=T0, meeting_id=meeting)


def texts(segments):
    return [s.text for s in segments]


def test_a_final_waits_until_the_other_tracks_have_passed_it():
    m = MeetingMerge("m1")
    assert m.event(event("a", "started"), 0) == [] and m.event(event("b", "started"), 0) == []
    assert m.segment(seg("a", 0, 5.0), 0) == []  # b may still say something before 5 s
    assert m.event(event("b", "utterance_end"), 0) == [] and m.event(event("b", "speech_started"), 0) == []  # b is on
    assert texts(m.segment(seg("b", 0, 2.0), 0)) == ["b0"]  # a is past 2 s already
    assert texts(m.segment(seg("b", 1, 6.0, status="interim"), 0)) == ["a0"]  # b is past 5 s now
    assert m.segment(seg("b", 1, 6.0), 0) == []
    assert texts(m.event(event("a", "ended"), 0)) == ["b1"]
    assert not m.over
    m.event(event("b", "ended"), 0)
    assert m.over


def test_tracks_started_apart_merge_by_wall_time():
    m = MeetingMerge("m1")
    for track in "ab":
        m.event(event(track, "started"), 0)
    out = m.segment(seg("a", 0, 12.0), 0)  # T0 + 12
    out += m.segment(seg("b", 0, 1.0, track_start=T0 + 10), 0)  # T0 + 11: due at once, a is past it
    out += m.event(event("a", "ended"), 0) + m.event(event("b", "ended"), 0)
    assert texts(out) == ["b0", "a0"]


def test_a_silent_track_holds_others_only_for_the_hold():
    m = MeetingMerge("m1", hold_s=3.0)
    m.event(event("a", "started"), 0)
    m.event(event("quiet", "started"), 0)
    assert m.segment(seg("a", 0, 1.0), 10.0) == [] and m.wait_s(10.0) == 3.0
    assert m.due(12.9) == [] and math.isclose(m.wait_s(12.0), 1.0)
    assert texts(m.due(13.0)) == ["a0"]


def test_other_meetings_and_empty_finals_are_left_out():
    m = MeetingMerge("m1")
    assert m.segment(seg("x", 0, 1.0, meeting="m2"), 0) == [] and m.event(event("x", "started", "m2"), 0) == []
    empty = seg("a", 0, 1.0)
    empty.text = ""
    assert m.segment(empty, 0) == [] and m.held == []
    assert m.tracks == ["a"]
