"""The web process's pure decisions: the key a request carries, export formats, what the browser shows."""

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from jetscribe.services.web.core import (
    MissingKey,
    UnknownFormat,
    export_filename,
    export_format,
    presented_key,
    session_detail,
    session_summary,
)


@pytest.mark.parametrize(
    ("authorization", "query", "key"),
    [
        ("Token js_abc", {}, "js_abc"),
        ("token  js_abc ", {}, "js_abc"),
        ("Bearer js_abc", {}, "js_abc"),
        (None, {"token": "js_q"}, "js_q"),
        ("Basic dXNlcg==", {"token": "js_q"}, "js_q"),  # a scheme we do not take: the query's key counts
        ("Token js_h", {"token": "js_q"}, "js_h"),  # the header wins
    ],
)
def test_the_key_comes_from_the_header_or_the_query(authorization, query, key):
    assert presented_key(authorization, query) == key


@pytest.mark.parametrize(("authorization", "query"), [(None, {}), ("Token ", {}), ("Token", {"token": " "})])
def test_no_key_is_refused_with_what_to_send(authorization, query):
    with pytest.raises(MissingKey, match="Authorization: Token") as refused:
        presented_key(authorization, query)
    assert (refused.value.code, refused.value.status) == ("missing_key", 401)


def test_export_formats_and_file_names():
    assert export_format("vtt").content_type.startswith("text/vtt")
    assert export_format("srt").suffix == "srt"
    with pytest.raises(UnknownFormat, match="srt, vtt, json"):
        export_format("txt")
    assert export_filename("call-1.2", export_format("json")) == "call-1.2.json"
    assert export_filename('a"b\r\nc/d', export_format("vtt")) == "a_b__c_d.vtt"  # nothing that breaks the header


def test_a_session_opened_shows_its_spoken_finals_with_speakers_and_times():
    row = SimpleNamespace(
        session_id="s1",
        status="ended",
        reason=None,
        language="en",
        created_at=datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC),
        ended_at=None,
        audio_seconds=12.34567,
        segment_count=2,
    )
    finals = [
        SimpleNamespace(segment_id=0, start_s=0.5, end_s=2.25, text="Hello there.", speaker="Ann"),
        SimpleNamespace(segment_id=1, start_s=3.0, end_s=3.5, text="", speaker=None),  # empty: not shown
        SimpleNamespace(segment_id=2, start_s=4.0, end_s=6.0, text="Hi.", speaker=None),
    ]
    assert session_summary(row)["created_at"] == "2026-12-02T01:02:03+00:00"
    assert session_summary(row)["audio_seconds"] == 12.346
    detail = session_detail(row, finals)
    assert detail["finals"] == [
        {"segment_id": 0, "start": 0.5, "end": 2.25, "speaker": "Ann", "text": "Hello there."},
        {"segment_id": 2, "start": 4.0, "end": 6.0, "speaker": None, "text": "Hi."},
    ]
