import numpy as np
import pytest

from jetscribe.services.ingest.core import (
    IngestBook,
    RequestRefused,
    SessionLedger,
    admit,
    check_reply_subject,
    decode_tenant_sessions,
    encode_tenant_sessions,
    stale_candidates,
    to_mono_int16,
    without,
)
from jetscribe.shared.config import IngestConfig
from jetscribe.shared.errors import CodedError
from jetscribe.shared.subjects import session_partition
from jetscribe.shared.wire import AudioChunk, SessionCheckpoint, SessionControl, SessionEvent


def start(book, session="s1"):
    return book.start(SessionControl(tenant="acme", session_id=session, action="start"))


def chunk(seq, samples=None, rate=16000, channels=1, encoding="pcm_s16le", session="s1"):
    if samples is None:
        samples = np.zeros(rate // 10 * channels, dtype="<i2")
    return AudioChunk(
        tenant="acme",
        session_id=session,
        seq=seq,
        sent_at=0.0,
        sample_rate=rate,
        channels=channels,
        encoding=encoding,
        payload=samples.tobytes(),
    )


def accept(book, c):
    verdict = book.check_chunk(c)
    if verdict.store is not None:
        book.accepted(verdict.ledger, c.seq)
    return verdict


def test_chunks_in_order_are_stored_and_repeats_are_not():
    book = IngestBook(IngestConfig())
    start(book)
    assert accept(book, chunk(0)).store is not None
    assert accept(book, chunk(1)).store is not None
    repeat = accept(book, chunk(1))
    assert repeat.store is None and repeat.ledger.last_seq == 1
    assert accept(book, chunk(0)).store is None


def test_gap_is_reported_with_where_to_resume():
    book = IngestBook(IngestConfig())
    start(book)
    accept(book, chunk(0))
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(5))
    assert err.value.code == "seq_gap" and book.last_seq_of("acme", "s1") == 0
    assert "expected seq 1" in str(err.value)
    assert accept(book, chunk(1)).store is not None


def test_unknown_session_and_ended_session_are_refused():
    book = IngestBook(IngestConfig())
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(0))
    assert err.value.code == "unknown_session"
    ledger = start(book)
    book.closed(book.end(SessionControl(tenant="acme", session_id="s1", action="end"))[0])
    assert book.end(SessionControl(tenant="acme", session_id="s1", action="end")) == (ledger, None)  # a repeat
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(0))
    assert err.value.code == "session_ended"


@pytest.mark.parametrize(
    "bad, code",
    [
        (dict(rate=0), "bad_sample_rate"),
        (dict(rate=400_000), "bad_sample_rate"),
        (dict(channels=0, samples=np.zeros(10, "<i2")), "bad_channels"),
        (dict(samples=np.zeros(3, "<i1")), "bad_payload"),
    ],
)
def test_bad_audio_is_refused_with_a_code(bad, code):
    book = IngestBook(IngestConfig())
    start(book)
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(0, **bad))
    assert err.value.code == code


def test_oversized_chunk_is_refused():
    book = IngestBook(IngestConfig(max_chunk_bytes=1000))
    start(book)
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(0, samples=np.zeros(600, "<i2")))
    assert err.value.code == "too_large"


def test_bad_ids_are_refused():
    book = IngestBook(IngestConfig())
    with pytest.raises(RequestRefused) as err:
        book.start(SessionControl(tenant="acme", session_id="has.dot", action="start"))
    assert err.value.code == "bad_id"


def test_48k_stereo_float_becomes_16k_mono_int16_without_losing_length():
    book = IngestBook(IngestConfig())
    ledger = start(book)
    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype("<f4")
    stereo = np.stack([tone, tone], axis=1)
    out = []
    for i in range(10):  # ten 100 ms chunks through one resampler stream
        piece = stereo[i * 4800 : (i + 1) * 4800]
        c = chunk(i, samples=piece, rate=48000, channels=2, encoding="pcm_f32le")
        out.append(to_mono_int16(c, ledger))
    ledger.last_seq = 9
    _, tail = book.end(SessionControl(tenant="acme", session_id="s1", action="end"))
    assert tail.seq == 10 and tail.sample_rate == 16000
    joined = np.concatenate(out + [np.frombuffer(tail.payload, "<i2")])
    assert joined.dtype == np.dtype("<i2")
    assert abs(len(joined) - 16000) <= 1  # with the flushed tail nothing is lost
    level = np.sqrt(np.mean((joined[2000:].astype(float) / 32767) ** 2))
    assert abs(level - 0.5 / np.sqrt(2)) < 0.02
    # Continuous across chunk joins: no clicks where chunks meet.
    assert np.max(np.abs(np.diff(joined[2000:].astype(int)))) < 32767 * 0.5 * 2 * np.pi * 440 / 16000 * 1.2


def test_nan_float_payload_is_refused():
    ledger = SessionLedger("acme", "s1")
    with pytest.raises(RequestRefused):
        to_mono_int16(chunk(0, samples=np.array([np.nan] * 4, "<f4"), encoding="pcm_f32le"), ledger)


