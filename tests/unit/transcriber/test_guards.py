"""The word guards: no whole segment lost for a local defect, silence judged by the audio as well as by
Whisper, and every removed word counted. Scripted Whisper output; scripted audio and VAD (scripted.py)."""

import numpy as np

from jetscribe.services.transcriber.agreement import DecodedSegment, keep_trustworthy, trim_loops, trim_squeezed_repeats
from jetscribe.services.transcriber.decoding import Decoded
from jetscribe.services.transcriber.evidence import AudioEvidence, SpeechRecord
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word
from tests.unit.transcriber.scripted import end_message, feed, finish, new_stream, said, silence, tone

HELLO = (
    ["Hello."] * 5
    + "I didn't know you were there. This is Diane in New Jersey.".split()
    + "And I'm Sheila in Texas, originally from Chicago.".split()
)


def noise(seconds, level, seed=0):
    """Steady noise; the scripted VAD hears it as speech when `level` is above ~630 (mean |x| > 500)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, level, int(seconds * SAMPLE_RATE)).clip(-32768, 32767).astype(np.int16)


def words(*text, start=0.0, step=0.3):
    return [Word(f" {w}", start + i * step, start + (i + 1) * step, 0.9) for i, w in enumerate(text)]


def evidence(speech, floor=-90.0, level=-20.0, frame=480):
    """Evidence for frames from session time 0: `speech` is one flag per frame, all at `level` dBFS."""
    return AudioEvidence(0, frame, tuple(speech), tuple([level] * len(speech)), floor)


# --- the guards alone ---------------------------------------------------------------------------------


def test_a_repeated_phrase_keeps_its_first_occurrence_and_the_rest():
    ws = words(*HELLO, step=0.2)
    kept, removed = trim_loops(ws)
    assert [w.word.strip() for w in kept] == HELLO[4:]
    assert [w.word for w in removed] == [" Hello."] * 4


def test_what_people_repeat_is_no_loop():
    for said_twice in (["no,", "no,", "no."], ["bye", "bye"], ["very", "very", "good"], ["can", "you", "hear"] * 3):
        assert trim_loops(words(*said_twice)) == (words(*said_twice), [])


def test_a_long_phrase_loop_keeps_one_copy():
    phrase = "see you next time".split()
    kept, removed = trim_loops(words(*phrase * 6, "bye."))
    assert [w.word.strip() for w in kept] == [*phrase, "bye."] and len(removed) == 20


def test_a_looping_segment_over_speech_loses_only_its_repeats():
    seg = DecodedSegment(words(*HELLO, step=0.2), no_speech_prob=0.1, avg_logprob=-0.4, compression_ratio=2.6)
    verdict = keep_trustworthy([seg], evidence([True] * 200))
    assert [w.word.strip() for w in verdict.kept] == HELLO[4:] and len(verdict.kept) == 21
    assert [(d.word, d.reason) for d in verdict.dropped] == [(" Hello.", "loop")] * 4


def test_a_loop_over_silence_is_dropped_whole():
    seg = DecodedSegment(words(*["thank", "you."] * 6), no_speech_prob=0.2, avg_logprob=-0.3, compression_ratio=3.1)
    verdict = keep_trustworthy([seg], evidence([False] * 200))
    assert verdict.kept == [] and [d.reason for d in verdict.dropped] == ["silence"] * 12


def test_doubt_alone_or_silence_alone_drops_nothing():
    okay = DecodedSegment(words("Okay."), no_speech_prob=0.76, avg_logprob=-0.96)
    sure = DecodedSegment(words("Okay."), no_speech_prob=0.05, avg_logprob=-0.3)
    assert keep_trustworthy([okay], evidence([True] * 30)).kept == okay.words  # doubtful, over speech
    assert keep_trustworthy([sure], evidence([False] * 30)).kept == sure.words  # quiet speech the VAD missed
    assert keep_trustworthy([okay], evidence([False] * 30)).kept == []  # both: line noise


def test_a_vad_that_hears_steady_noise_is_overruled_by_the_level():
    okay = DecodedSegment(words("Okay."), no_speech_prob=0.76, avg_logprob=-0.96)
    at_the_floor = evidence([True] * 30, floor=-40.0, level=-38.0)
    assert keep_trustworthy([okay], at_the_floor).kept == []
    above_it = evidence([True] * 30, floor=-40.0, level=-25.0)
    assert keep_trustworthy([okay], above_it).kept == okay.words


def test_punctuation_alone_is_no_dropped_word():
    seg = DecodedSegment(words("Okay", "."), no_speech_prob=0.9, avg_logprob=-1.5)
    assert [d.word for d in keep_trustworthy([seg], evidence([False] * 30)).dropped] == [" Okay"]


def test_the_speech_record_answers_coverage_and_level_per_span():
    record = SpeechRecord(480)
    for i in range(100):  # 3 s: 1 s quiet, 1 s speech, 1 s quiet
        loud = 33 <= i < 66
        record.add(np.full(480, 3000 if loud else 30, np.int16), loud)
    ev = record.evidence(0, 100 * 480)
    assert ev.coverage(1.0, 2.0) > 0.9 and ev.coverage(0.0, 0.9) == 0.0
    assert abs(ev.coverage(0.5, 1.5) - 0.5) < 0.1
    assert ev.snr_db(1.1, 1.9) > 35 and abs(ev.snr_db(0.1, 0.9)) < 1
    record.drop_before(50 * 480)
    later = record.evidence(50 * 480, 100 * 480)
    assert later.start == 50 * 480 and later.coverage(1.6, 1.9) > 0.9 and later.coverage(2.2, 2.9) == 0.0
    assert later.noise_floor_db == ev.noise_floor_db  # the floor remembers more than the buffer


def test_a_new_session_has_no_noise_floor_yet():
    record = SpeechRecord(480)
    record.add(np.full(480, 3000, np.int16), True)
    assert record.evidence(0, 480).snr_db(0.0, 0.03) is None


# --- in the session: counted, published, carried over -----------------------------------------------


def test_the_hello_segment_keeps_its_words_and_counts_the_repeats():
    s = new_stream()
    feed(s, np.concatenate([silence(0.5), tone(6.0), silence(1.0)]))
    job = s.next_job()
    decoded = said(*HELLO, start=0.4, step=0.2, no_speech=0.1, logprob=-0.4, ratio=2.6)
    step = s.complete(job, decoded)
    (final,) = step.segments
    assert final.status == "final" and final.text.startswith("Hello. I didn't know you were there.")
    assert final.text.endswith("originally from Chicago.") and len(final.words) == 21
    assert [(d.word, d.reason) for d in final.dropped] == [(" Hello.", "loop")] * 4
    assert s.transcript.words_dropped == 4 and s.transcript.empty_finals == 0
    (audit,) = step.audits
    assert audit.segment_id == final.segment_id and len(audit.dropped) == 4 and not audit.empty_over_speech
    assert step.checkpoint.words_dropped == 4
    s.receive(end_message(), "end")
    assert (s.events[-1].event, s.events[-1].words_dropped, s.events[-1].empty_finals) == ("ended", 4, 0)


def test_a_loop_over_line_noise_the_vad_hears_as_speech_is_dropped_whole_and_counted():
    s = new_stream()
    feed(s, noise(3.0, 1500))  # steady: "speech" to the scripted VAD, but no louder than its own floor
    s.receive(end_message(), "end")
    step = s.complete(s.next_job(), said(*["thank", "you."] * 6, start=0.5, step=0.2, ratio=3.1))
    (final,) = step.segments  # published empty, to show what was removed
    assert final.text == "" and [d.reason for d in final.dropped] == ["silence"] * 12
    assert not step.audits[0].empty_over_speech  # noise at its floor held no speech
    assert (step.events[-1].words_dropped, step.events[-1].empty_finals) == (12, 0)


def okay_session(okay_at):
    """Line noise the VAD does not call speech, then 1 s of speech: "Okay." decoded at `okay_at` s of the job."""
    s = new_stream()
    feed(s, np.concatenate([noise(2.0, 300), tone(1.0), noise(1.0, 300)]))
    job = s.next_job()
    assert job.kind == "final"
    return s, s.complete(job, said("Okay.", start=okay_at, step=0.25, no_speech=0.76, logprob=-0.96))


def test_the_line_noise_okay_is_dropped_and_counted():
    s, step = okay_session(okay_at=0.0)  # over the pre-roll: noise
    (final,) = step.segments
    assert final.text == "" and [(d.word, d.reason) for d in final.dropped] == [(" Okay.", "silence")]
    assert s.transcript.words_dropped == 1


def test_the_same_okay_over_speech_is_kept():
    s, step = okay_session(okay_at=0.5)  # over the tone
    (final,) = step.segments
    assert final.text == "Okay." and final.dropped == [] and step.audits == []
    assert s.transcript.words_dropped == 0


def test_an_empty_final_over_speech_is_counted():
    s = new_stream()
    feed(s, np.concatenate([tone(2.0), silence(1.0)]))
    step = s.complete(s.next_job(), Decoded([], "en", 0.9))
    assert step.segments == [] and s.transcript.empty_finals == 1
    (audit,) = step.audits
    assert audit.segment_id is None and audit.empty_over_speech and audit.dropped == []


def test_trailing_inventions_are_counted():
    s = new_stream()
    feed(s, np.concatenate([tone(1.0), silence(1.0)]))
    job = s.next_job()
    speech_end = (job.speech_end_sample - job.start_sample) / SAMPLE_RATE
    (final,) = finish(s, job, said("eggs.", "Thanks", "for", "watching!", start=speech_end - 0.2, step=0.3))
    assert final.text == "eggs." and [d.reason for d in final.dropped] == ["trailing"] * 3


def test_interims_count_nothing():
    s = new_stream(interim_every_s=1.0)
    feed(s, tone(1.5))
    job = s.next_job()
    assert job.kind == "interim"
    finish(s, job, said(*["Hello."] * 6, step=0.1))
    assert s.transcript.words_dropped == 0


def test_the_totals_survive_a_takeover():
    s = new_stream()
    feed(s, np.concatenate([silence(0.5), tone(6.0), silence(1.0)]))
    finish(s, s.next_job(), said(*HELLO, start=0.4, step=0.2))
    checkpoint = s.checkpoints[-1]
    assert (checkpoint.words_dropped, checkpoint.empty_finals) == (4, 0)
    nxt = new_stream(checkpoint=checkpoint)
    audio = np.concatenate([tone(2.0), silence(1.0)])
    feed(nxt, audio, first_seq=checkpoint.acked_seq + 1)
    finish(nxt, nxt.next_job(), Decoded([], "en", 0.9))  # empty over speech
    nxt.receive(end_message(), "end")
    ended = nxt.events[-1]
    assert (ended.event, ended.words_dropped, ended.empty_finals) == ("ended", 4, 1)
    assert (nxt.checkpoints[-1].words_dropped, nxt.checkpoints[-1].empty_finals) == (4, 1)


def test_the_record_follows_the_vad_frames_across_trims_and_a_restore():
    s = new_stream(frame_samples=512)
    feed(s, np.concatenate([silence(3.0), tone(1.0), silence(1.0)]))
    job = s.next_job()
    assert job.evidence.start <= job.start_sample < job.evidence.start + 512  # older frames were trimmed
    assert job.evidence.coverage(3.1, 3.9) == 1.0 and job.evidence.coverage(2.75, 2.95) == 0.0
    finish(s, job, said("hello"))
    nxt = new_stream(checkpoint=s.checkpoints[-1], frame_samples=512)
    restored_at = s.checkpoints[-1].acked_samples
    feed(nxt, np.concatenate([silence(0.4), tone(1.0), silence(1.0)]), first_seq=s.checkpoints[-1].acked_seq + 1)
    job = nxt.next_job()
    t = restored_at / SAMPLE_RATE
    assert job.evidence.coverage(t + 0.5, t + 1.3) == 1.0 and job.evidence.coverage(t, t + 0.35) == 0.0


def test_a_stock_phrase_squeezed_into_no_time_after_the_last_word_is_dropped_and_counted():
    from jetscribe.services.transcriber.agreement import drop_trailing_inventions

    words = [
        Word(" the", 18.2, 18.32, 0.9),
        Word(" train", 18.32, 18.48, 0.8),
        Word(" arrives.", 18.48, 18.88, 0.97),
        Word(" Thank", 18.88, 18.88, 0.002),
        Word(" you", 18.88, 18.88, 0.975),
        Word(" for", 18.88, 18.88, 0.179),
        Word(" watching.", 18.88, 18.94, 0.724),
    ]
    verdict = drop_trailing_inventions(words, speech_end_s=19.04)
    assert [w.word for w in verdict.kept] == [" the", " train", " arrives."]
    assert [(d.word, d.reason) for d in verdict.dropped] == [
        (" Thank", "trailing"),
        (" you", "trailing"),
        (" for", "trailing"),
        (" watching.", "trailing"),
    ]


def test_a_quick_but_real_last_sentence_stays():
    from jetscribe.services.transcriber.agreement import drop_trailing_inventions

    words = [Word(" Fine.", 1.0, 1.3, 0.9), Word(" See", 1.4, 1.55, 0.8), Word(" you.", 1.55, 1.7, 0.9)]
    assert len(drop_trailing_inventions(words, speech_end_s=1.8).kept) == 3
    lone = [Word(" Okay.", 1.0, 1.0, 0.3)]  # one word alone is not a tail after speech: other guards judge it
    assert len(drop_trailing_inventions(lone, speech_end_s=1.8).kept) == 1


# --- a phrase written twice where it was said once ------------------------------------------------------------

# tiny.en's final of "We ordered three thousand boxes, almost twice as many as last year." (meeting_long made
# reverberant by bench/make_realistic.py, seed 0, at 76.77 s): the phrase twice, its timing crams twelve words into
# 0.02 s. (word, start, end, probability) as decoded.
ORDERED_TWICE = [
    (" We", 0.0, 0.46, 0.83), (" order", 0.46, 0.8, 0.89), (" 3", 0.8, 0.82, 0.54), (",000", 0.82, 0.82, 0.95),
    (" horses", 0.82, 0.82, 0.22), (" over", 0.82, 0.82, 0.11), (" twice", 0.82, 0.82, 0.93), (" as", 0.82, 0.82, 0.97),
    (" many", 0.82, 0.82, 0.96), (" as", 0.82, 0.82, 0.89), (" last", 0.82, 0.82, 0.86), (" year.", 0.82, 0.82, 0.99),
    (" We", 0.82, 0.82, 0.62), (" order", 0.82, 0.82, 0.96), (" 3", 0.82, 1.24, 0.84), (",000", 1.24, 1.7, 0.99),
    (" horses", 1.7, 2.16, 0.9), (" over", 2.16, 2.72, 0.62), (" twice", 2.72, 3.38, 0.99), (" as", 3.38, 3.6, 1.0),
    (" many", 3.6, 3.8, 0.99), (" as", 3.8, 4.04, 0.94), (" last", 4.04, 4.34, 0.96), (" year.", 4.34, 4.62, 1.0),
]  # fmt: skip


def ordered_twice(offset=0.0):
    return [Word(w, offset + a, offset + b, p) for w, a, b, p in ORDERED_TWICE]


def test_a_phrase_written_twice_in_the_time_of_one_keeps_each_word_where_it_was_heard():
    kept, removed = trim_squeezed_repeats(ordered_twice())
    assert "".join(w.word for w in kept) == " We order 3,000 horses over twice as many as last year."
    assert [(w.start, w.end) for w in kept[:3]] == [(0.0, 0.46), (0.46, 0.8), (0.82, 1.24)]  # the timed copy
    assert len(removed) == 12 and max(w.end for w in removed) - min(w.start for w in removed) < 0.05


def test_a_phrase_said_twice_stays():
    for said_twice in (["thank", "you."] * 2, ["we", "order", "boxes."] * 2, ["no,", "no."]):
        ws = words(*said_twice, step=0.3)
        assert trim_squeezed_repeats(ws) == (ws, [])
    squeezed_once = [Word(" Hello.", 0.5, 0.5, 0.9)] + words("Hello.", "Hello.", start=0.5)  # one word: trim_loops'
    assert trim_squeezed_repeats(squeezed_once) == (squeezed_once, [])
    apart = words("last", "year", "and", "last", "year", step=0.0)  # squeezed, but not back to back
    assert trim_squeezed_repeats(apart) == (apart, [])


def test_the_final_says_a_phrase_written_twice_once_and_publishes_the_copy_it_removed():
    s = new_stream()
    feed(s, np.concatenate([silence(0.5), tone(5.0), silence(1.0)]))
    job = s.next_job()
    seg = DecodedSegment(ordered_twice(offset=0.5), no_speech_prob=0.01, avg_logprob=-0.3, compression_ratio=1.73)
    (final,) = finish(s, job, Decoded([seg], "en", 0.99))
    assert final.status == "final" and final.text == "We order 3,000 horses over twice as many as last year."
    assert len(final.dropped) == 12 and {d.reason for d in final.dropped} == {"loop"}
    assert s.transcript.words_dropped == 12
