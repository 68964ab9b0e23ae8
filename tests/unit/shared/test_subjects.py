"""shared/subjects.py: every name the pipeline uses, built in one place, and the token rule for ids."""

import pytest

from jetscribe.shared import subjects


@pytest.mark.parametrize("value", ["acme", "s1", "A-b_9", "x" * 64, "-", "_"])
def test_valid_tokens(value):
    assert subjects.is_valid_token(value)


@pytest.mark.parametrize("value", ["", "x" * 65, "a.b", "a b", "a*", "a>", "é", "a/b", "a:b", "a\n"])
def test_invalid_tokens(value):
    assert not subjects.is_valid_token(value)


def test_ingest_subjects():
    assert subjects.ingest_audio("acme", "s1") == "ingest.audio.acme.s1"
    assert subjects.ingest_session("acme", "s1") == "ingest.session.acme.s1"
    assert (subjects.INGEST_AUDIO_ALL, subjects.INGEST_SESSION_ALL) == ("ingest.audio.*.*", "ingest.session.*.*")


def test_audio_subjects():
    assert subjects.audio("acme", "s1") == "audio.acme.s1"
    assert subjects.AUDIO_PUBLISHED == "audio.*.*"
    assert subjects.audio_partition_filter(7) == "audio.*.*.7"
    assert subjects.audio_of_session("acme", "s1") == "audio.acme.s1.*"
    assert subjects.message_id("acme", "s1", 12) == "acme:s1:12"
    assert subjects.message_id("acme", "s1", "end") == "acme:s1:end"


def test_the_partition_transform():
    source, destination = subjects.audio_partition_transform(16)
    assert source == subjects.AUDIO_PUBLISHED
    # NATS's mapping syntax: the stream appends partition(16) of tokens 1 and 2 (tenant, session).
    assert destination == "audio.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(16,1,2)}}"
    assert subjects.audio_partition_transform(3)[1].endswith(".{{partition(3,1,2)}}")


def test_transcriber_names():
    assert subjects.transcriber_consumer(3) == "transcriber-p3"
    assert subjects.partition_lease_key(3) == "p3"
    assert subjects.checkpoint_key("acme", "s1") == "acme.s1"
    assert len(subjects.TRANSCRIBER_PRIORITY_GROUP) <= 16  # the server's limit on group names


def test_transcript_and_event_subjects():
    assert subjects.transcript("acme", "s1") == "transcript.acme.s1"
    assert subjects.session_event("acme", "s1", "ended") == "session.acme.s1.ended"
    assert subjects.session_events_of("acme", "s1") == "session.acme.s1.*"
    assert subjects.session_event_all("ended") == "session.*.*.ended"
    assert (subjects.TRANSCRIPTS_ALL, subjects.SESSION_EVENTS_ALL) == ("transcript.*.*", "session.*.*.*")


def test_error_subjects():
    assert subjects.errors("persister", "acme") == "errors.persister.acme"
    assert subjects.errors("ingest", "") == "errors.ingest._"  # no tenant known (e.g. a malformed request)
    assert subjects.ERRORS_ALL == "errors.>"


def test_every_built_subject_matches_its_wildcard():
    def matches(subject, pattern):
        s, p = subject.split("."), pattern.split(".")
        if p[-1] == ">":
            return len(s) >= len(p) and all(b in ("*", a) for a, b in zip(s, p[:-1], strict=False))
        return len(s) == len(p) and all(b in ("*", a) for a, b in zip(s, p, strict=False))

    assert matches(subjects.ingest_audio("t", "s"), subjects.INGEST_AUDIO_ALL)
    assert matches(subjects.ingest_session("t", "s"), subjects.INGEST_SESSION_ALL)
    assert matches(subjects.audio("t", "s"), subjects.AUDIO_PUBLISHED)
    assert matches(subjects.audio("t", "s") + ".5", subjects.audio_partition_filter(5))
    assert matches(subjects.audio("t", "s") + ".5", subjects.audio_of_session("t", "s"))
    assert matches(subjects.transcript("t", "s"), subjects.TRANSCRIPTS_ALL)
    assert matches(subjects.session_event("t", "s", "started"), subjects.SESSION_EVENTS_ALL)
    assert matches(subjects.session_event("t", "s", "ended"), subjects.session_event_all("ended"))
    assert matches(subjects.errors("x", "t"), subjects.ERRORS_ALL)
    # The stream names stay distinct from each other's subjects.
    assert len({subjects.AUDIO_STREAM, subjects.TRANSCRIPTS_STREAM, subjects.ERRORS_STREAM}) == 3


def test_session_partition_is_the_servers_partition_function():
    # Values nats-server 2.15's `partition(16,1,2)` gave these sessions (the integration tests check more).
    assert [subjects.session_partition(f"t{i}", f"sess-{i}", 16) for i in range(3)] == [2, 6, 14]
    assert {subjects.session_partition("acme", f"s{i}", 4) for i in range(100)} == {0, 1, 2, 3}
