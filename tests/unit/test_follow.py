import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from nats.js.api import DeliverPolicy

from jetscribe.cli.formats import show_live
from jetscribe.client.follow import as_json, consumer_config, describe, parse_since, session_of
from jetscribe.shared.wire import Segment, SessionEvent, Word

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("text, back", [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1.5m", 90)])
def test_since_a_duration_counts_back_from_now(text, back):
    assert parse_since(text, NOW) == NOW - timedelta(seconds=back)


def test_since_an_iso_time_is_taken_as_is_and_a_naive_one_as_local_time():
    assert parse_since("2025-06-01T10:00:00Z", NOW) == datetime(2025, 6, 1, 10, tzinfo=UTC)
    assert parse_since("2025-06-01T10:00:00+02:00", NOW) == datetime(2025, 6, 1, 8, tzinfo=UTC)
    local = datetime(2025, 6, 1, 10).astimezone()
    assert parse_since("2025-06-01T10:00:00", NOW) == local.astimezone(UTC)
    assert parse_since("2025-06-01 10:00", NOW).tzinfo == UTC


@pytest.mark.parametrize("text", ["yesterday", "5 minutes", "-5m", "10", ""])
def test_since_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="--since"):
        parse_since(text, NOW)


def test_consumer_is_filtered_to_the_tenants_segments_and_events_and_keeps_the_sessions():
    config = consumer_config("acme", "s1")
    assert config.filter_subject == "*.acme.>" and not config.filter_subjects
    assert [session_of(s) for s in ("transcript.acme.s1", "session.acme.s1.ended")] == ["s1", "s1"]
    assert config.deliver_policy == DeliverPolicy.NEW  # without a start: only what comes next


def test_consumer_starts_where_asked():
    assert consumer_config("acme", "s1", from_start=True).deliver_policy == DeliverPolicy.ALL
    by_time = consumer_config("acme", "s1", since=NOW)
    assert (by_time.deliver_policy, by_time.opt_start_time) == (DeliverPolicy.BY_START_TIME, NOW)
    by_seq = consumer_config("acme", "s1", from_seq=42)
    assert (by_seq.deliver_policy, by_seq.opt_start_seq) == (DeliverPolicy.BY_START_SEQUENCE, 42)


@pytest.mark.parametrize(
    "tenant, session, options",
    [
        ("acme", "s.1", {}),
        ("*", "s1", {}),
        ("acme", "s1", {"from_seq": 0}),
        ("acme", "s1", {"from_start": True, "from_seq": 3}),
    ],
)
def test_consumer_refuses_bad_ids_and_starts(tenant, session, options):
    with pytest.raises(ValueError):
        consumer_config(tenant, session, **options)


def test_json_lines_carry_type_words_as_objects_and_stream_seq():
    segment = Segment(
        tenant="acme",
        session_id="s1",
        segment_id=0,
        revision=1,
        status="interim",
        start=0.0,
        end=1.0,
        text="hello",
        words=[Word("hello", 0.0, 0.5, 0.9)],
    )
    line = json.loads(as_json(segment, 7))
    assert (line["type"], line["status"], line["stream_seq"]) == ("segment", "interim", 7)
    assert line["words"] == [{"word": "hello", "start": 0.0, "end": 0.5, "probability": 0.9, "speaker": None}]
    event = json.loads(as_json(SessionEvent(tenant="acme", session_id="s1", event="ended", at=1.0), 8))
    assert (event["type"], event["event"]) == ("session_event", "ended")


def test_events_read_as_one_line():
    rejected = SessionEvent(tenant="acme", session_id="s1", event="rejected", at=1.0, reason="worker_full")
    assert describe(rejected).startswith("-- session s1 rejected: worker_full")
    refused = SessionEvent(tenant="acme", session_id="s1", event="ended", at=1.0, reason="refused: bad_payload")
    assert describe(refused).startswith("-- session s1 ended: refused: bad_payload (")
    gap = SessionEvent(tenant="acme", session_id="s1", event="utterance_end", at=1.0, last_word_end=3.25)
    assert describe(gap) == "-- utterance end: no word since 3.25 s"
    onset = SessionEvent(tenant="acme", session_id="s1", event="speech_started", at=1.0, timestamp=0.5)
    assert describe(onset) == "-- speech started at 0.50 s"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_live_lines_rewrite_interims_on_a_terminal_and_leave_them_out_elsewhere():
    interim = Segment(tenant="a", session_id="s", segment_id=0, revision=0, status="interim", start=0, end=1, text="he")
    final = Segment(tenant="a", session_id="s", segment_id=0, revision=1, status="final", start=0, end=1, text="hey")
    piped, terminal = io.StringIO(), Terminal()
    for segment in (interim, final):
        show_live(segment, piped)
        show_live(segment, terminal)
    assert piped.getvalue() == "[   0.00 -    1.00] hey\n"
    assert terminal.getvalue() == "\r\033[K  … he\r\033[K[   0.00 -    1.00] hey\n"


def test_a_tenants_follow_replays_through_the_history_then_goes_on_live():
    from jetscribe.client.follow import LiveOnly, LiveReader, _reader
    from jetscribe.client.history import HistoryReader

    live = consumer_config("acme", "s1")
    assert isinstance(_reader(None, live, ["transcript.acme.s1"], live=True), LiveReader)
    replays = ((consumer_config("acme", "s1", from_start=True), 0), (consumer_config("acme", "s1", from_seq=5), 5))
    for replay, from_seq in replays:
        reader = _reader(None, replay, ["transcript.acme.s1"], live=True, tenant="acme", session="s1")
        assert isinstance(reader, HistoryReader) and isinstance(reader.live, LiveReader)
        assert reader.from_seq == from_seq
    since = consumer_config("acme", "s1", since=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(LiveOnly, match="jetscribe tenant reader"):
        _reader(None, since, ["transcript.acme.s1"], live=True, tenant="acme", session="s1")
    with pytest.raises(LiveOnly):  # a meeting: every session of the tenant
        _reader(None, consumer_config("acme", "m1", from_start=True), ["transcript.acme.>"], live=True)
