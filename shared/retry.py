"""One retry loop for every "keep trying until it works or we are told to stop" in the services."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The stop event was set before the operation succeeded."""


# The stop event of the service this task serves (set by telemetry.serve): a wait that the
# service's code does not pass its stop to, like connecting, still ends when the service stops.
service_stop: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("service_stop", default=None)


def backoff_delay(attempt: int, first_s: float = 0.2, max_s: float = 5.0) -> float:
    """Exponential backoff: first_s, 2*first_s, ... capped at max_s (attempt counts from 0)."""
    return min(max_s, first_s * 2.0 ** min(attempt, 30))


async def stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, waking early if `stop` is set; True if it was."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    fatal: tuple[type[BaseException], ...] = (),
    stop: asyncio.Event | None = None,
    first_s: float = 0.2,
    max_s: float = 5.0,
    logger: logging.Logger | None = None,
) -> T:
    """Run `operation` until it returns, backing off between failures; raise `Stopped` if `stop` is set first.

    Exceptions outside `retry_on`, and those in `fatal` (e.g. "this is not ours to do any more"), propagate at
    once. Each failure is logged as a warning naming `what`.
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except fatal:
            raise
        except retry_on as exc:
            delay = backoff_delay(attempt, first_s, max_s)
            attempt += 1
            (logger or log).warning("%s failed (%s); retry %d in %.1f s", what, exc, attempt, delay)
        if await stopped_within(stop, delay):
            raise Stopped(what)
