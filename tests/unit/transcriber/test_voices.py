"""Speakers from the audio, the pure part: scripted embeddings in, stable labels out; finals labelled and split;
the centroids carried through a checkpoint."""

import math
from dataclasses import replace

import msgspec
import numpy as np
import pytest

from jetscribe.services.transcriber.voices import VoiceMatcher, VoiceOptions, VoicePiece, label_words
from jetscribe.shared.wire import SessionCheckpoint, Word, decode, encode
from tests.unit.transcriber.scripted import CHUNK, chunk, new_stream, said, silence, tone

DIM = 8


def voice(axis: int, wobble: float = 0.0, towards: int | None = None) -> tuple[float, ...]:
    """A unit vector near axis `axis`; `wobble` of it leans towards axis `towards` (a noisy window)."""
    v = [0.0] * DIM
    v[axis] = 1.0
    if towards is not None:
        v[towards] = wobble
    n = math.sqrt(sum(x * x for x in v))
    return tuple(x / n for x in v)


def pieces(start: float, voices: list[tuple[float, ...]], window: float = 1.5, hop: float = 0.75) -> list[VoicePiece]:
    return [VoicePiece(start + i * hop, start + i * hop + window, v) for i, v in enumerate(voices)]


def test_each_voice_gets_one_label_for_the_whole_session():
    m = VoiceMatcher()
    said_by = [0, 1, 0, 0, 2, 1, 2, 0]
    labels = [
        m.label([VoicePiece(i * 3.0, i * 3.0 + 2.0, voice(a, 0.3, (a + 1) % DIM))]) for i, a in enumerate(said_by)
    ]
    assert [t[0][2] for t in labels] == ["S1", "S2", "S1", "S1", "S3", "S2", "S3", "S1"]
    assert m.speakers == ["S1", "S2", "S3"]


def test_a_final_is_split_where_the_voice_changes_and_a_stray_window_is_not_a_turn():
    m = VoiceMatcher()
    m.label([VoicePiece(0.0, 2.0, voice(0))])  # S1 known
    # One utterance: S1 for four windows, one window that leans to another voice, then a new voice for four.
    ws = [voice(0)] * 2 + [voice(0, 2.0, 5)] + [voice(0)] * 2 + [voice(3)] * 4
    turns = m.label(pieces(10.0, ws))
    assert [t[2] for t in turns] == ["S1", "S2"]
    assert turns[0][0] == 10.0 and turns[1][1] == 10.0 + 8 * 0.75 + 1.5
    # The turns meet halfway through the overlap of the last S1 window and the first S2 window.
    assert turns[0][1] == turns[1][0] == (10.0 + 4 * 0.75 + 1.5 + 10.0 + 5 * 0.75) / 2


def test_one_off_window_inside_a_long_utterance_founds_nobody_and_does_not_split():
    # End-to-end windows (hop 1.5 s) in a reverberant room: one window that sounds like nobody known owns 1.5 s,
    # more than new_speaker_s and min_turn_s, but it is one window.
    m = VoiceMatcher()
    m.label([VoicePiece(0.0, 2.0, voice(0))])  # S1 known
    for where in (2, 4):  # in the middle, and as the last window (which owns all its 1.5 s)
        ws = [voice(0)] * 5
        ws[where] = voice(6)
        turns = m.label(pieces(10.0, ws, hop=1.5))
        assert turns == [(10.0, 10.0 + 4 * 1.5 + 1.5, "S1")]
    assert m.speakers == ["S1"]


def test_two_off_windows_inside_a_long_utterance_are_a_turn_of_a_new_speaker():
    m = VoiceMatcher()
    m.label([VoicePiece(0.0, 2.0, voice(0))])
    turns = m.label(pieces(10.0, [voice(0)] * 3 + [voice(6)] * 2, hop=1.5))
    assert [t[2] for t in turns] == ["S1", "S2"] and m.speakers == ["S1", "S2"]
    assert turns[0][1] == turns[1][0] == 10.0 + 3 * 1.5  # end to end: the windows meet where they touch


