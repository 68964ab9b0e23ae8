"""Speakers in `jetscribe transcript` formats, meeting transcripts, and the `stream` speaker options."""

import argparse
import io
import json
from types import SimpleNamespace

import pytest

from jetscribe.cli.formats import meeting_rows, render, show_live
from jetscribe.cli.main import names, speaker_turns
from jetscribe.client.bot import changes_in
from jetscribe.shared.wire import Segment, SpeakerChange

T0 = 1_700_000_000.0


def row(session, segment_id, start, text, speaker, track_start=T0):
    words = [[" " + text, start, start + 0.5, 0.9, speaker]]
    return SimpleNamespace(
        session_id=session,
        segment_id=segment_id,
        start_s=start,
        end_s=start + 0.5,
        text=text,
        speaker=speaker,
        words=words,
        track_start=track_start,
    )


def test_each_format_names_the_speaker():
    rows = [row("s", 0, 0.5, "Hello there.", "Ann"), row("s", 1, 1.5, "Hi.", "Bob <B&B>"), row("s", 2, 3, "Hm.", None)]
    assert render(rows, "text") == "Ann: Hello there.\nBob <B&B>: Hi.\nHm."
    srt = render(rows, "srt")
    assert "00:00:00,500 --> 00:00:01,000\nAnn: Hello there.\n" in srt and "\nHm.\n" in srt
    vtt = render(rows, "vtt")
    assert "<v Ann>Hello there." in vtt and "<v Bob &lt;B&amp;B&gt;>Hi." in vtt and "\nHm.\n" in vtt
    words = json.loads(render(rows, "json"))[0]["words"]
    assert words == [{"word": " Hello there.", "start": 0.5, "end": 1.0, "probability": 0.9, "speaker": "Ann"}]


def test_a_meeting_is_one_transcript_timed_from_its_first_track():
    rows = meeting_rows([row("m-ann", 0, 1.0, "First.", "Ann"), row("m-bob", 0, 0.5, "Second.", "Bob", T0 + 10)])
    assert [(r.track, r.start_s, r.words[0][1], r.speaker) for r in rows] == [
        ("m-ann", 1.0, 1.0, "Ann"),
        ("m-bob", 10.5, 10.5, "Bob"),
    ]
    assert json.loads(render(rows, "json"))[1]["track"] == "m-bob"
    assert meeting_rows([]) == []


def test_a_live_final_shows_its_speaker():
    out = io.StringIO()
    final = Segment(
        tenant="t", session_id="s", segment_id=0, revision=1, status="final", start=1, end=2, text="Yes.", speaker="Ann"
    )
    show_live(final, out)
    assert out.getvalue() == "[   1.00 -    2.00] Ann: Yes.\n"


def test_stream_options_parse_or_say_what_is_wrong():
    assert speaker_turns("4.2=Bob, 0=Ann") == [(0.0, "Ann"), (4.2, "Bob")]
    assert names("Ann, Bob") == ["Ann", "Bob"]
    for bad in ("Bob", "x=Bob", "-1=Bob", "1=", "nan=Bob"):
        with pytest.raises(argparse.ArgumentTypeError):
            speaker_turns(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        names("Ann")


def test_a_turn_goes_on_the_chunk_that_holds_it():
    turns = [(0.0, "Ann"), (0.25, "Bob"), (0.3, None)]
    assert changes_in(turns, 0.0, 0.1) == [SpeakerChange(0.0, "Ann")]
    assert changes_in(turns, 0.2, 0.3) == [SpeakerChange(0.05, "Bob")]
    assert changes_in(turns, 0.3, 0.4) == [SpeakerChange(0.0, None)]


@pytest.mark.parametrize("argv", [["transcript"], ["follow"], ["transcript", "s1", "--meeting", "m1"]])
def test_transcript_and_follow_take_a_session_or_a_meeting(argv, capsys):
    from jetscribe.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "give a session id or --meeting M" in capsys.readouterr().err
