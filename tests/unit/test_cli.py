"""The CLI's pure parts: how failures become one line and an exit code, the sessions table, empty transcripts,
what `follow` decides before following, and how `stream` and `demo` name their numbers."""

import argparse
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest

from jetscribe.cli import main as cli
from jetscribe.cli.errors import CliError, NotFound, Refused, UsageError, as_cli_error
from jetscribe.cli.formats import render, sessions_json, sessions_table
from jetscribe.cli.stream import header, resumed_line, stopped_line, summary
from jetscribe.client.bot import Audio, BotError, StreamResult
from jetscribe.client.follow import SessionSeen, consumer_config, plan_follow
from jetscribe.shared.config import ConfigError
from jetscribe.shared.wire import Reply, Segment, SessionEvent

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def test_expected_failures_are_coded_with_their_exit_code():
    assert UsageError("x").exit_code == 2 and NotFound("x").exit_code == 1 and Refused("x").exit_code == 1
    ended = as_cli_error(BotError(Reply(ok=False, code="session_ended", message="session s1 has ended")))
    assert isinstance(ended, Refused) and ended.exit_code == 1
    assert str(ended) == (
        "session s1 has ended (session_ended); a session id cannot be used again once it ended: pick a new --session"
    )
    assert as_cli_error(ConfigError("JETSCRIBE_X: no")).exit_code == 2
    assert as_cli_error(TimeoutError("no answer from the ingest gateway")).exit_code == 1
    assert as_cli_error(KeyError("a bug")) is None  # a bug keeps its traceback


