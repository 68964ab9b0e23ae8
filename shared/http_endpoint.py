"""Each service's small HTTP endpoint for operators: `/metrics` (Prometheus text format), `/healthz` (the process
is alive) and `/readyz` (200 only once `Readiness` says ready, else 503). GET or HEAD, one request per
connection, asyncio streams: no web framework for three fixed pages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from jetscribe.shared.health import Readiness

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
JSON = "application/json"


@dataclass(frozen=True)
class Page:
    status: int
    content_type: str
    body: bytes


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpEndpoint:
    """Serves `/metrics` from `render_metrics` (None: metrics are not exported this way) and the probes from
    `readiness`. `port` is the bound port once `start` returned (useful with port 0: a free one)."""

    def __init__(self, readiness: Readiness, render_metrics: Callable[[], bytes] | None, host: str, port: int):
        self.readiness = readiness
        self.render_metrics = render_metrics
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def page(self, method: str, path: str) -> Page:
        """The answer to one request (no I/O)."""
        if method not in ("GET", "HEAD"):
            return Page(405, "text/plain", b"only GET and HEAD\n")
        path = path.split("?", 1)[0]
        if path == "/metrics":
            if self.render_metrics is None:
                return Page(404, "text/plain", b"metrics are not exported to Prometheus (OTEL_METRICS_EXPORTER)\n")
            from prometheus_client import CONTENT_TYPE_LATEST

            return Page(200, CONTENT_TYPE_LATEST, self.render_metrics())
        if path == "/healthz":
            return Page(200, JSON, json.dumps({"service": self.readiness.service, "alive": True}).encode() + b"\n")
        if path == "/readyz":
            report = self.readiness.report()
            return Page(200 if report["ready"] else 503, JSON, json.dumps(report).encode() + b"\n")
        return Page(404, "text/plain", b"try /metrics, /healthz or /readyz\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                answer = Page(400, "text/plain", b"bad request line\n")
                method = "GET"
            else:
                method, path = parts[0], parts[1]
                answer = self.page(method, path)
            status = f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, '')}\r\n"
            headers = (
                f"Content-Type: {answer.content_type}\r\nContent-Length: {len(answer.body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write((status + headers).encode("latin-1") + (answer.body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent no proper request: nothing to answer
        except Exception:
            log.exception("HTTP endpoint: could not answer")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
