import pytest

from jetscribe.services.ingest.core import RequestRefused
from jetscribe.services.ingest.history import MAX_PAGE, HistoryRates, check_request, page_of
from jetscribe.services.ingest.rates import RateLimited
from jetscribe.shared.wire import HistoryRequest, StoredMessage, encode


def stored(seq: int, size: int = 10) -> StoredMessage:
    return StoredMessage(seq=seq, subject="transcript.a.s1", data=b"x" * size)


def test_a_request_is_held_to_a_page_and_garbage_is_refused():
    assert check_request(encode(HistoryRequest(from_seq=7, limit=10**6))).limit == MAX_PAGE
    assert check_request(encode(HistoryRequest(limit=0))).limit == 1
    for bad in (b"\xc1", encode(HistoryRequest(from_seq=-1))):
        with pytest.raises(RequestRefused) as refused:
            check_request(bad)
        assert refused.value.code == "malformed"


def test_a_page_stops_at_its_size_and_says_where_the_next_begins():
    page = page_of([stored(3), stored(5), stored(9)], pending=3)
    assert ([m.seq for m in page.messages], page.next_seq, page.done) == ([3, 5, 9], 10, True)
    page = page_of([stored(3, 100), stored(5, 100), stored(9, 100)], pending=40, max_bytes=250)
    assert ([m.seq for m in page.messages], page.next_seq, page.done) == ([3, 5], 6, False)
    assert [m.seq for m in page_of([stored(3, 1000)], pending=1, max_bytes=10).messages] == [3]  # one at least


def test_each_tenant_has_its_own_history_rate():
    rates = HistoryRates(pages_per_s=2.0, burst_s=1.0)
    for _ in range(2):
        rates.take("a", now=100.0)
    with pytest.raises(RateLimited) as limited:
        rates.take("a", now=100.0)
    assert limited.value.code == "rate_limited" and limited.value.retry_after_s == pytest.approx(0.5)
    rates.take("b", now=100.0)  # b is not held back by a
    rates.take("a", now=100.5)  # half a second later: one more page
