"""Service discovery and health the NATS way: each running service registers with the NATS micro-services API
(`nats.micro`), so `nats micro ls|info|stats` list every gateway, worker and persister with its version,
metadata and endpoints, and `jetscribe status` finds them with no other registry.

Every instance answers `$SRV.PING|INFO|STATS` (all services, or `.<name>`, or `.<name>.<id>`) and has two
endpoints of its own, on `jetscribe.svc.<service>.<id>.<endpoint>` (`subjects.service_endpoint`):
- `health`: its `Readiness` report; an error reply (code 503) while not ready;
- `stats`: its activity report (`shared/activity.py`).
`$SRV.STATS` carries the same two as each endpoint's `data`, so one request gets every instance's health and
numbers. Metadata is refreshed on every INFO and STATS (partitions move between workers).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig, ServiceInfo, ServiceStats

from jetscribe.shared import subjects
from jetscribe.shared.health import Readiness

log = logging.getLogger(__name__)

HEALTH_ENDPOINT = "health"
STATS_ENDPOINT = "stats"
NOT_READY_CODE = "503"

Report = Callable[[], dict[str, object]]
Metadata = Callable[[], dict[str, str]]


def service_name(service: str) -> str:
    """The micro-service name of one of ours: `jetscribe-ingest`, `jetscribe-transcriber`, `jetscribe-persister`."""
    return f"jetscribe-{service}"


def package_version() -> str:
    """The installed jetscribe version (the micro API wants a semantic version)."""
    try:
        return version("jetscribe")
    except PackageNotFoundError:  # running from a tree that was never installed
        return "0.0.0"


def host_metadata() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


class Registration(Service):
    """One service instance on the micro-services API, with a `health` and a `stats` endpoint.

    `live_metadata` is merged into the metadata before every INFO and STATS answer."""

    def __init__(
        self,
        nc: Client,
        service: str,
        description: str,
        readiness: Readiness,
        stats: Report,
        metadata: dict[str, str],
        live_metadata: Metadata | None = None,
    ):
        self.service = service
        self.readiness = readiness
        self.report = stats
        self.live_metadata = live_metadata
        self.metadata = dict(metadata)  # the very dict the micro service answers with: updated in place
        super().__init__(
            nc,
            ServiceConfig(
                name=service_name(service),
                version=package_version(),
                description=description,
                metadata=self.metadata,
                stats_handler=self._endpoint_data,
            ),
        )

    async def open(self) -> Registration:
        """Endpoints first, then the `$SRV` verbs: an instance never answers INFO or STATS without its endpoints."""
        await self.add_endpoint(
            name=HEALTH_ENDPOINT,
            handler=self._on_health,
            subject=subjects.service_endpoint(self.service, self.id, HEALTH_ENDPOINT),
            metadata={"description": "ready or not, and each readiness check"},
        )
        await self.add_endpoint(
            name=STATS_ENDPOINT,
            handler=self._on_stats,
            subject=subjects.service_endpoint(self.service, self.id, STATS_ENDPOINT),
            metadata={"description": "what this instance did lately (jetscribe status reads it)"},
        )
        await self.start()
        return self

    def info(self) -> ServiceInfo:
        self._refresh()
        return super().info()

    def stats(self) -> ServiceStats:
        self._refresh()
        return super().stats()

    def _refresh(self) -> None:
        if self.live_metadata is None:
            return
        try:
            self.metadata.update(self.live_metadata())
        except Exception:  # stale metadata is better than no answer at all
            log.exception("could not refresh the micro-service metadata of %s", self.service)

    def _endpoint_data(self, endpoint: EndpointStats) -> Any:
        """What `$SRV.STATS` carries as each endpoint's `data`: the same as the endpoint answers."""
        try:
            return self.readiness.report() if endpoint.name == HEALTH_ENDPOINT else self.report()
        except Exception as exc:  # one bad report must not take the whole STATS answer down
            log.exception("could not build the %s data of %s", endpoint.name, self.service)
            return {"error": repr(exc)}

    async def _on_health(self, request: Request) -> None:
        report = self.readiness.report()
        data = _json(report)
        if report["ready"]:
            await request.respond(data)
            return
        failing = ", ".join(f"{name}: {why}" for name, why in self.readiness.checks.items() if why)
        await request.respond_error(NOT_READY_CODE, f"not ready ({failing})", data=data)

    async def _on_stats(self, request: Request) -> None:
        await request.respond(_json(self.report()))


def _json(value: object) -> bytes:
    return json.dumps(value, default=str).encode()


async def register(
    nc: Client,
    service: str,
    *,
    description: str,
    readiness: Readiness,
    stats: Report,
    metadata: dict[str, str] | None = None,
    live_metadata: Metadata | None = None,
    metrics_port: int | None = None,
) -> Registration:
    """Register one instance of `service` ("ingest", "transcriber", "persister"); `await reg.stop()` at drain.

    `metrics_port`: the port of its Prometheus scrape endpoint, announced as metadata `metrics_port` (the
    telemetry's HTTP server picks it, 0 in config meaning a free one) so several instances on a host are found."""
    static = {**host_metadata(), **(metadata or {})}
    if metrics_port is not None:
        static["metrics_port"] = str(metrics_port)
    registration = Registration(nc, service, description, readiness, stats, static, live_metadata)
    await registration.open()
    log.info("registered as NATS micro-service %s, id %s", service_name(service), registration.id)
    return registration
