"""A session's options (`SessionControl.options`) change what the core does for that session alone: scripted audio,
the stand-in VAD and the null model (one word over each job's speech), no NATS."""

from collections import Counter

import numpy as np

from jetscribe.services.transcriber.core import CommitOptions, stored_message_problem
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.wire import SessionControl
from tests.unit.transcriber.scripted import CHUNK, LoudVoiceDetector, Recorded, chunk, silence, tone

MODEL = NullModel()


def stream(asked=None, checkpoint=None):
    return Recorded(
        "acme",
        "s1",
        language="en",
        model="null",
        worker_id="w1",
        options=CommitOptions(speech_above_floor_db=0.0),  # the worker's own: endpoint 0.5 s, interims every 1 s
        vad=LoudVoiceDetector(),
        clock=ManualClock(),
        checkpoint=checkpoint,
        asked=asked,
    )


def run(s, audio, first_seq=0):
    """Feed `audio` in 100 ms chunks, decoding every job at once; returns the next seq and the jobs by kind."""
    seq, jobs = first_seq, Counter()
    for off in range(0, len(audio), CHUNK):
        s.receive(chunk(seq, audio[off : off + CHUNK]), seq)
        seq += 1
        decode_all(s, jobs)
    return seq, jobs


def feed_only(s, audio, first_seq=0):
    for i, off in enumerate(range(0, len(audio), CHUNK)):
        s.receive(chunk(first_seq + i, audio[off : off + CHUNK]), first_seq + i)


def decode_all(s, jobs):
    while (job := s.next_job()) is not None:
        jobs["speculative" if job.speculative else job.kind] += 1
        s.complete(job, MODEL.decode(job))


def finals(s):
    return [g for g in s.segments if g.status == "final"]


def events(s, kind):
    return [e for e in s.events if e.event == kind]


TWO_PHRASES = np.concatenate([silence(0.3), tone(1.0), silence(0.3), tone(1.0), silence(1.0)])


def test_endpointing_200_ms_splits_what_the_default_joins():
    default, short = stream(), stream({"endpointing_ms": 200})
    run(default, TWO_PHRASES)
    run(short, TWO_PHRASES)
    assert len(finals(default)) == 1  # a 0.3 s pause is no endpoint at 0.5 s
    assert len(finals(short)) == 2
    assert finals(short)[0].end < 1.4 < finals(short)[1].start


def test_endpointing_false_ends_an_utterance_only_at_the_cap_a_finalize_or_the_end():
    s = stream({"endpointing_ms": False})
    seq, jobs = run(s, np.concatenate([tone(1.0), silence(3.0), tone(1.0), silence(3.0)]))
    assert not finals(s) and jobs["speculative"] == 0  # no pause ends it, so none is decoded ahead either
    s.receive(SessionControl(tenant="acme", session_id="s1", action="end"), "end")
    decode_all(s, Counter())
    assert len(finals(s)) == 1 and finals(s)[0].end > 4.0 and events(s, "ended")


def test_with_no_endpoint_speech_heard_before_a_pause_still_gets_its_interim():
    for asked, interims in [(None, 0), ({"endpointing_ms": False}, 1)]:
        s = stream(asked)
        feed_only(s, np.concatenate([tone(2.0), silence(0.3)]))  # all of it arrived before the decoder was free
        jobs = Counter()
        decode_all(s, jobs)
        assert jobs["interim"] == interims, asked
        decode_all(s, jobs)
        assert jobs["interim"] == interims  # once: nothing new was said since


def test_interim_results_false_publishes_no_interim_and_spends_no_decode_on_them():
    audio = np.concatenate([tone(4.0), silence(1.0), tone(3.0), silence(1.0)])
    default, quiet = stream(), stream({"interim_results": False})
    _, default_jobs = run(default, audio)
    _, quiet_jobs = run(quiet, audio)
    assert default_jobs["interim"] >= 4 and any(g.status == "interim" for g in default.segments)
    assert quiet_jobs["interim"] == 0 and all(g.status == "final" for g in quiet.segments)
    assert [g.text for g in finals(quiet)] == [g.text for g in finals(default)] == ["null", "null"]
    assert sum(quiet_jobs.values()) < sum(default_jobs.values())


def test_utterance_end_comes_once_the_gap_has_passed_in_session_audio():
    s = stream({"utterance_end_ms": 1000})
    audio = np.concatenate([silence(0.3), tone(1.0), silence(0.7)])
    seq, _ = run(s, audio)
    assert len(finals(s)) == 1 and not events(s, "utterance_end")
    last_word_end = finals(s)[0].words[-1].end
    heard_at = None
    for _ in range(20):
        step = s.receive(chunk(seq, silence(0.1)), seq)
        seq += 1
        if any(e.event == "utterance_end" for e in step.events):
            heard_at = s.segmenter.vad_pos / SAMPLE_RATE
    (event,) = events(s, "utterance_end")
    assert event.last_word_end == last_word_end
    assert last_word_end + 1.0 <= heard_at < last_word_end + 1.0 + 0.1  # the chunk that completes the gap