def test_a_multi_window_utterance_all_in_a_new_voice_founds_a_speaker():
    m = VoiceMatcher()
    m.label([VoicePiece(0.0, 2.0, voice(0))])
    assert [t[2] for t in m.label(pieces(10.0, [voice(6)] * 2, hop=1.5))] == ["S2"]
    assert m.speakers == ["S1", "S2"]


def test_with_one_window_enough_an_off_end_to_end_window_founds_a_speaker():
    # min_turn_windows=1: the seconds alone decide, as before windows were counted (README, the room's over-split).
    m = VoiceMatcher(VoiceOptions(min_turn_windows=1))
    m.label([VoicePiece(0.0, 2.0, voice(0))])
    turns = m.label(pieces(10.0, [voice(0)] * 2 + [voice(6)] + [voice(0)] * 2, hop=1.5))
    assert [t[2] for t in turns] == ["S1", "S2", "S1"] and m.speakers == ["S1", "S2"]
    with pytest.raises(ValueError, match="at least 1 voice window"):
        VoiceOptions(min_turn_windows=0)


def test_too_little_of_a_new_voice_founds_no_speaker():
    m = VoiceMatcher(VoiceOptions(new_speaker_s=1.0))
    m.label([VoicePiece(0.0, 2.0, voice(0))])
    turns = m.label([VoicePiece(5.0, 5.6, voice(4))])  # 0.6 s of someone unknown: the nearest speaker
    assert [t[2] for t in turns] == ["S1"] and m.speakers == ["S1"]
    assert m.label([VoicePiece(9.0, 10.5, voice(4))])[0][2] == "S2"  # 1.5 s of it: a new speaker


def test_the_first_words_of_a_session_found_a_speaker_however_short():
    m = VoiceMatcher()
    assert m.label([VoicePiece(0.0, 0.5, voice(2))]) == [(0.0, 0.5, "S1")]
    assert m.label([]) == []


def test_past_max_speakers_a_new_voice_goes_to_the_nearest():
    m = VoiceMatcher(VoiceOptions(max_speakers=2))
    for i, axis in enumerate([0, 1, 2]):
        m.label([VoicePiece(i * 3.0, i * 3.0 + 2.0, voice(axis, 0.9, 0) if axis == 2 else voice(axis))])
    assert m.speakers == ["S1", "S2"]


def test_centroids_survive_a_checkpoint_and_labels_go_on():
    m = VoiceMatcher()
    for i, axis in enumerate([0, 1, 0]):
        m.label([VoicePiece(i * 3.0, i * 3.0 + 2.0, voice(axis, 0.2, 7))])
    cp = SessionCheckpoint(tenant="t", session_id="s", voices=m.state())
    restored = decode(encode(cp), SessionCheckpoint)
    assert isinstance(restored, SessionCheckpoint)
    after = VoiceMatcher(VoiceOptions(), restored.voices)
    assert after.speakers == ["S1", "S2"]
    assert after.label([VoicePiece(20.0, 22.0, voice(1, 0.1, 6))])[0][2] == "S2"
    assert after.label([VoicePiece(23.0, 25.0, voice(5))])[0][2] == "S3"  # numbering goes on after S2


def test_an_old_checkpoint_without_voices_reads_as_none():
    old = msgspec.msgpack.encode({"type": "checkpoint", "v": 1, "tenant": "t", "session_id": "s"})
    cp = decode(old, SessionCheckpoint)
    assert isinstance(cp, SessionCheckpoint) and cp.voices == []


def test_words_take_the_turn_at_their_middle_and_bot_labels_win():
    turns = [(0.0, 2.0, "S1"), (2.5, 4.0, "S2")]
    ws = [Word("a", 0.1, 0.4, 0.9), Word("b", 2.1, 2.3, 0.9), Word("c", 2.6, 2.9, 0.9, "ann"), Word("d", 5.0, 5.2, 0.9)]
    assert [w.speaker for w in label_words(ws, turns)] == ["S1", "S1", "ann", "S2"]
    assert label_words(ws, []) == ws


