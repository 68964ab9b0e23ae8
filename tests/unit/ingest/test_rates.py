"""Token buckets and the gateway's rate limits, on a manual clock."""

import numpy as np
import pytest

from jetscribe.services.ingest.core import AUDIO_ENVELOPE_BYTES, IngestBook, RequestRefused, check_request_size
from jetscribe.services.ingest.rates import Allowance, RateLimited, RateLimiter, RateLimits, TokenBucket
from jetscribe.shared.clock import ManualClock
from jetscribe.shared.config import ConfigError, IngestConfig
from jetscribe.shared.wire import AudioChunk, SessionControl

NOW = 10 * 24 * 3600.0


def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_its_capacity():
    bucket = TokenBucket.full(rate=10, burst_s=2, now=NOW)
    assert bucket.capacity == 20 and bucket.wait_for(20, NOW) == 0
    bucket.take(20, NOW)
    assert bucket.wait_for(1, NOW) == pytest.approx(0.1)
    assert bucket.wait_for(5, NOW + 0.2) == pytest.approx(0.3)  # 2 tokens back after 0.2 s
    assert bucket.wait_for(1, NOW + 1000) == 0 and bucket.tokens == 20  # never more than its capacity


def test_a_cost_above_the_capacity_waits_for_a_full_bucket_rather_than_forever():
    bucket = TokenBucket.full(rate=100, burst_s=1, now=NOW)
    assert bucket.wait_for(1_000_000, NOW) == 0
    bucket.take(1_000_000, NOW)
    assert bucket.tokens == 0 and bucket.wait_for(1_000_000, NOW) == pytest.approx(1.0)


def test_rate_zero_is_no_limit():
    bucket = TokenBucket.full(rate=0, burst_s=60, now=NOW)
    for _ in range(1000):
        assert bucket.wait_for(10**9, NOW) == 0
        bucket.take(10**9, NOW)


def test_a_refused_chunk_takes_nothing_and_its_wait_is_exact():
    limiter = RateLimiter(RateLimits(session_chunks_per_s=2, burst_s=1, tenant_chunks_per_s=0, tenant_bytes_per_s=0))
    session = limiter.session_allowance(NOW)
    limiter.admit("acme", session, 100, NOW)
    limiter.admit("acme", session, 100, NOW)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", session, 100, NOW)
    assert refused.value.code == "rate_limited" and refused.value.retry_after_s == pytest.approx(0.5)
    assert "chunks/s" in str(refused.value) and "0.500 s" in str(refused.value)
    with pytest.raises(RateLimited):  # still refused just before the wait is over: nothing was taken meanwhile
        limiter.admit("acme", session, 100, NOW + 0.49)
    limiter.admit("acme", session, 100, NOW + 0.5)


def test_the_tenant_bucket_is_shared_by_its_sessions_and_not_by_other_tenants():
    limiter = RateLimiter(RateLimits(tenant_chunks_per_s=3, burst_s=1))
    sessions = [limiter.session_allowance(NOW) for _ in range(4)]
    for session in sessions[:3]:
        limiter.admit("acme", session, 10, NOW)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", sessions[3], 10, NOW)
    assert "tenant acme" in str(refused.value)
    limiter.admit("other", sessions[3], 10, NOW)  # another tenant has its own bucket


def test_bytes_are_limited_apart_from_chunks():
    limiter = RateLimiter(RateLimits(session_bytes_per_s=1000, burst_s=1))
    session = limiter.session_allowance(NOW)
    limiter.admit("acme", session, 800, NOW)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("acme", session, 800, NOW)
    assert "bytes/s" in str(refused.value) and refused.value.retry_after_s == pytest.approx(0.6)


