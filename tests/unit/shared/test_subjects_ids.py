"""Message ids of what the transcriber publishes: built in subjects.py, stable across workers."""

from jetscribe.shared import subjects
from jetscribe.shared.wire import language_for


def test_a_final_segment_id_is_the_same_from_every_worker():
    a = subjects.segment_message_id("acme", "s1", 3, "final", 2, "w1")
    b = subjects.segment_message_id("acme", "s1", 3, "final", 5, "w2")
    assert a == b == "acme:s1:seg:3:final"


def test_interim_ids_differ_per_revision_and_worker():
    ids = {
        subjects.segment_message_id("acme", "s1", 3, "interim", rev, worker)
        for rev in (1, 2)
        for worker in ("w1", "w2")
    }
    assert len(ids) == 4
    assert subjects.segment_message_id("acme", "s1", 3, "interim", 1, "w1") == "acme:s1:seg:3:1:w1"


def test_event_ids_are_one_per_session_and_kind():
    assert subjects.event_message_id("acme", "s1", "ended") == "acme:s1:event:ended"
    assert subjects.event_message_id("acme", "s1", "ended") != subjects.event_message_id("acme", "s2", "ended")
    assert subjects.event_message_id("acme", "s1", "ended") != subjects.event_message_id("acme", "s1", "started")


def test_ids_do_not_collide_with_audio_ids():
    assert subjects.message_id("acme", "s1", 0) != subjects.segment_message_id("acme", "s1", 0, "final", 1, "w")


def test_language_for_english_only_models():
    assert language_for("tiny.en", None) == "en"
    assert language_for("tiny.en", "de") == "en"
    assert language_for("base", "auto") is None
    assert language_for("base", None) is None
    assert language_for("base", "de") == "de"
