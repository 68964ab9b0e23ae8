"""The session core on scripted audio and scripted Whisper output: no model, no NATS.

Message handles are plain values (the seq, or "end"), so the acks each step asks for can be read off.
"""

import numpy as np

from jetscribe.services.transcriber.agreement import DecodedSegment, has_loop, keep_trustworthy
from jetscribe.services.transcriber.decoding import Decoded, plan_batch
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.wire import Word
from tests.unit.transcriber.scripted import CHUNK, chunk, end_message, feed, finish, new_stream, said, silence, tone


def test_silence_alone_gives_no_job_and_is_acked():
    s = new_stream()
    feed(s, silence(3.0))
    assert s.next_job() is None
    assert s.ledger.accounted_seq >= 25  # all but the pre-roll kept for a possible onset
    assert s.acked[0] == 0 and s.acked == sorted(set(s.acked))  # acked behind checkpoints, each once
    assert s.checkpoints[-1].acked_seq == s.acked[-1]


def test_endpoint_after_trailing_silence_makes_one_final():
    s = new_stream(endpoint_silence_s=0.5)
    seq = feed(s, np.concatenate([silence(1.0), tone(2.0), silence(1.0)]))
    job = s.next_job()
    assert job.kind == "final"
    # The utterance starts with 0.3 s of pre-roll and ends 0.2 s after the speech.
    assert abs(job.start_sample / SAMPLE_RATE - 0.7) < 0.05
    assert abs(job.end_sample / SAMPLE_RATE - 3.2) < 0.05
    assert s.ledger.accounted_seq < 7  # nothing of the utterance is acked while its final is pending
    step = s.complete(job, said("hello", "world"))
    segments = step.segments
    assert [(g.status, g.segment_id, g.text) for g in segments] == [("final", 0, "hello world")]
    assert abs(segments[0].start - 0.7) < 0.05  # word times are session times
    assert segments[0].seq_first <= 7 and segments[0].seq_last >= 31
    assert max(step.ack) >= 31  # the utterance's audio is acked behind the final and a checkpoint
    assert step.checkpoint.acked_seq == max(step.ack)
    assert seq == 40


def test_interims_share_the_final_segment_id_and_revisions_grow():
    s = new_stream(interim_every_s=1.0)
    feed(s, tone(1.5))
    job = s.next_job()
    assert job.kind == "interim" and job.beam_size == 1
    interim = finish(s, job, said("hel"))
    assert interim[0].status == "interim" and interim[0].segment_id == 0 and interim[0].revision == 1
    feed(s, np.concatenate([tone(0.5), silence(1.0)]), first_seq=15)
    job = s.next_job()
    assert job.kind == "final"
    final = finish(s, job, said("hello", "there"))
    assert final[0].segment_id == 0 and final[0].revision == 2 and final[0].status == "final"


def test_empty_final_after_an_interim_retracts_it():
    s = new_stream()
    feed(s, tone(1.5))
    finish(s, s.next_job(), said("uh"))
    feed(s, silence(1.0), first_seq=15)
    final = finish(s, s.next_job(), Decoded([], "en", 0.9))
    assert final[0].status == "final" and final[0].text == "" and final[0].segment_id == 0


def test_word_split_across_two_windows_is_emitted_once():
    # Two utterances separated by a pause: each window owns its own audio, so the word at the
    # join appears in exactly one final, and the next utterance's pre-roll never reaches back.
    s = new_stream(endpoint_silence_s=0.5)
    seq = feed(s, np.concatenate([tone(1.0), silence(0.6)]))
    first = s.next_job()
    finish(s, first, said("one", "two"))
    feed(s, np.concatenate([tone(1.0), silence(0.7)]), first_seq=seq)
    second = s.next_job()
    assert second.start_sample >= first.end_sample
    assert second.prompt == "one two"  # committed text is the next window's context


def test_long_silence_emits_nothing():
    s = new_stream()
    feed(s, silence(60.0))
    assert s.next_job() is None
    assert len(s.segmenter.buffer) < SAMPLE_RATE  # the buffer is trimmed, not grown


