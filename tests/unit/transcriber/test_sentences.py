"""Long speech committed at confirmed sentence ends: the rule (`sentences`), and the session core cutting a
run of speech with no pause, on scripted audio and scripted Whisper output."""

import numpy as np
import pytest

from jetscribe.services.transcriber.agreement import Hypotheses, norm
from jetscribe.services.transcriber.sentences import Seam, confirmed_sentence_end
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import Word
from tests.unit.transcriber.scripted import Script, feed, finish, new_stream, said, silence, speak, tone

STORY = (
    "We sold forty trays of fresh eggs at the market today. "
    "Then we drove home slowly along the river in the rain. "
    "The old dog was waiting for us by the front gate. "
    "It had been a long day."
)


def words(text, start=0.0, step=0.3):
    return [Word(f" {w}", start + i * step, start + (i + 1) * step, 0.9) for i, w in enumerate(text.split())]


def texts(ws):
    return [norm(w.word) for w in ws]


def run_story(min_commit_s=3.0, skew=0.0, dips=0.0):
    """12 s of speech with no pause (the STORY, one word every 0.3 s), then silence. With `dips` (seconds
    from each sentence end, or None), a quieter 30 ms there, as between sentences even with no pause; the
    cut lands in it. Without dips the speech is flat and the cut lands 0.165 s late."""
    script = Script(STORY, skew=skew)
    audio = np.concatenate([tone(12.3), silence(1.0)])
    if dips is not None:
        for end in script.sentence_ends()[:-1]:
            at = int((end + dips) * SAMPLE_RATE)
            audio[at - 240 : at + 240] //= 8  # still speech to the VAD: no pause
    s = new_stream(commit_sentences_after_s=min_commit_s, interim_every_s=1.0)
    _, published = speak(s, script, audio)
    return s, script, published


def finals(published):
    return [(heard, g) for heard, g in published if g.status == "final"]


def test_speech_with_no_pause_gets_finals_at_its_confirmed_sentence_ends():
    s, script, published = run_story()
    done = finals(published)
    assert [g.text for _, g in done] == [
        "We sold forty trays of fresh eggs at the market today.",
        "Then we drove home slowly along the river in the rain.",
        "The old dog was waiting for us by the front gate.",
        "It had been a long day.",
    ]
    ends = script.sentence_ends()
    for (heard, final), sentence_end in zip(done[:3], ends, strict=False):
        assert heard < 12.3  # published while the speaker is still talking: not at 15 s, not at the endpoint
        assert heard - sentence_end < 2.5  # one interim to show the next word, one more to confirm it
        assert abs(final.end - sentence_end) <= 0.2
    # Interims of a part are superseded by its final; the next part is a new segment.
    assert [g.segment_id for _, g in done] == [0, 1, 2, 3]
    for segment_id in range(4):
        mine = [g for _, g in published if g.segment_id == segment_id]
        assert [g.revision for g in mine] == list(range(1, len(mine) + 1))
        assert mine[-1].status == "final" and all(g.status == "interim" for g in mine[:-1])
        assert len(mine) > 1  # each part showed interims before its final
    # The committed text of a part is the prompt of the next part's windows.
    cut = next(job.end_sample for job, _ in script.decodes if job.kind == "final")
    first_after_cut = next(job for job, _ in script.decodes if job.start_sample == cut)
    assert first_after_cut.kind == "interim" and first_after_cut.prompt.endswith("at the market today.")


def test_without_the_rule_the_same_speech_waits_for_the_endpoint():
    _, _, published = run_story(min_commit_s=0.0)
    done = finals(published)
    assert len(done) == 1 and done[0][0] > 12.3


@pytest.mark.parametrize("skew", [-0.1, 0.0, 0.1])
@pytest.mark.parametrize("dips", [None, -0.1, 0.1], ids=["flat_cut_late", "cut_early", "cut_late"])
def test_no_word_is_lost_or_repeated_across_a_cut(skew, dips):
    _, script, published = run_story(skew=skew, dips=dips)
    said_in_finals = [w for _, g in finals(published) for w in texts(g.words)]
    assert said_in_finals == [norm(w) for w in STORY.split()]
    # The test bites: at every cut Whisper heard a word from both sides.
    cut_jobs = [job for job, _ in script.decodes if job.kind == "final"][:3]
    for job, last in zip(cut_jobs, ["today", "rain", "gate"], strict=True):
        before = next(told for j, told in script.decodes if j is job)
        after = [told for j, told in script.decodes if j.start_sample == job.end_sample and told]
        assert norm(before[-1].word) != last or norm(after[0][0].word) == last


def interim(stream, *said_words, step=0.5):
    job = stream.next_job()
    assert job is not None and job.kind == "interim"
    return finish(stream, job, said(*said_words, step=step))


def test_a_sentence_end_only_in_the_latest_hypothesis_does_not_cut():
    s = new_stream(commit_sentences_after_s=3.0, interim_every_s=1.0)
    seq = feed(s, tone(4.5))
    interim(s, "We", "sold", "forty", "trays", "of", "eggs", "then", "we")
    seq = feed(s, tone(1.0), first_seq=seq)
    interim(s, "We", "sold", "forty", "trays", "of", "eggs.", "Then", "we", "went")
    # The words agree, so "eggs." and "Then" are stable; but only one hypothesis ended the sentence there.
    assert [w.word for w in s.open.words.stable][5:7] == [" eggs.", " Then"]
    assert not s.closed and s.open.start == 0
    seq = feed(s, tone(1.0), first_seq=seq)
    interim(s, "We", "sold", "forty", "trays", "of", "eggs.", "Then", "we", "went", "home")
    assert len(s.closed) == 1
    cut = s.closed[0].end / SAMPLE_RATE
    assert abs(cut - 3.0) <= 0.2 and s.open.start == s.closed[0].end
    assert texts(s.open.words.stable) == ["then", "we", "went"]  # the new utterance keeps only what follows
    assert s.open.words.unstable == []  # guesses are not carried: the next hypothesis decides them


