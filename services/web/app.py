"""The web process's asyncio shell: the live captions page and the session browser's read-only API.

It keeps the gateway free of PostgreSQL: the page streams audio straight to the gateway's WebSocket
(`/v1/listen`), and this process only serves the page and reads sessions, one tenant's at a time, checking
the API key as the gateway does. It holds no NATS connection and writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from jetscribe.cli.formats import render
from jetscribe.services.ingest.websocket import ApiKeys
from jetscribe.services.persister.store import final_segments, find_session, list_sessions, open_engine
from jetscribe.services.web.core import (
    KEY_PARAMETER,
    UnknownKey,
    UnknownSession,
    WebRefusal,
    export_filename,
    export_format,
    presented_key,
    session_detail,
    session_summary,
)
from jetscribe.shared import telemetry
from jetscribe.shared.config import WebConfig
from jetscribe.shared.metrics import ERROR_TYPE, WebMetrics

log = logging.getLogger(__name__)

SERVICE = "web"
TenantOf = Callable[[str], str | None]  # an API key -> its tenant, None if no tenant has it
STATIC = resources.files("jetscribe.services.web") / "static"
PAGES = {"index.html": "text/html", "captions.js": "text/javascript", "style.css": "text/css"}


def key_checker(keys: ApiKeys) -> TenantOf:
    """The gateway's own check of a tenant's API key (services/ingest/websocket.py), as a key -> tenant lookup."""

    def tenant_of(key: str) -> str | None:
        found = keys.tenant_of(key)
        return found[0] if found else None

    return tenant_of


class SessionBrowser:
    """The HTTP handlers: the page, its config, and a tenant's sessions from PostgreSQL."""

    def __init__(self, engine: AsyncEngine, config: WebConfig, tenant_of: TenantOf, metrics: WebMetrics):
        self.engine, self.config, self.tenant_of, self.metrics = engine, config, tenant_of, metrics

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/static/{name}", self.static),
            web.get("/config.json", self.page_config),
            web.get("/api/sessions", self.sessions),
            web.get("/api/sessions/{session}", self.session),
            web.get("/api/sessions/{session}/export", self.export),
        ]

    async def page(self, request: web.Request) -> web.Response:
        return self._static_file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._static_file(request.match_info["name"])

    def _static_file(self, name: str) -> web.Response:
        if name not in PAGES:
            raise web.HTTPNotFound()
        body = (STATIC / name).read_bytes()
        return web.Response(body=body, content_type=PAGES[name], charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def page_config(self, request: web.Request) -> web.Response:
        """Where the page streams to, and how it names the key there (a browser's WebSocket sets no header)."""
        return web.json_response({"gateway_url": self.config.gateway_url, "key_parameter": KEY_PARAMETER})

    def _tenant(self, request: web.Request) -> str:
        tenant = self.tenant_of(presented_key(request.headers.get("Authorization"), request.query))
        if tenant is None:
            raise UnknownKey()
        return tenant

    async def sessions(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        rows = await list_sessions(self.engine, tenant)
        rows.sort(key=lambda row: row.created_at, reverse=True)  # newest first: the one just streamed on top
        return web.json_response([session_summary(row) for row in rows])

    async def _stored(self, request: web.Request):
        tenant, session_id = self._tenant(request), request.match_info["session"]
        row = await find_session(self.engine, tenant, session_id)
        if row is None:
            raise UnknownSession(session_id)
        return row, await final_segments(self.engine, tenant, session_id)

    async def session(self, request: web.Request) -> web.Response:
        row, finals = await self._stored(request)
        return web.json_response(session_detail(row, finals))

    async def export(self, request: web.Request) -> web.Response:
        export = export_format(request.query.get("format", "vtt"))
        row, finals = await self._stored(request)
        body = render(finals, export.format)
        disposition = f'attachment; filename="{export_filename(row.session_id, export)}"'
        return web.Response(
            body=(body + "\n").encode(),
            headers={"Content-Type": export.content_type, "Content-Disposition": disposition},
        )

    @web.middleware
    async def refusals(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A refused request: its code and message as JSON with its HTTP status, counted and logged."""
        try:
            return await handler(request)
        except WebRefusal as exc:
            self.metrics.refusals.add(1, {ERROR_TYPE: exc.code})
            log.warning("refused %s %s: %s (%s)", request.method, request.path, exc.message, exc.code)
            return web.json_response({"code": exc.code, "message": exc.message}, status=exc.status)


async def run(
    config: WebConfig, stop: asyncio.Event, tenant_of: TenantOf, tel: telemetry.Telemetry | None = None
) -> None:
    """Serve until `stop` is set."""
    async with telemetry.serving(SERVICE, tel, needs=("database",)) as tel:
        engine = open_engine(config.database_url)
        browser = SessionBrowser(engine, config, tenant_of, WebMetrics(tel.meter))
        app = web.Application(middlewares=[browser.refusals])
        app.add_routes(browser.routes())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = runner.addresses[0][1]
            await _check_database(engine, tel, stop)
            log.info("captions page at http://%s:%d/ (gateway %s)", config.host, port, config.gateway_url)
            await stop.wait()
        finally:
            await runner.cleanup()
            await engine.dispose()


async def _check_database(engine: AsyncEngine, tel: telemetry.Telemetry, stop: asyncio.Event) -> None:
    """Ready once PostgreSQL answers; until then the page is served and the API answers 500."""
    while not stop.is_set():
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1 FROM sessions LIMIT 1"))
            tel.readiness.up("database")
            return
        except Exception as exc:  # any failure to reach or read it: not ready yet, said on /readyz
            tel.readiness.down("database", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            await asyncio.sleep(1.0)


def main() -> int:
    """`python -m jetscribe.services.web`: serve until SIGTERM or SIGINT, then exit 0."""

    def serve_web(stop: asyncio.Event, tel: telemetry.Telemetry) -> Awaitable[None]:
        config = WebConfig.from_env()
        return run(config, stop, key_checker(ApiKeys(config.api_keys_file)), tel)

    return telemetry.serve(SERVICE, serve_web)
