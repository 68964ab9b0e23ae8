"""Speakers the bot knows: the timeline, words labelled by it, finals split at a change, and takeover."""

import msgspec
import numpy as np

from jetscribe.services.transcriber.speakers import SpeakerTimeline, runs
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import SpeakerChange, Word
from tests.unit.transcriber.scripted import CHUNK, chunk, new_stream, said, silence, tone


def test_timeline_holds_each_saying_until_the_next():
    t = SpeakerTimeline("ann")
    t.mark(16000, "bob")
    t.mark(8000, None)
    assert [t.speaker_at(x) for x in (0, 7999, 8000, 15999, 16000, 10**9)] == ["ann", "ann", None, None, "bob", "bob"]
    t.mark(8000, "cy")  # the same sample said again: the later word wins
    assert t.speaker_at(9000) == "cy"
    t.forget_before(12000)
    assert t.marks == 2 and t.speaker_at(12000) == "cy" and t.speaker_at(16000) == "bob"


def test_the_bot_names_all_of_a_span_only_if_no_part_of_it_is_nobodys():
    t = SpeakerTimeline(None)
    t.mark(16000, "ann")
    t.mark(32000, None)
    t.mark(48000, "bob")
    assert t.names_all(16000, 32000) and t.names_all(20000, 21000) and t.names_all(48000, 10**9)
    assert not t.names_all(0, 20000)  # nobody named before ann
    assert not t.names_all(20000, 32001)  # nobody named from 32000
    assert not t.names_all(40000, 50000) and not t.names_all(0, 0)
    assert SpeakerTimeline("ann").names_all(0, 10**9) and not SpeakerTimeline().names_all(5, 6)


def test_a_chunk_names_its_speaker_and_changes_inside_it():
    t = SpeakerTimeline()
    c = chunk(0, silence(1.0))
    c = msgspec.structs.replace(c, speaker="ann", speaker_changes=[SpeakerChange(0.5, "bob"), SpeakerChange(9.0, "cy")])
    t.hear(c, first_sample=32000, samples=SAMPLE_RATE)
    assert t.speaker_at(31999) is None
    assert t.speaker_at(32000) == "ann" and t.speaker_at(40000) == "bob"
    assert t.speaker_at(48000) == "cy"  # an offset past the chunk's end is clipped to it


def test_runs_cut_labelled_words_at_each_change():
    ws = [Word(w, i, i + 1, 0.9, s) for i, (w, s) in enumerate([("a", "x"), ("b", "x"), ("c", "y"), ("d", "x")])]
    assert [[w.word for w in r] for r in runs(ws)] == [["a", "b"], ["c"], ["d"]]
    assert runs([]) == []


def feed_speaking(stream, audio, speakers, first_seq=0):
    """Feed 100 ms chunks; `speakers` maps a seq to (speaker of the chunk, [(offset_s, speaker)...])."""
    seq = first_seq
    for off in range(0, len(audio), CHUNK):
        c = chunk(seq, audio[off : off + CHUNK])
        if seq in speakers:
            speaker, changes = speakers[seq]
            c = msgspec.structs.replace(c, speaker=speaker, speaker_changes=[SpeakerChange(o, s) for o, s in changes])
        stream.receive(c, seq)
        seq += 1
    return seq


def test_a_final_is_split_where_the_bot_says_the_speaker_changed():
    s = new_stream(endpoint_silence_s=0.5)
    # Speech from 1.0 to 3.0 s; ann from the start, bob from 2.05 s (inside chunk 20).
    feed_speaking(
        s, np.concatenate([silence(1.0), tone(2.0), silence(1.0)]), {0: ("ann", []), 20: (None, [(0.05, "bob")])}
    )
    job = s.next_job()
    assert job.kind == "final"
    # The job starts at 0.7 s; words at 0.7-1.0, 1.0-1.3, 1.3-1.6 (ann), then 2.2-2.5, 2.5-2.8 (bob).
    decoded = said("hello", "there", "ann", start=0.0)
    decoded.segments[0].words.extend(said("hi", "bob", start=1.5).segments[0].words)
    step = s.complete(job, decoded)
    finals = [(g.segment_id, g.speaker, g.speaker_source, g.text) for g in step.segments]
    assert finals == [(0, "ann", "bot", "hello there ann"), (1, "bob", "bot", "hi bob")]
    assert all(w.speaker == g.speaker for g in step.segments for w in g.words)
    first, second = step.segments
    assert first.seq_first <= 7 and second.seq_last >= 30 and first.seq_last <= second.seq_first + 1
    assert step.checkpoint.next_segment_id == 2 and step.checkpoint.speaker == "bob"
    # The next utterance gets the id after the split's.
    feed_speaking(s, np.concatenate([tone(1.0), silence(1.0)]), {}, first_seq=40)
    step = s.complete(s.next_job(), said("more"))
    assert [(g.segment_id, g.speaker) for g in step.segments] == [(2, "bob")]


def test_interims_carry_speakers_and_a_track_has_its_participant():
    s = new_stream(interim_every_s=1.0)
    s.transcript.speakers = SpeakerTimeline("dana")  # as a track's start names it (SessionStream(speaker=...))
    feed_speaking(s, tone(1.5), {})
    interim = s.complete(s.next_job(), said("hel")).segments
    assert interim[0].status == "interim" and interim[0].speaker == "dana" and interim[0].words[0].speaker == "dana"


def test_without_speakers_nothing_is_labelled():
    s = new_stream()
    feed_speaking(s, np.concatenate([tone(1.0), silence(1.0)]), {})
    final = s.complete(s.next_job(), said("plain")).segments[0]
    assert final.speaker is None and final.speaker_source is None and final.words[0].speaker is None


def test_a_takeover_keeps_who_was_talking_from_the_checkpoint():
    s = new_stream(endpoint_silence_s=0.5)
    seq = feed_speaking(s, np.concatenate([tone(1.0), silence(1.0)]), {0: ("ann", []), 5: ("bob", [])})
    s.complete(s.next_job(), said("one", "two", "three", "four", start=0.0, step=0.25))
    checkpoint = s.checkpoints[-1]
    assert checkpoint.speaker == "bob" and checkpoint.acked_seq >= 10
    # The next owner replays the unacked chunks, which name no speaker: bob still talks.
    after = new_stream(endpoint_silence_s=0.5, checkpoint=checkpoint)
    feed_speaking(
        after,
        np.concatenate([silence(2.0)[: (seq - checkpoint.acked_seq - 1) * CHUNK], tone(1.0), silence(1.0)]),
        {},
        first_seq=checkpoint.acked_seq + 1,
    )
    final = after.complete(after.next_job(), said("later")).segments[0]
    assert final.speaker == "bob" and final.segment_id == checkpoint.next_segment_id
    # A new owner without the saved speaker would not know it: the checkpoint is what carries it.
    blank = msgspec.structs.replace(checkpoint, speaker=None)
    lost = new_stream(endpoint_silence_s=0.5, checkpoint=blank)
    feed_speaking(lost, np.concatenate([tone(1.0), silence(1.0)]), {}, first_seq=checkpoint.acked_seq + 1)
    assert lost.complete(lost.next_job(), said("later")).segments[0].speaker is None
