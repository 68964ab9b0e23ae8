"""A session's life in the core: admission, idle timeout, takeover totals, limits, reuse, VAD frames."""

import numpy as np
import pytest

from jetscribe.services.transcriber.core import SessionLimits, is_reused
from jetscribe.services.transcriber.instruments import reason_label
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.wire import END_REASON_MAX_CHARS, SessionControl, SessionEvent
from tests.unit.transcriber.scripted import CHUNK, chunk, end_message, feed, finish, new_stream, said, silence, tone


def start_message():
    return SessionControl(tenant="acme", session_id="s1", action="start")


def test_a_new_session_is_announced_and_checkpointed_before_anything_else():
    s = new_stream()
    step = s.receive(start_message(), "start")
    assert [e.event for e in step.events] == ["started"] and step.checkpoint.acked_seq == -1
    assert step.ack == ["start"]


def test_a_session_beyond_the_worker_limit_is_rejected():
    s = new_stream(limits=SessionLimits(max_sessions=2), sessions_before=2)
    step = s.receive(start_message(), "start")
    assert [e.code for e in step.errors] == ["worker_full"]
    assert [(e.event, e.reason) for e in step.events] == [("rejected", "worker_full")]
    assert step.ack == ["start"] and step.closed and step.checkpoint.finished
    assert s.receive(chunk(0, tone(0.1)), 0).ack == [0]  # later audio is acked unused


def test_a_session_whose_audio_piles_up_is_rejected_and_everything_acked():
    s = new_stream(limits=SessionLimits(max_buffered_s=1.0), max_utterance_s=30.0)
    feed(s, tone(1.2))
    assert [(e.event, e.reason) for e in s.events][-1] == ("rejected", "buffer_full")
    assert sorted(s.acked) == list(range(12))  # what came after the rejection is acked unused too


def test_a_session_without_audio_yet_is_not_idle_on_a_long_running_host():
    """Regression: the idle clock started at 0.0 and the host's monotonic clock counts from boot."""
    clock = ManualClock()  # ten days since boot
    s = new_stream(clock, limits=SessionLimits(idle_timeout_s=30.0))
    s.receive(start_message(), "start")
    clock.advance(2.5)  # a meeting bot in a silent room sends its first chunk late
    assert s.tick().empty
    step = s.receive(chunk(0, silence(0.1)), 0)
    assert not step.closed and not s.ending


def test_an_idle_session_with_nothing_to_decode_ends_at_once():
    """Regression: the idle end was only published by a later decode or message, so it never came."""
    clock = ManualClock()
    s = new_stream(clock, limits=SessionLimits(idle_timeout_s=30.0))
    feed(s, silence(1.0))
    clock.advance(31.0)
    step = s.tick()
    assert [(e.event, e.reason) for e in step.events] == [("ended", "idle_timeout")]
    assert step.closed and step.checkpoint.finished and sorted(s.acked) == list(range(10))
    assert step.notes  # the shell logs why


def test_an_idle_session_with_speech_open_is_flushed_then_ended():
    clock = ManualClock()
    s = new_stream(clock, limits=SessionLimits(idle_timeout_s=30.0))
    feed(s, tone(1.0))
    clock.advance(31.0)
    assert s.tick().events == []
    step = s.complete(s.next_job(), said("hello"))
    assert [g.status for g in step.segments] == ["final"]
    assert [(e.event, e.reason) for e in step.events] == [("ended", "idle_timeout")]


def end_with(reason):
    return SessionControl(tenant="acme", session_id="s1", action="end", reason=reason)


def test_an_end_that_gives_a_reason_flushes_the_open_utterance_and_ends_with_that_reason():
    """The gateway ends a WebSocket session whose input it refused (`refused: <code>`): at once, not at the idle
    timeout, with the audio so far finalized and the reason on the `ended`."""
    s = new_stream()
    feed(s, tone(1.0))  # speech still open: no endpoint yet
    step = s.receive(end_with("refused: bad_payload"), "end")
    assert step.events == [] and not step.closed  # its final comes first
    step = s.complete(s.next_job(), said("bye"))
    assert [g.status for g in step.segments] == ["final"]
    assert [(e.event, e.reason) for e in step.events] == [("ended", "refused: bad_payload")]
    assert step.events[0].chunks_received == 10 and step.closed and step.checkpoint.finished
    assert sorted(s.acked[:-1]) == list(range(10)) and s.acked[-1] == "end"