class FakeVoices:
    """What the shell attaches to a final's decode: one piece per span it names, for the job's audio."""

    def __init__(self, spans):
        self.spans = spans  # [(start_s, end_s, axis)]

    def attach(self, decoded):
        return replace(decoded, voices=tuple(VoicePiece(a, b, voice(axis)) for a, b, axis in self.spans))


def stream_with_voices(checkpoint=None):
    s = new_stream(endpoint_silence_s=0.5, checkpoint=checkpoint)
    s.transcript.voices = VoiceMatcher()
    if checkpoint is not None:
        s.transcript.restore(checkpoint)
    return s


def feed(stream, audio, first_seq=0):
    seq = first_seq
    for off in range(0, len(audio), CHUNK):
        stream.receive(chunk(seq, audio[off : off + CHUNK]), seq)
        seq += 1
    return seq


def test_a_final_is_labelled_and_split_by_voice_with_source_audio():
    s = stream_with_voices()
    seq = feed(s, np.concatenate([silence(1.0), tone(3.0), silence(1.0)]))
    job = s.next_job()
    assert job.kind == "final"
    decoded = said("hello", "there", start=0.3)  # session 1.0-1.6 s
    decoded.segments[0].words.extend(said("hi", "you", start=2.5).segments[0].words)  # 3.2-3.8 s
    spans = [(0.7, 2.2, 0), (1.45, 2.95, 0), (2.2, 3.7, 1), (2.95, 4.45, 1)]
    step = s.complete(job, FakeVoices(spans).attach(decoded))
    finals = [(g.segment_id, g.speaker, g.speaker_source, g.text) for g in step.segments]
    assert finals == [(0, "S1", "audio", "hello there"), (1, "S2", "audio", "hi you")]
    assert all(w.speaker == g.speaker for g in step.segments for w in g.words)
    # The next utterance, in the first voice: S1 again; the checkpoint holds both voices.
    feed(s, np.concatenate([tone(1.0), silence(1.0)]), first_seq=seq)
    job = s.next_job()
    step = s.complete(job, FakeVoices([(job.start_sample / 16000, job.end_sample / 16000, 0)]).attach(said("more")))
    assert [(g.speaker, g.speaker_source) for g in step.segments] == [("S1", "audio")]
    cp = s.transcript.checkpoint()
    assert [v.label for v in cp.voices] == ["S1", "S2"]
    # A worker taking over from that checkpoint hears the second voice as S2.
    t = stream_with_voices(checkpoint=cp)
    feed(t, np.concatenate([silence(0.5), tone(1.5), silence(1.0)]), first_seq=cp.acked_seq + 1)
    job = t.next_job()
    step = t.complete(job, FakeVoices([(job.start_sample / 16000, job.end_sample / 16000, 1)]).attach(said("yes")))
    assert [(g.speaker, g.speaker_source) for g in step.segments] == [("S2", "audio")]


def test_without_voices_or_with_the_bot_naming_speakers_nothing_is_heard():
    s = new_stream(endpoint_silence_s=0.5)  # off: no matcher
    feed(s, np.concatenate([tone(1.5), silence(1.0)]))
    job = s.next_job()
    step = s.complete(job, FakeVoices([(0.0, 1.5, 0)]).attach(said("hello")))
    assert [(g.speaker, g.speaker_source) for g in step.segments] == [(None, None)]
    b = stream_with_voices()
    b.transcript.speakers.mark(0, "ann")  # the bot names who talks: its label wins, the voice is not folded in
    feed(b, np.concatenate([tone(1.5), silence(1.0)]))
    job = b.next_job()
    step = b.complete(job, FakeVoices([(0.0, 1.5, 0)]).attach(said("hello")))
    assert [(g.speaker, g.speaker_source) for g in step.segments] == [("ann", "bot")]
    assert b.transcript.voices.speakers == []