def test_very_long_utterance_is_cut_at_max_length():
    s = new_stream(max_utterance_s=5.0)
    # Speech with a short dip every 2 s (a breath, shorter than the endpoint).
    pattern = np.concatenate([tone(1.9), silence(0.1)])
    feed(s, np.tile(pattern, 6))
    job = s.next_job()
    assert job.kind == "final"
    length = (job.end_sample - job.start_sample) / SAMPLE_RATE
    assert 1.0 <= length <= 5.0
    dip = job.end_sample / SAMPLE_RATE % 2.0
    assert dip >= 1.85 or dip <= 0.05  # cut inside a quiet dip, not mid-word
    # The rest continues seamlessly: each window starts where the previous one was cut.
    spans = [(u.start, u.end) for u in s.closed] + [(s.open.start, None)]
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start == end


def test_a_loop_over_speech_keeps_its_first_occurrence():
    # Was: the whole segment dropped. Now only the repeats go (tests/unit/transcriber/test_guards.py).
    looping = said(*(["thank", "you"] * 6), step=0.1)
    assert has_loop(looping.segments[0].words)
    s = new_stream()
    feed(s, np.concatenate([tone(1.0), silence(1.0)]))
    (final,) = finish(s, s.next_job(), looping)
    assert final.text == "thank you" and [d.reason for d in final.dropped] == ["loop"] * 10


def test_silence_and_noise_guards_without_audio_evidence():
    # Without a VAD record, Whisper's scores alone decide: avg_logprob < -1 and no_speech > 0.3.
    speechless = DecodedSegment([Word(" Thank", 3.6, 3.9, 0.0), Word(" you.", 3.9, 3.9, 0.9)], 0.58, -1.31, 1.0)
    squashed = DecodedSegment([Word(" la", 0, 1, 0.9)], 0.0, -0.3, 2.9)  # no loop to trim: kept
    good = DecodedSegment([Word(" eggs.", 3.2, 3.6, 0.99)], 0.01, -0.3, 1.1)
    verdict = keep_trustworthy([good, speechless, squashed])
    assert [w.word for w in verdict.kept] == [" eggs.", " la"]
    assert [(d.word, d.reason) for d in verdict.dropped] == [(" Thank", "silence"), (" you.", "silence")]


def test_redelivered_chunk_is_ignored():
    s = new_stream()
    s.receive(chunk(0, tone(0.1)), "first delivery")
    assert s.receive(chunk(0, tone(0.1)), "second delivery").empty  # held: the newest delivery waits instead
    assert s.segmenter.received == CHUNK
    assert s.ledger.waiting() == ["second delivery"]


def test_redelivery_of_an_acked_chunk_is_acked_at_once_and_only_once():
    s = new_stream()
    feed(s, silence(3.0))
    acked = s.acked
    assert acked
    step = s.receive(chunk(acked[-1], silence(0.1)), "again")
    assert step.ack == ["again"] and s.segmenter.received == 30 * CHUNK
    assert len(s.acked) == len(set(map(str, s.acked)))


def test_end_closes_open_speech_and_finishes_after_final():
    s = new_stream()
    feed(s, tone(1.0))
    s.receive(end_message(), "end")
    job = s.next_job()
    assert job.kind == "final" and job.end_sample == s.segmenter.received
    step = s.complete(job, said("bye"))
    assert step.closed and [e.event for e in step.events] == ["ended"]
    assert step.ack[-2:] == [9, "end"] and step.checkpoint.finished
    assert sorted(s.acked[:-1]) == list(range(10))  # every chunk once, then the end


def pick(streams, max_batch=1):
    return plan_batch([(s, p) for s in streams if (p := s.peek_job()) is not None], max_batch)


def test_the_scheduler_takes_the_oldest_final_before_interims():
    clock = ManualClock()
    a, b, c = new_stream(clock), new_stream(clock), new_stream(clock)
    feed(a, tone(3.0))  # only an interim due
    feed(c, np.concatenate([tone(1.0), silence(1.0)]))
    clock.advance(3.0)
    feed(b, np.concatenate([tone(1.0), silence(1.0)]))
    assert pick([a, b, c]) == [c]
    assert pick([a, b, c], max_batch=8) == [c, b]  # both finals, same window: one call; the interim waits
    c.next_job()  # c now busy
    assert pick([a, b, c]) == [b]
    b.next_job()
    assert pick([a, b, c]) == [a]