def test_speech_within_the_gap_defers_utterance_end_to_the_new_last_word():
    audio = np.concatenate([tone(1.0), silence(0.7), tone(1.0), silence(2.0)])
    s, plain = stream({"utterance_end_ms": 1000}), stream()
    run(s, audio)
    run(plain, audio)
    first, second = finals(s)
    assert [e.last_word_end for e in events(s, "utterance_end")] == [second.words[-1].end]
    assert len(finals(plain)) == 2 and not events(plain, "utterance_end")


def test_speech_started_marks_each_utterance_where_its_speech_began():
    asked, plain = stream({"vad_events": True}), stream()
    run(asked, TWO_PHRASES)
    run(plain, np.concatenate([TWO_PHRASES, tone(1.0), silence(1.0)]))
    run(asked, np.concatenate([tone(1.0), silence(1.0)]), first_seq=36)
    starts = [e.timestamp for e in events(asked, "speech_started")]
    assert len(starts) == 2 and abs(starts[0] - 0.3) < 0.04 and abs(starts[1] - 3.6) < 0.04
    assert not events(plain, "speech_started")


def test_a_click_is_no_speech_started():
    s = stream({"vad_events": True})
    run(s, np.concatenate([silence(0.5), tone(0.06), silence(1.0), tone(0.5), silence(1.0)]))
    assert [round(e.timestamp, 2) for e in events(s, "speech_started")] == [1.56]


def test_a_finalize_mid_utterance_publishes_its_final_now_and_the_session_goes_on():
    s = stream()
    seq, _ = run(s, tone(2.0))
    assert not finals(s)
    step = s.receive(SessionControl(tenant="acme", session_id="s1", action="finalize"), "finalize")
    assert step.ack == ["finalize"]
    job = s.next_job()
    assert job.kind == "final" and not job.speculative and job.end_sample == s.segmenter.received
    s.complete(job, MODEL.decode(job))
    assert len(finals(s)) == 1 and finals(s)[0].end <= 2.0 and not s.gone
    run(s, np.concatenate([tone(1.0), silence(1.0)]), first_seq=seq)
    assert len(finals(s)) == 2 and finals(s)[1].start >= 2.0 and finals(s)[1].segment_id == 1


def test_the_options_survive_a_takeover_through_the_checkpoint():
    first = stream({"interim_results": False, "utterance_end_ms": 1000})
    seq, _ = run(first, np.concatenate([tone(1.0), silence(0.6)]))
    checkpoint = first.checkpoints[-1]
    assert checkpoint.options == {"interim_results": False, "utterance_end_ms": 1000}
    assert checkpoint.last_word_end == finals(first)[0].words[-1].end  # owed its utterance_end
    taken = stream(checkpoint=checkpoint)  # a takeover: the first message it sees is audio, not the start
    assert not taken.options.interim_results and taken.options.utterance_end_s == 1.0
    _, jobs = run(taken, np.concatenate([silence(1.0), tone(3.0), silence(1.0)]), first_seq=checkpoint.acked_seq + 1)
    assert jobs["interim"] == 0
    assert events(taken, "utterance_end")[0].last_word_end == checkpoint.last_word_end


def test_a_start_with_options_the_gateway_would_refuse_is_refused_by_the_worker_too():
    bad = SessionControl(tenant="acme", session_id="s1", action="start", options={"endpointing_ms": 1})
    assert stored_message_problem(bad)[0] == "bad_option"
    good = SessionControl(tenant="acme", session_id="s1", action="start", options={"endpointing_ms": False})
    assert stored_message_problem(good) is None


def test_a_takeover_re_hearing_an_onset_announces_it_with_the_same_message_id():
    """The worker taking over re-hears the audio after its checkpoint: a speech_started its first worker already
    published must come out with the same Nats-Msg-Id (the stream drops the repeat), wherever the checkpoint falls
    between the VAD's frames (a 100 ms chunk is 3 1/3 frames of 30 ms)."""
    for lead in (0.3, 0.4, 0.5):
        audio = np.concatenate([silence(lead), tone(1.0), silence(1.03), tone(0.8)])
        first = stream({"vad_events": True})
        run(first, audio)
        checkpoint = first.checkpoints[-1]
        taken = stream(checkpoint=checkpoint)
        run(taken, audio[checkpoint.acked_samples :], first_seq=checkpoint.acked_seq + 1)
        heard_again = events(taken, "speech_started")[-1]
        assert heard_again.timestamp == events(first, "speech_started")[-1].timestamp, (lead, checkpoint.acked_samples)
        assert [s.text for s in finals(taken)] == [s.text for s in finals(first)][1:]