def test_an_end_with_nothing_open_ends_at_once_with_its_reason_and_a_plain_end_with_none():
    for reason in ("refused: revoked", ""):
        s = new_stream()
        feed(s, silence(0.5))
        step = s.receive(end_with(reason), "end")
        assert [(e.event, e.reason) for e in step.events] == [("ended", reason)] and step.closed


def test_an_ends_reason_is_kept_printable_on_one_line_and_bounded():
    """A bot may send any reason: it goes into Postgres (no NUL), a log line and the event, so it is cleaned."""
    s = new_stream()
    feed(s, silence(0.3))
    step = s.receive(end_with("  bye\x00now\n\tthen " + "x" * 500), "end")
    [ended] = step.events
    assert ended.reason.startswith("bye now then xxx") and len(ended.reason) == END_REASON_MAX_CHARS


def test_an_end_during_an_idle_end_keeps_the_idle_timeout():
    clock = ManualClock()
    s = new_stream(clock, limits=SessionLimits(idle_timeout_s=30.0))
    feed(s, tone(1.0))
    clock.advance(31.0)
    s.tick()  # the idle end: the open utterance's final is due
    s.receive(end_with("refused: bad_payload"), "end")
    step = s.complete(s.next_job(), said("hello"))
    assert [(e.event, e.reason) for e in step.events] == [("ended", "idle_timeout")]


def test_the_metric_label_of_an_events_reason_is_bounded():
    def label(event, reason):
        return reason_label(SessionEvent(tenant="a", session_id="b", event=event, at=1.0, reason=reason))

    assert [label("ended", r) for r in ("", "idle_timeout", "refused: bad_payload", "my own words")] == [
        "",
        "idle_timeout",
        "refused",
        "given",
    ]
    assert label("rejected", "worker_full") == "worker_full"


def test_totals_stay_exact_across_a_takeover():
    """Regression: the checkpoint counted chunks not yet acked, which the next owner counted again."""
    audio = np.concatenate([tone(1.0), silence(0.8), tone(1.0)])  # the last utterance is still open
    s = new_stream()
    sent = feed(s, audio)
    finish(s, s.next_job(), said("one"))
    checkpoint = s.checkpoints[-1]
    assert checkpoint.acked_seq < sent - 1  # some chunks are not acked: the next owner gets them again
    assert checkpoint.chunks_received == checkpoint.acked_seq + 1
    nxt = new_stream(checkpoint=checkpoint)
    for seq in range(checkpoint.acked_seq - 2, sent):  # the stream redelivers from before the ack floor too
        nxt.receive(chunk(seq, audio[seq * CHUNK : (seq + 1) * CHUNK]), seq)
    nxt.receive(end_message(), "end")
    finish(nxt, nxt.next_job(), said("two"))
    ended = nxt.events[-1]
    assert ended.event == "ended" and ended.chunks_received == sent
    assert nxt.checkpoints[-1].chunks_received == sent
    assert abs(ended.audio_seconds - len(audio) / 16000) < 1e-9


@pytest.mark.parametrize("frame_samples", [480, 512])
def test_the_vad_owns_its_frame_size(frame_samples):
    s = new_stream(frame_samples=frame_samples, endpoint_silence_s=0.5)
    feed(s, np.concatenate([silence(1.0), tone(2.0), silence(1.0)]))
    job = s.next_job()
    assert job.kind == "final"
    assert abs(job.start_sample / 16000 - 0.7) < 0.05 and abs(job.end_sample / 16000 - 3.2) < 0.05


def test_a_start_for_a_finished_session_is_a_reuse_of_its_id():
    assert is_reused(start_message())
    assert not is_reused(chunk(41, silence(0.1)))  # stored before the gateway heard the session was over
    assert not is_reused(end_message())
