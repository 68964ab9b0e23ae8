"""shared/retry.py: the one retry loop honours its stop event, lets unexpected errors through, and backs off
up to a cap."""

import asyncio
import time

import pytest

from jetscribe.shared.retry import Stopped, backoff_delay, retry, stopped_within


def test_backoff_doubles_from_the_first_delay_up_to_the_cap():
    assert [backoff_delay(n, 0.2, 1.0) for n in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff_delay(0) == 0.2 and backoff_delay(10_000) == 5.0  # defaults; a huge attempt does not overflow
    assert backoff_delay(3, first_s=1.0, max_s=60.0) == 8.0


class Flaky:
    """Fails `failures` times with `error`, then returns "done"."""

    def __init__(self, failures, error=ConnectionError):
        self.failures, self.error, self.calls = failures, error, 0

    async def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "done"


async def test_retries_until_the_operation_succeeds(caplog):
    operation = Flaky(3)
    assert await retry(operation, what="connecting", first_s=0.001, max_s=0.001) == "done"
    assert operation.calls == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all(w.startswith("connecting failed (failure ") for w in warnings)


async def test_an_error_outside_retry_on_propagates_at_once():
    operation = Flaky(5, error=KeyError)
    with pytest.raises(KeyError):
        await retry(operation, what="x", retry_on=ConnectionError, first_s=0.001)
    assert operation.calls == 1


async def test_a_stop_during_the_backoff_ends_it_early():
    stop = asyncio.Event()
    operation = Flaky(100)
    asyncio.get_running_loop().call_later(0.1, stop.set)
    started = time.monotonic()
    with pytest.raises(Stopped):
        await retry(operation, what="x", stop=stop, first_s=30.0, max_s=30.0)
    assert time.monotonic() - started < 5  # woke on the stop, not after the 30 s backoff
    assert operation.calls == 1


async def test_a_stop_set_before_the_first_try_still_tries_once():
    stop = asyncio.Event()
    stop.set()
    assert await retry(Flaky(0), what="x", stop=stop) == "done"
    with pytest.raises(Stopped):
        await retry(Flaky(1), what="x", stop=stop, first_s=30.0)


async def test_the_delays_follow_the_backoff(monkeypatch):
    slept = []

    async def fake_stopped_within(stop, seconds):
        slept.append(seconds)
        return False

    monkeypatch.setattr("jetscribe.shared.retry.stopped_within", fake_stopped_within)
    await retry(Flaky(6), what="x", first_s=0.5, max_s=3.0)
    assert slept == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


async def test_stopped_within():
    stop = asyncio.Event()
    assert await stopped_within(stop, 0.01) is False
    assert await stopped_within(None, 0.01) is False
    stop.set()
    started = time.monotonic()
    assert await stopped_within(stop, 30.0) is True
    assert time.monotonic() - started < 5


async def test_a_fatal_exception_ends_the_retries_at_once():
    class Gone(Exception):
        pass

    calls = []

    async def operation():
        calls.append(1)
        raise Gone()

    with pytest.raises(Gone):
        await retry(operation, what="x", fatal=(Gone,), first_s=0.01)
    assert calls == [1]