def test_idle_tenants_are_pruned_once_many_are_kept(monkeypatch):
    monkeypatch.setattr("jetscribe.services.ingest.rates.MAX_TENANTS_KEPT", 3)
    limiter = RateLimiter(RateLimits())
    for i in range(3):
        limiter.admit(f"t{i}", limiter.session_allowance(NOW), 10, NOW)
    limiter.admit("t3", limiter.session_allowance(NOW), 10, NOW + 3600)  # the others have refilled by now
    assert list(limiter.tenants) == ["t3"]
    assert isinstance(limiter.tenants["t3"], Allowance)


def chunk(seq, size=3200, session="s1"):
    return AudioChunk(
        tenant="acme",
        session_id=session,
        seq=seq,
        sent_at=0.0,
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=np.zeros(size // 2, "<i2").tobytes(),
    )


def test_real_time_and_a_reconnect_backlog_pass_the_defaults_a_sustained_flood_does_not():
    clock = ManualClock()
    book = IngestBook(IngestConfig(), clock.monotonic)
    book.start(SessionControl(tenant="acme", session_id="s1", action="start"))
    seq = 0
    for _ in range(600):  # ten minutes of 100 ms chunks in real time
        book.accepted(book.check_chunk(chunk(seq)).ledger, seq)
        seq += 1
        clock.advance(0.1)
    for _ in range(2000):  # a reconnecting bot's 200 s backlog, sent at once
        book.accepted(book.check_chunk(chunk(seq)).ledger, seq)
        seq += 1
    flooded = 0
    for _ in range(20_000):  # then as fast as it can: 10 chunks every 0.01 s (100x real time)
        try:
            book.accepted(book.check_chunk(chunk(seq)).ledger, seq)
            seq += 1
        except RateLimited as refused:
            flooded += 1
            assert refused.retry_after_s > 0
            clock.advance(0.001)
    assert flooded > 0
    ledger = book.ledger("acme", "s1")
    assert ledger.last_seq == seq - 1  # every chunk it was told to resend got in, in order


def test_a_rate_limited_chunk_leaves_the_session_as_it_was():
    clock = ManualClock()
    book = IngestBook(IngestConfig(session_chunks_per_s=1, rate_burst_s=1), clock.monotonic)
    book.start(SessionControl(tenant="acme", session_id="s1", action="start"))
    book.accepted(book.check_chunk(chunk(0)).ledger, 0)
    with pytest.raises(RateLimited):
        book.check_chunk(chunk(1))
    assert book.ledger("acme", "s1").last_seq == 0
    clock.advance(1.0)
    assert book.check_chunk(chunk(1)).store.seq == 1


def test_a_request_too_large_for_its_kind_is_refused_before_decoding():
    config = IngestConfig(max_chunk_bytes=1000)
    check_request_size("audio", 1000 + AUDIO_ENVELOPE_BYTES, config)
    with pytest.raises(RequestRefused) as refused:
        check_request_size("audio", 1000 + AUDIO_ENVELOPE_BYTES + 1, config)
    assert refused.value.code == "too_large"
    with pytest.raises(RequestRefused):
        check_request_size("session", 16 * 1024 + 1, config)


def test_nan_and_infinite_send_times_are_refused():
    book = IngestBook(IngestConfig())
    with pytest.raises(RequestRefused) as refused:
        book.start(SessionControl(tenant="acme", session_id="s1", action="start", sent_at=float("nan")))
    assert refused.value.code == "malformed"
    book.start(SessionControl(tenant="acme", session_id="s1", action="start"))
    with pytest.raises(RequestRefused) as refused:
        book.check_chunk(AudioChunk(**{**_fields(chunk(0)), "sent_at": float("inf")}))
    assert refused.value.code == "malformed"


def _fields(c):
    return {f: getattr(c, f) for f in c.__struct_fields__}


@pytest.mark.parametrize("name", ["session_chunks_per_s", "tenant_bytes_per_s"])
def test_negative_limits_are_refused(name):
    with pytest.raises(ConfigError, match=name.upper()):
        IngestConfig(**{name: -1})
    with pytest.raises(ConfigError, match="BURST"):
        IngestConfig(rate_burst_s=0)
