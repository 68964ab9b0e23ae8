"""The lines a worker logs about a session: start, end with totals, takeover, hand-over."""

from jetscribe.services.transcriber.session_log import event_line, handed_over_line, takeover_line
from jetscribe.shared.wire import SessionCheckpoint, SessionEvent


def event(kind: str, **fields) -> SessionEvent:
    return SessionEvent(tenant="acme", session_id="s1", event=kind, at=0.0, worker_id="vm-t0", **fields)


def test_start_names_tenant_session_worker_partition_language_and_model():
    line = event_line(event("started", language="en", model="tiny.en"), partition=3, words=0)
    assert line == "session acme/s1 started on worker vm-t0, partition 3: language en, model tiny.en"


def test_end_carries_the_totals_and_the_reason():
    ended = event(
        "ended", audio_seconds=45.04, chunks_received=451, segments=12, words_dropped=2, empty_finals=1, model="base"
    )
    line = event_line(ended, partition=3, words=230)
    assert line == (
        "session acme/s1 ended (the bot ended it) on worker vm-t0, partition 3: 45.0 s of audio, 451 chunks, "
        "12 finals, 230 words, 2 words dropped by the guards, 1 empty finals"
    )
    assert "ended (idle_timeout)" in event_line(event("ended", reason="idle_timeout"), 0, 0)
    assert "rejected (worker_full)" in event_line(event("rejected", reason="worker_full"), 0, 0)


def test_the_hybrid_vad_says_how_much_silero_ran():
    line = event_line(event("ended"), 0, 0, silero_share=0.923)
    assert line.endswith("0 empty finals, Silero VAD on 92% of the frames")


def test_after_a_takeover_the_words_are_said_to_count_from_it():
    assert "17 words (since the takeover)" in event_line(event("ended"), 1, 17, resumed=True)


def test_takeover_names_the_checkpoint_it_resumes_from():
    checkpoint = SessionCheckpoint(
        tenant="acme", session_id="s1", acked_seq=41, acked_samples=16000 * 6, next_segment_id=3, worker_id="vm-t1"
    )
    assert takeover_line(checkpoint, "vm-t0", 5) == (
        "session acme/s1 taken over on worker vm-t0, partition 5, from vm-t1's checkpoint: acked up to seq 41 "
        "(6.0 s), next segment 3"
    )


def test_hand_over_says_where_the_next_owner_resumes():
    assert handed_over_line("acme", "s1", "vm-t0", 5, 41) == (
        "session acme/s1 handed over by worker vm-t0, partition 5: the next owner resumes after seq 41"
    )