def test_language_must_be_a_whisper_code_or_auto():
    book = IngestBook(IngestConfig())
    with pytest.raises(RequestRefused) as err:
        book.start(SessionControl(tenant="acme", session_id="s1", action="start", language="english"))
    assert err.value.code == "bad_language"
    book.start(SessionControl(tenant="acme", session_id="s1", action="start", language="de"))


def end(book, session="s1"):
    ledger, _ = book.end(SessionControl(tenant="acme", session_id=session, action="end"))
    book.closed(ledger)


def test_a_tenant_has_at_most_max_sessions_open():
    open_ = admit({}, "acme", "s1", limit=2, now=10.0)
    open_ = admit(open_, "acme", "s2", limit=2, now=11.0)
    assert open_ == {"s1": 10.0, "s2": 11.0}
    with pytest.raises(RequestRefused) as err:
        admit(open_, "acme", "s3", limit=2, now=12.0)
    assert err.value.code == "too_many_sessions" and "acme" in str(err.value)
    assert admit(open_, "acme", "s2", limit=2, now=12.0) is None  # a reconnecting bot's start holds its slot already
    open_ = without(open_, "s1")
    assert open_ == {"s2": 11.0} and without(open_, "s1") is None  # freeing twice writes nothing
    assert admit(open_, "acme", "s3", limit=2, now=13.0) == {"s2": 11.0, "s3": 13.0}  # an ended session frees its slot


def test_tenant_sessions_round_trip_and_old_slots_are_candidates_for_staleness():
    open_ = {"s1": 100.0, "s2": 150.0}
    assert decode_tenant_sessions(encode_tenant_sessions(open_)) == open_
    assert decode_tenant_sessions(None) == {} and decode_tenant_sessions(b"") == {}
    assert stale_candidates(open_, now=200.0, older_than_s=60.0) == ["s1"]
    assert without(open_, "s1", "s2", "s9") == {}


def test_a_store_moves_the_stream_seq_the_next_store_expects():
    book = IngestBook(IngestConfig())
    ledger = start(book)
    assert ledger.stream_seq == 0  # nothing stored: the next store expects no message of the session
    book.stored(ledger, 17)
    book.stored(ledger, 12)  # an older ack (a repeat) never moves it back
    assert ledger.stream_seq == 17
    recalled = book.recall("acme", "s2", chunk(4, session="s2"), None, None, stream_seq=40)
    assert (recalled.last_seq, recalled.stream_seq) == (4, 40)


def test_a_partition_let_go_forgets_its_sessions_only():
    book = IngestBook(IngestConfig())
    for session in ("s1", "s2", "s3", "s4", "s5"):
        start(book, session)
    by_partition = {s: session_partition("acme", s, 4) for s in ("s1", "s2", "s3", "s4", "s5")}
    gone = book.forget_partition(by_partition["s1"], 4)
    assert sorted(s for _, s in gone) == sorted(s for s, p in by_partition.items() if p == by_partition["s1"])
    assert all((book.ledger("acme", s) is None) == (p == by_partition["s1"]) for s, p in by_partition.items())


def test_a_session_the_transcriber_ended_takes_no_more_audio():
    book = IngestBook(IngestConfig())
    start(book, "s1")
    accept(book, chunk(0))
    assert book.closed_by_worker("acme", "s1", "ended", "idle_timeout").ended
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(1))
    assert err.value.code == "session_ended" and book.last_seq_of("acme", "s1") == 0
    start(book, "s2")
    assert book.end(SessionControl(tenant="acme", session_id="s1", action="end")) == (book.ledger("acme", "s1"), None)


def test_a_rejected_session_refuses_every_further_request_with_the_reason():
    book = IngestBook(IngestConfig())
    start(book, "s1")
    accept(book, chunk(0))
    book.closed_by_worker("acme", "s1", "rejected", "worker_full")
    requests = [
        lambda: book.check_chunk(chunk(1)),
        lambda: book.check_chunk(chunk(0)),  # even a repeat
        lambda: start(book, "s1"),
        lambda: book.end(SessionControl(tenant="acme", session_id="s1", action="end")),
    ]
    for request in requests:
        with pytest.raises(RequestRefused) as err:
            request()
        assert err.value.code == "rejected" and "worker_full" in str(err.value) and book.last_seq_of("acme", "s1") == 0
    start(book, "s2")  # other sessions go on


def test_a_rejection_after_the_bots_end_still_tells_the_bot():
    book = IngestBook(IngestConfig())
    start(book)
    end(book)
    book.closed_by_worker("acme", "s1", "rejected", "")
    with pytest.raises(RequestRefused) as err:
        book.end(SessionControl(tenant="acme", session_id="s1", action="end"))
    assert err.value.code == "rejected" and "no reason given" in str(err.value)


def test_an_event_for_a_session_the_gateway_does_not_know_changes_nothing():
    book = IngestBook(IngestConfig())
    assert book.closed_by_worker("acme", "elsewhere", "ended", "") is None
    assert book.ledger("acme", "elsewhere") is None