def test_peek_job_describes_the_job_next_job_hands_out():
    s = new_stream()
    feed(s, np.concatenate([tone(2.0), silence(1.0)]))
    plan = s.peek_job()
    assert s.peek_job() == plan and not s.busy  # peeking takes nothing
    job = s.next_job()
    assert (plan.kind, plan.speculative, plan.samples, plan.beam_size, plan.window, plan.language) == (
        job.kind,
        job.speculative,
        len(job.audio),
        job.beam_size,
        job.window,
        job.language,
    )
    assert s.peek_job() is None  # busy until its result comes back


def test_audio_is_acked_in_the_step_that_publishes_its_segment_behind_a_checkpoint():
    s = new_stream()
    feed(s, np.concatenate([tone(1.0), silence(1.0)]))
    job = s.next_job()
    feed(s, silence(0.5), first_seq=20)  # audio keeps arriving while the job decodes
    assert all(h < 5 for h in s.acked)  # nothing of the utterance yet
    step = s.complete(job, said("hi"))
    assert step.segments and step.checkpoint is not None and max(step.ack) >= 19
    assert step.checkpoint.acked_seq == max(step.ack)


def test_abandoned_final_retracts_interims_and_frees_the_audio():
    s = new_stream()
    feed(s, tone(1.5))
    finish(s, s.next_job(), said("uh"))
    feed(s, silence(1.0), first_seq=15)
    job = s.next_job()
    for _attempt in range(2):  # the decode retry budget: the same job is offered again
        assert s.complete(job, RuntimeError("model crashed")).empty
        job = s.next_job()
        assert job.kind == "final"
    step = s.complete(job, RuntimeError("model crashed"))
    assert [e.code for e in step.errors] == ["decode_failed"]
    assert step.segments[0].status == "final" and step.segments[0].text == ""
    assert max(step.ack) >= 14


def test_sample_buffer_keeps_indices_across_growth_and_trims():
    from jetscribe.services.transcriber.segmenter import SampleBuffer

    buf = SampleBuffer()
    data = (np.arange(200_000) % 30000).astype(np.int16)
    for off in range(0, len(data), 1600):
        buf.append(data[off : off + 1600])
    buf.drop_before(150_000)
    assert buf.start == 150_000 and len(buf) == 50_000
    assert np.array_equal(buf.slice(160_000, 160_010), data[160_000:160_010])
    buf.append(data[:5])
    assert np.array_equal(buf.slice(200_000, 200_005), data[:5])


def test_stock_phrases_in_the_trailing_silence_are_dropped():
    s = new_stream()
    feed(s, np.concatenate([tone(1.0), silence(1.0)]))
    job = s.next_job()
    speech_end = job.speech_end_sample / SAMPLE_RATE - job.start_sample / SAMPLE_RATE
    words = [
        Word(" 3", speech_end - 0.8, speech_end - 0.6, 0.9),
        Word("%", speech_end - 0.6, speech_end - 0.4, 0.9),
        Word(" eggs.", speech_end - 0.4, speech_end - 0.05, 0.99),
        Word(" Thanks", speech_end - 0.05, speech_end + 0.1, 0.02),
        Word(" for", speech_end + 0.15, speech_end + 0.2, 0.9),
        Word(" .", speech_end + 0.2, speech_end + 0.2, 0.9),
    ]
    segments = finish(s, job, Decoded([DecodedSegment(words)], "en", 0.9))
    assert segments[0].text == "3% eggs."


# --- commit policy: scripted hypothesis sequences --------------------------------------------


def interim(stream, *words, step=0.3):
    """Take the due interim job and answer it with `words` (times relative to the job's audio)."""
    job = stream.next_job()
    assert job is not None and job.kind == "interim" and job.window == "short"
    return finish(stream, job, said(*words, step=step))[0]


