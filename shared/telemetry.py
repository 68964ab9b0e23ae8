"""OpenTelemetry tracing for all services.

Spans are always recorded; they are printed to stderr when JETSCRIBE_OTEL_CONSOLE=1, so an
operator can see where a chunk's time goes without running a collector.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from jetscribe.shared.config import ConfigError
from jetscribe.shared.retry import Stopped, service_stop


def setup(service: str) -> None:
    """Configure logging and tracing for one service process."""
    logging.basicConfig(
        level=os.environ.get("JETSCRIBE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {service} %(levelname)s %(message)s",
    )
    provider = TracerProvider(resource=Resource.create({"service.name": f"jetscribe-{service}"}))
    if os.environ.get("JETSCRIBE_OTEL_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def serve(service: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a service's `run(stop)` until SIGTERM or SIGINT sets `stop`; the process then exits 0, or 2 after
    a ConfigError (its message, one line on stderr).

    `stop` is also the task's `service_stop`, so a service still connecting to NATS stops too.
    """
    setup(service)

    async def main() -> int:
        stop = asyncio.Event()
        service_stop.set(stop)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await run(stop)
        except Stopped as exc:
            logging.getLogger(__name__).info("stopped before %s", exc)
        except ConfigError as exc:  # a setting that cannot work here: one line that says what to set
            print(f"jetscribe-{service}: {exc}", file=sys.stderr, flush=True)
            return 2
        return 0

    return asyncio.run(main())