def test_a_session_unknown_to_the_streams_is_new():
    book = IngestBook(IngestConfig())
    assert book.recall("acme", "s1", None, None, None) is None
    assert book.last_seq_of("acme", "s1") == -1


def test_a_restarted_gateway_resumes_a_session_from_its_last_stored_chunk():
    book = IngestBook(IngestConfig())
    ledger = book.recall("acme", "s1", chunk(4), None, None)
    assert (ledger.last_seq, ledger.ended) == (4, False)
    assert accept(book, chunk(5)).store is not None


def test_an_ended_session_whose_audio_aged_out_is_still_ended():
    ended = SessionEvent(tenant="acme", session_id="s1", event="ended", at=1.0)
    book = IngestBook(IngestConfig())
    book.recall("acme", "s1", None, ended, None)
    with pytest.raises(RequestRefused) as err:
        start(book)
    assert err.value.code == "session_ended"
    # The checkpoint alone says so too, and knows the last seq the transcriber took.
    book = IngestBook(IngestConfig())
    book.recall("acme", "s1", None, None, SessionCheckpoint(tenant="acme", session_id="s1", acked_seq=7, finished=True))
    with pytest.raises(RequestRefused) as err:
        start(book)
    assert err.value.code == "session_ended" and book.last_seq_of("acme", "s1") == 7


def test_a_rejected_session_whose_audio_aged_out_is_refused_with_the_reason():
    rejected = SessionEvent(tenant="acme", session_id="s1", event="rejected", at=1.0, reason="buffer_full")
    book = IngestBook(IngestConfig())
    book.recall("acme", "s1", None, rejected, None)
    with pytest.raises(RequestRefused) as err:
        book.check_chunk(chunk(0))
    assert err.value.code == "rejected" and "buffer_full" in str(err.value)


def test_audio_already_in_the_stored_format_is_kept_bit_for_bit():
    samples = np.array([0, 1, -1, 999, 32767, -32768, 12345], dtype="<i2")
    stored = to_mono_int16(chunk(0, samples=samples), SessionLedger("acme", "s1"))
    assert stored.tobytes() == samples.tobytes()


@pytest.mark.parametrize("reply", ["", "_INBOX_acme.abc.1", "_INBOX.abc.1"])
def test_a_request_is_answered_on_its_tenants_or_the_services_inboxes(reply):
    check_reply_subject(reply, "acme")


@pytest.mark.parametrize(
    "reply",
    [
        "_INBOX_other.abc",  # another tenant's replies
        "_INBOX_acmex.abc",  # a tenant whose name begins with acme's
        "_INBOX_acme",
        "transcript.other.s1.x",
        "audio.other.s1",  # the gateway may write AUDIO
        "$JS.API.STREAM.DELETE.AUDIO",  # and use the JetStream API
        "$KV.tenant_sessions.other.s1",
        "ingest.partition.3.audio.other.s1",
    ],
)
def test_any_other_reply_subject_is_refused(reply):
    with pytest.raises(RequestRefused) as refused:
        check_reply_subject(reply, "acme")
    assert refused.value.code == "bad_reply" and "_INBOX_acme" in str(refused.value)


def test_a_start_with_a_bad_option_is_refused_and_opens_nothing():
    book = IngestBook(IngestConfig())
    for options, key in [({"endpointing_ms": 5}, "endpointing_ms"), ({"diarize": True}, "diarize")]:
        with pytest.raises(CodedError) as err:
            book.start(SessionControl(tenant="acme", session_id="s1", action="start", options=options))
        assert err.value.code == "bad_option" and repr(key) in str(err.value)
    with pytest.raises(CodedError, match="contradicts"):
        book.start(
            SessionControl(tenant="acme", session_id="s1", action="start", language="en", options={"language": "de"})
        )
    assert book.ledger("acme", "s1") is None
    good = {"interim_results": False, "endpointing_ms": False, "utterance_end_ms": 1000, "vad_events": True}
    assert book.start(SessionControl(tenant="acme", session_id="s1", action="start", options=good)).last_seq == -1


def test_a_finalize_is_marked_with_the_last_seq_and_a_gateway_learning_the_session_resumes_there():
    book = IngestBook(IngestConfig())
    finalize = SessionControl(tenant="acme", session_id="s1", action="finalize")
    with pytest.raises(RequestRefused) as err:
        book.finalize(finalize)
    assert err.value.code == "unknown_session"
    start(book)
    accept(book, chunk(0))
    accept(book, chunk(1))
    stored = book.finalize(finalize)
    assert (stored.action, stored.after_seq) == ("finalize", 1)
    fresh = IngestBook(IngestConfig())  # a restarted gateway: the finalize is the session's last message in AUDIO
    behind = SessionCheckpoint(tenant="acme", session_id="s1", acked_seq=-1)
    assert fresh.recall("acme", "s1", stored, None, behind, stream_seq=4).last_seq == 1
    book.closed(book.ledger("acme", "s1"))
    with pytest.raises(RequestRefused) as err:
        book.finalize(finalize)
    assert err.value.code == "session_ended"