def test_interim_words_become_stable_when_two_hypotheses_agree():
    s = new_stream(interim_every_s=0.5)
    seq = feed(s, tone(1.0))
    first = interim(s, "the", "cat")
    assert first.stable_words == 0  # one hypothesis alone proves nothing
    seq = feed(s, tone(0.5), first_seq=seq)
    second = interim(s, "the", "cat", "sat", "on")
    assert second.stable_words == 2 and second.text == "the cat sat on"
    seq = feed(s, tone(0.5), first_seq=seq)
    # The model changes its mind about a stable word: the stable words stay as they were.
    third = interim(s, "a", "cat", "sat", "on", "the", "mat")
    assert third.text.startswith("the cat sat on") and third.stable_words == 4
    assert third.segment_id == first.segment_id and third.revision == 3


def test_a_word_cut_by_the_window_end_is_not_stable_until_it_is_whole():
    s = new_stream(interim_every_s=0.5)
    seq = feed(s, tone(1.0))
    interim(s, "the", "con")
    feed(s, tone(0.5), first_seq=seq)
    later = interim(s, "the", "concert", "is")
    assert later.stable_words == 1 and later.words[1].word == " concert"


def test_a_pause_starts_the_final_early_and_the_endpoint_reuses_it():
    s = new_stream(endpoint_silence_s=0.5, speculate_after_s=0.2)
    seq = feed(s, tone(1.0))
    interim(s, "hello")
    seq = feed(s, silence(0.3), first_seq=seq)  # a pause, not yet an endpoint
    assert not s.interim_due()
    early = s.next_job()
    assert early.kind == "final" and early.speculative and early.window == "full"
    shown = finish(s, early, said("hello", "there"))
    assert shown[0].status == "interim"  # still open: it could go on speaking
    decoded = len(s.segments)
    feed(s, silence(0.4), first_seq=seq)  # the pause becomes an endpoint: the early result is the final
    assert s.next_job() is None  # no second decode
    final = s.segments[decoded:]
    assert final[0].status == "final" and final[0].text == "hello there"
    assert final[0].segment_id == shown[0].segment_id


def test_an_endpoint_reached_while_the_early_final_decodes_takes_its_result():
    s = new_stream(endpoint_silence_s=0.5, speculate_after_s=0.2)
    seq = feed(s, tone(1.0))
    seq = feed(s, silence(0.3), first_seq=seq)
    early = s.next_job()
    feed(s, silence(0.4), first_seq=seq)  # the endpoint arrives while `early` is decoding
    final = finish(s, early, said("yes"))
    assert final[0].status == "final" and final[0].text == "yes"
    assert s.next_job() is None and not s.closed


def test_speech_after_a_pause_discards_the_early_final():
    s = new_stream(endpoint_silence_s=0.5, speculate_after_s=0.2)
    seq = feed(s, tone(1.0))
    seq = feed(s, silence(0.3), first_seq=seq)
    early = s.next_job()
    finish(s, early, said("one"))
    feed(s, np.concatenate([tone(0.6), silence(0.6)]), first_seq=seq)  # speaks on, then stops
    final_job = s.next_job()
    assert final_job.kind == "final" and not final_job.speculative  # a new decode of the whole utterance
    assert final_job.end_sample > early.end_sample


def test_long_speech_without_a_pause_is_cut_at_a_stable_word_boundary():
    s = new_stream(max_utterance_s=8.0, interim_every_s=1.0)
    seq = 0
    for _ in range(6):  # 6 s of unbroken speech, interims every second agreeing on a growing prefix
        seq = feed(s, tone(1.0), first_seq=seq)
        n = int(s.segmenter.vad_pos / SAMPLE_RATE / 0.5)
        interim(s, *[f"w{i}" for i in range(n)], step=0.5)
    stable = s.open.words.stable
    boundary = (stable[-1].end + s.open.words.unstable[0].start) / 2
    feed(s, tone(3.0), first_seq=seq)  # past the maximum length
    cut = s.closed[0].end / SAMPLE_RATE
    assert abs(cut - boundary) <= 0.2, (cut, boundary)
    assert s.open.start == s.closed[0].end  # the rest continues from the cut


def test_long_silence_gives_no_job_and_no_early_final():
    s = new_stream()
    feed(s, silence(30.0))
    assert s.next_job() is None and not s.speculation_due()