def test_main_prints_one_line_and_the_traceback_only_with_debug(capsys):
    def fails(args):
        raise NotFound("no session s1 of tenant acme")

    args = SimpleNamespace(command="transcript", debug=False)
    assert cli.run_command(fails, args) == 1
    assert capsys.readouterr().err == "jetscribe transcript: no session s1 of tenant acme\n"
    assert cli.run_command(fails, SimpleNamespace(command="transcript", debug=True)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("jetscribe transcript: no session s1 of tenant acme\n")

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli.run_command(interrupted, args) == 130
    assert capsys.readouterr().err == "jetscribe transcript: interrupted\n"


def test_usage_errors_from_argparse_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["stream", "a.wav", "--session", "s1", "--language", "klingon"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'klingon' is not a Whisper language code" in err and "--help" in err


def test_every_option_has_help():
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, sub in [("jetscribe", parser), *commands.choices.items()]
        for action in sub._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


def row(session_id: str, **kw):
    fields = {
        "tenant": "acme",
        "session_id": session_id,
        "status": "ended",
        "reason": None,
        "language": "en",
        "model": "null",
        "created_at": T0,
        "ended_at": T0,
        "last_activity": T0,
        "chunks_received": 10,
        "audio_seconds": 1.0,
        "segment_count": 2,
        "words_dropped": 0,
        "empty_finals": 0,
        "worker_id": "w1",
    }
    return SimpleNamespace(**(fields | kw))


def test_sessions_table_columns_fit_the_longest_id():
    long_id = "x" * 64
    lines = sessions_table([row(long_id), row("s1", status="rejected", reason="worker_full")]).splitlines()
    status = lines[0].index("status")
    assert [line[status:].split()[0] for line in lines] == ["status", "ended", "rejected"]
    assert lines[1].split()[1] == long_id and lines[2].split()[3] == "worker_full"
    assert lines[0].index("started") == lines[1].index("2026-12-01")


def test_sessions_json_has_every_field():
    [one] = json.loads(sessions_json([row("s1")]))
    assert one["session_id"] == "s1" and one["created_at"] == T0.isoformat() and one["segment_count"] == 2


def test_no_finals_is_an_empty_transcript_in_every_format():
    assert render([], "json") == "[]"
    assert render([], "vtt") == "WEBVTT\n\n"
    assert render([], "srt") == "" and render([], "text") == ""


def seen(**kw) -> SessionSeen:
    return SessionSeen(**({"messages": 3, "last_stream_seq": 100} | kw))


def test_follow_refuses_an_unknown_session_unless_asked_to_wait():
    config = consumer_config("acme", "s1", from_start=True)
    plan = plan_follow(seen(messages=0), "acme", "s1", config, keep=False, wait=False)
    assert plan.exit_code == 1 and "no session s1 of tenant acme" in plan.message and "--wait" in plan.message
    plan = plan_follow(seen(messages=0), "acme", "s1", config, keep=False, wait=True)
    assert plan.exit_code is None and "not started yet" in plan.message


def test_follow_of_an_ended_session_from_a_point_after_its_end_says_nothing_will_come():
    ended = seen(closed_event="ended", closed_seq=50, closed_at=T0)
    for config in (
        consumer_config("acme", "s1"),
        consumer_config("acme", "s1", from_seq=51),
        consumer_config("acme", "s1", since=datetime(2026, 12, 1, 11, tzinfo=UTC)),
    ):
        plan = plan_follow(ended, "acme", "s1", config, keep=False, wait=False)
        assert plan.exit_code == 0 and "already ended" in plan.message and "--from-start" in plan.message
    rejected = plan_follow(
        seen(closed_event="rejected", closed_seq=50),
        "acme",
        "s1",
        consumer_config("acme", "s1"),
        keep=False,
        wait=False,
    )
    assert rejected.exit_code == 1
    for config in (consumer_config("acme", "s1", from_start=True), consumer_config("acme", "s1", from_seq=50)):
        assert plan_follow(ended, "acme", "s1", config, keep=False, wait=False).exit_code is None
    assert plan_follow(ended, "acme", "s1", consumer_config("acme", "s1"), keep=True, wait=False).exit_code is None


def test_follow_says_when_from_seq_is_past_the_end_of_the_stream():
    plan = plan_follow(seen(), "acme", "s1", consumer_config("acme", "s1", from_seq=500), keep=False, wait=False)
    assert plan.exit_code is None
    assert "--from-seq 500 is past the end of TRANSCRIPTS (last seq 100)" in plan.message
    plan = plan_follow(seen(), "acme", "s1", consumer_config("acme", "s1", from_seq=90), keep=False, wait=False)
    assert plan.message == "following session s1 of tenant acme from stream seq 90; Ctrl-C stops"


def final(segment_id: int, text: str = "hi") -> Segment:
    return Segment(
        tenant="acme",
        session_id="s1",
        segment_id=segment_id,
        revision=0,
        status="final",
        start=0.0,
        end=1.0,
        text=text,
    )


def streamed(speed_sent: list[float], heard_at: list[float], **kw) -> StreamResult:
    result = StreamResult(sent_at=speed_sent, **kw)
    for i, at in enumerate(heard_at):
        result.finals[i] = final(i)
        result.heard.append((at, result.finals[i]))
    return result


def test_stream_summary_names_the_last_final_delay_for_what_it_is():
    result = streamed([100.0, 100.1, 100.2], [100.5, 101.0])
    live = summary(result, 0.1, 1.0)
    assert live.startswith("sent 0.3 s of audio in 3 chunks; 2 finals heard; last final 0.80 s after")
    assert "(its final latency)" in live
    fast = summary(result, 0.1, 0.0)
    assert "at --speed 0 this includes the backlog" in fast and "not a latency" in fast
    result.ended = SessionEvent(tenant="acme", session_id="s1", event="ended", at=1.0, audio_seconds=0.3, segments=2)
    assert summary(result, 0.1, 1.0).endswith("session ended: 0.3 s of audio, 2 finals")


def test_stream_header_resume_and_stop_lines():
    audio = Audio(np.zeros((48_000, 2), dtype=np.int16), 48_000)
    line = header("talk.wav", audio, "acme", "s1", "nats://127.0.0.1:4222", 0)
    assert line == (
        "streaming talk.wav (1.0 s, 48000 Hz, 2 ch) as session s1 of tenant acme to NATS nats://127.0.0.1:4222, "
        "as fast as possible; Ctrl-C ends the session"
    )
    assert resumed_line(StreamResult(resumed_after=-1, total_chunks=10), 0.1) is None
    assert resumed_line(StreamResult(resumed_after=3, total_chunks=10), 0.1) == (
        "resuming session: the gateway already has chunks 0-3 (0.4 s); sending from chunk 4"
    )
    assert "resume it with `jetscribe stream talk.wav --session s1 --tenant acme`" in stopped_line(
        StreamResult(), "acme", "s1", "talk.wav"
    )
    assert stopped_line(StreamResult(end_sent=True), "acme", "s1", "talk.wav").startswith("stopped; sent the")


def test_demo_timing_calls_a_whole_file_sent_at_once_a_backlog():
    live = SimpleNamespace(sent_at=[100.0, 100.5])
    fast = cli.demo_timing(30.0, 0.0, live, 113.9)
    assert "13.40 s after the last chunk: the backlog of transcribing audio sent all at once" in fast
    assert "not a live latency" in fast
    real = cli.demo_timing(30.0, 1.0, live, 101.2)
    assert "0.70 s after the last chunk was sent: the final latency of the last utterance" in real


def test_cli_errors_keep_their_code():
    assert CliError("x", code="timeout").code == "timeout" and UsageError("x").code == "usage"