def test_a_sentence_end_at_the_hypothesis_tail_does_not_cut():
    s = new_stream(commit_sentences_after_s=3.0, interim_every_s=1.0)
    seq = feed(s, tone(4.5))
    interim(s, "We", "sold", "forty", "trays", "of", "eggs.")
    feed(s, tone(1.0), first_seq=seq)
    interim(s, "We", "sold", "forty", "trays", "of", "eggs.")
    assert len(s.open.words.stable) == 6 and not s.closed  # stable, but nothing after it is


def test_a_sentence_end_before_the_minimum_does_not_cut():
    s = new_stream(commit_sentences_after_s=3.0, interim_every_s=1.0)
    seq = feed(s, tone(4.5))
    interim(s, "Hello", "there.", "We", "sold", "forty")
    seq = feed(s, tone(1.0), first_seq=seq)
    interim(s, "Hello", "there.", "We", "sold", "forty", "trays")
    assert not s.closed  # confirmed, but only 1 s into the utterance
    seq = feed(s, tone(1.0), first_seq=seq)
    interim(s, "Hello", "there.", "We", "sold", "forty", "trays", "of", "eggs.", "Then", "we")
    feed(s, tone(1.0), first_seq=seq)
    interim(s, "Hello", "there.", "We", "sold", "forty", "trays", "of", "eggs.", "Then", "we", "went")
    assert len(s.closed) == 1 and abs(s.closed[0].end / SAMPLE_RATE - 4.0) <= 0.2  # the later one, past 3 s


def test_the_rule_is_off_at_zero():
    hyp = Hypotheses(words("We sold eggs. Then we"), [])
    latest = words("We sold eggs. Then we")
    assert confirmed_sentence_end(hyp, latest, latest, 0.0, 0.0) is None
    assert confirmed_sentence_end(hyp, latest, latest, 0.0, 0.5) is not None


def test_abbreviations_and_lower_case_continuations_are_no_sentence_ends():
    for text in ["We met Mr. Smith there today", "We left at 5 p.m. and drove home", "Well... Then we"]:
        latest = words(text)
        assert confirmed_sentence_end(Hypotheses(latest, []), latest, latest, 0.0, 0.1) is None, text


def seam(committed, carried, cut_s=3.0, published=None):
    before = words(committed, start=cut_s - 0.3 * len(committed.split()))
    return Seam(cut_s, before, Hypotheses(words(carried, cut_s), []), published)


@pytest.mark.parametrize(
    ("final", "kept"),
    [
        ("we sold forty trays.", "we sold forty trays."),  # ends at the sentence end: untouched
        ("we sold forty trays. Then", "we sold forty trays. Then"),  # heard across the cut: the next part drops it
        ("we sold forty trays. Th", "we sold forty trays."),  # only the start of the next word
        ("we sold forty trays. Then we", "we sold forty trays. Then we"),
        ("we sold forty trays. Then we we", "we sold forty trays. Then we"),
        ("we sold forty", "we sold forty"),  # a word missing is not ours to add
    ],
)
def test_the_final_before_a_cut_leaves_the_carried_words_to_the_next_part(final, kept):
    s = seam("we sold forty trays.", "Then we went")
    decoded = words(final, start=3.0 - 0.3 * 4)  # ends near the cut
    assert " ".join(w.word.strip() for w in s.trim_end(decoded)) == kept


def test_a_genuine_repeat_across_a_cut_is_kept():
    s = seam("it was all good.", "Good morning to you")
    final = words("it was all good.", start=1.8)
    assert s.trim_end(final) == final
    s.publish(final)
    assert texts(s.after.stable) == ["good", "morning", "to", "you"]
    after = words("Good morning to you", start=3.0)
    assert s.trim_start(after) == after  # the next sentence does begin with "Good"
    heard_twice = words("good. Good morning", start=3.0)
    assert texts(s.trim_start(heard_twice)) == ["good", "morning"]


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        ("trays. Then we went", "Then we went"),  # the last word, heard across the cut
        ("forty trays. Then we", "Then we"),
        ("Then we went", "Then we went"),
    ],
)
def test_the_part_after_a_cut_drops_a_head_that_repeats_the_final_before_it(head, kept):
    s = seam("we sold forty trays.", "Then we went", published=words("we sold forty trays.", start=1.8))
    assert " ".join(w.word.strip() for w in s.trim_start(words(head, start=2.9))) == kept
    late = words(head, start=3.5)  # a repeat said well after the cut is speech, not an echo
    assert s.trim_start(late) == late


def test_a_session_handed_over_is_not_cut_at_a_sentence_end():
    s = new_stream(commit_sentences_after_s=3.0, interim_every_s=1.0)
    seq = feed(s, tone(4.5))
    interim(s, "We", "sold", "forty", "trays", "of", "eggs.", "Then", "we")
    feed(s, tone(1.0), first_seq=seq)
    job = s.next_job()
    s.hand_over()  # while the confirming interim decodes
    step = s.complete(job, said("We", "sold", "forty", "trays", "of", "eggs.", "Then", "we", "went", step=0.5))
    assert step.closed and not s.closed and s.open.start == 0  # the next owner decodes it whole