def test_interims_slow_down_when_decoding_is_busy():
    from jetscribe.services.transcriber.decoding import DecodeJob, DecodeLoad

    load = DecodeLoad()
    job = DecodeJob(
        kind="interim",
        audio=np.zeros(1, np.float32),
        start_sample=0,
        end_sample=1,
        language="en",
        prompt="",
        beam_size=1,
    )
    load.observe(job, 0.3)
    assert load.interim_every(1.0, 1) == 1.0  # one speaker: the fastest rate
    assert abs(load.interim_every(1.0, 4) - 2.4) < 1e-9  # four: interims may use at most half the time


def test_an_empty_interim_waits_for_new_audio_before_the_next():
    s = new_stream(interim_every_s=1.0)
    feed(s, tone(1.0))
    job = s.next_job()
    assert job.kind == "interim"
    assert finish(s, job, Decoded([], "en", 0.9)) == []
    assert s.next_job() is None  # not the same interim again at once


def test_hand_over_keeps_the_open_utterance_whole_for_the_next_owner():
    s = new_stream(endpoint_silence_s=0.5)
    seq = feed(s, np.concatenate([tone(1.0), silence(0.8)]))  # one closed utterance
    seq = feed(s, tone(1.0), first_seq=seq)  # and one still open (mid-word, say)
    shown = interim_after_final(s)
    step = s.hand_over()
    assert step.closed and s.open is not None  # not cut
    checkpoint = s.checkpoints[-1]
    acked = sorted(s.acked)
    assert checkpoint.acked_seq == acked[-1] and acked == list(range(len(acked)))
    assert checkpoint.acked_samples <= s.open.start  # the open utterance's audio stays unacked
    assert step.nak == list(range(acked[-1] + 1, seq))  # and goes back to the stream at once
    assert checkpoint.next_segment_id == shown.segment_id  # its id is reused by the next owner
    assert checkpoint.committed_tail == ["one"]

    # The next owner: restored from the checkpoint, it gets the unacked chunks again.
    nxt = new_stream(endpoint_silence_s=0.5, checkpoint=checkpoint)
    replay = np.concatenate([tone(1.0), silence(0.8)])
    first_replayed = acked[-1] + 1
    offset = first_replayed * CHUNK
    assert nxt.segmenter.received == offset
    assert nxt.receive(chunk(acked[-1], tone(0.1)), "old").ack == ["old"]  # an acked chunk comes back
    all_audio = np.concatenate([tone(1.0), silence(0.8), replay])
    feed(nxt, all_audio[offset:], first_seq=first_replayed)
    job = nxt.next_job()
    assert job.kind == "final" and abs(job.start_sample - s.open.start) <= 480  # the same utterance, whole
    assert job.prompt == "one"
    final = finish(nxt, job, said("two"))[0]
    assert final.segment_id == shown.segment_id and final.start >= s.open.start / SAMPLE_RATE  # session time


def interim_after_final(s):
    finish(s, s.next_job(), said("one"))  # the closed utterance's final
    job = s.next_job()
    assert job.kind == "interim"
    return finish(s, job, said("tw"))[0]


def test_a_pause_after_a_whole_sentence_ends_the_utterance_early():
    s = new_stream(endpoint_silence_s=0.5, speculate_after_s=0.2, sentence_endpoint_s=3.0)
    seq = feed(s, tone(3.5))
    seq = feed(s, silence(0.3), first_seq=seq)  # a short pause, no endpoint yet
    early = s.next_job()
    assert early.speculative
    final = finish(s, early, said("we", "sold", "forty", "trays."))
    assert final[0].status == "final" and s.open is None  # a sentence ended: no need to wait for 0.5 s
    feed(s, np.concatenate([tone(1.0), silence(0.8)]), first_seq=seq)  # the speaker goes on
    nxt = s.next_job()
    assert nxt.start_sample >= early.end_sample and nxt.prompt.endswith("trays.")


def test_a_pause_inside_a_sentence_only_shows_an_interim():
    s = new_stream(endpoint_silence_s=0.5, speculate_after_s=0.2, sentence_endpoint_s=3.0)
    seq = feed(s, tone(3.5))
    feed(s, silence(0.3), first_seq=seq)
    shown = finish(s, s.next_job(), said("we", "sold", "forty"))
    assert shown[0].status == "interim" and s.open is not None
