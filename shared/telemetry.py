"""Logs, metrics and traces of one service, and how it is run as a process (`serve`).

A `Telemetry` belongs to one service: its OpenTelemetry meter and tracer providers (named by `service.name`),
its readiness checks, and its HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, on JETSCRIBE_METRICS_PORT, 0 = a
free port: `metrics_port` once serving). Several services in one process (the tests) each keep their own.

Export: Prometheus always scrapes `/metrics`; OTLP over HTTP when OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)ENDPOINT
is set; stderr when JETSCRIBE_OTEL_CONSOLE=1. OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER (otlp, console,
prometheus, none) override that choice; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG)
and the exporters' own OTEL_* variables are read by OpenTelemetry.

Traces cross the queue as W3C trace context (`traceparent`) in NATS headers: `inject` before a publish,
`extract` / `span_context_of` on receipt. Log lines carry the tenant, session (`log_context`) and trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanContext, Tracer

from jetscribe.shared.config import ConfigError, TelemetryConfig
from jetscribe.shared.health import Readiness
from jetscribe.shared.http_endpoint import HttpEndpoint
from jetscribe.shared.retry import Stopped, service_stop

if TYPE_CHECKING:  # the metrics SDK and the Prometheus exporter load when a Telemetry is made, after the signals
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class EndpointUnavailable(Exception):
    """The HTTP endpoint cannot listen where it is configured to (a port in use, an address not on this host)."""


def exporters(kind: str, config: TelemetryConfig, environ: Mapping[str, str] = os.environ) -> set[str]:
    """Where `kind` ("traces" or "metrics") goes: OTEL_<KIND>_EXPORTER if set, else Prometheus (metrics), OTLP
    if an OTLP endpoint is set, and the console if JETSCRIBE_OTEL_CONSOLE=1."""
    chosen = environ.get(f"OTEL_{kind.upper()}_EXPORTER", "").strip()
    if chosen:
        names = {name.strip() for name in chosen.split(",") if name.strip()}
        unknown = names - {"otlp", "console", "none", "prometheus"}
        if unknown:
            raise ValueError(
                f"OTEL_{kind.upper()}_EXPORTER names {sorted(unknown)}: use otlp, console, prometheus or none"
            )
        return names - {"none"}
    names = {"prometheus"} if kind == "metrics" else set()
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"):
        names.add("otlp")
    if config.console == "1":
        names.add("console")
    return names


def _resource(service: str, instance: str) -> Resource:
    attributes = {"service.namespace": "jetscribe", "service.instance.id": instance, "service.version": VERSION}
    if not os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins over our default name
        attributes["service.name"] = f"jetscribe-{service}"
    return Resource.create(attributes)


class Telemetry:
    """One service's metrics, traces, readiness and HTTP endpoint. `span_exporter` and `metric_reader` add an
    exporter and a reader beside the configured ones (tests read spans and metrics in memory with them)."""

    def __init__(
        self,
        service: str,
        *,
        config: TelemetryConfig | None = None,
        instance: str = "",
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
    ):
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from prometheus_client import CollectorRegistry

        self.service = service
        self.config = config or TelemetryConfig.from_env()
        self.readiness = Readiness(service)
        resource = _resource(service, instance or f"{socket.gethostname()}-{os.getpid()}")
        metric_exporters, trace_exporters = exporters("metrics", self.config), exporters("traces", self.config)
        readers: list[MetricReader] = [metric_reader] if metric_reader is not None else []
        self._registry: CollectorRegistry | None = None
        if "prometheus" in metric_exporters:
            self._registry = CollectorRegistry(auto_describe=False)
            readers.append(PrometheusMetricReader(registry=self._registry, scope_info_enabled=False))
        if "otlp" in metric_exporters:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        if "console" in metric_exporters:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
        processors: list[SpanProcessor] = [SimpleSpanProcessor(span_exporter)] if span_exporter is not None else []
        if "otlp" in trace_exporters:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        if "console" in trace_exporters:
            processors.append(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        # The sampler is OTEL_TRACES_SAMPLER's. Unset, with nothing to export spans to, none is recorded: trace ids
        # are still made and travel (the logs carry them), at a fraction of the cost.
        sampler = None if processors or os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
        self.tracer_provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        self.meter: Meter = self.meter_provider.get_meter(f"jetscribe.{service}", VERSION)
        self.tracer: Tracer = self.tracer_provider.get_tracer(f"jetscribe.{service}", VERSION)
        self._endpoint: HttpEndpoint | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics`, `/healthz` and `/readyz` are served on, once serving (for `$SRV.INFO`)."""
        return self._endpoint.port if self._endpoint is not None else None

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of every metric now."""
        from prometheus_client import generate_latest

        return generate_latest(self._registry) if self._registry is not None else b""

    async def start_http(self) -> None:
        if self._endpoint is not None:
            return
        render = self.render_metrics if self._registry is not None else None
        endpoint = HttpEndpoint(self.readiness, render, self.config.metrics_host, self.config.metrics_port)
        try:
            await endpoint.start()
        except OSError as exc:
            raise EndpointUnavailable(
                f"could not serve metrics on {self.config.metrics_host}:{self.config.metrics_port} "
                f"(JETSCRIBE_METRICS_HOST / JETSCRIBE_METRICS_PORT): {exc.strerror or exc}"
            ) from None
        self._endpoint = endpoint
        log.debug("%s: serving %s", self.service, self.endpoint_url)

    @property
    def endpoint_url(self) -> str:
        """Where `/metrics`, `/healthz` and `/readyz` are, for the service's ready line in its log."""
        port = self.metrics_port
        return f"http://{self.config.metrics_host}:{port}/metrics" if port is not None else "(not serving)"

    async def stop_http(self) -> None:
        if self._endpoint is not None:
            await self._endpoint.stop()
            self._endpoint = None

    def install_global(self) -> None:
        """Make these the process's OpenTelemetry providers (one service per process)."""
        trace.set_tracer_provider(self.tracer_provider)
        from opentelemetry import metrics as otel_metrics

        otel_metrics.set_meter_provider(self.meter_provider)

    def shutdown(self) -> None:
        """Flush what the exporters still hold; the providers record nothing after this."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@contextlib.asynccontextmanager
async def serving(
    service: str, given: Telemetry | None, *, needs: tuple[str, ...] = (), instance: str = ""
) -> AsyncIterator[Telemetry]:
    """The service's telemetry (`given`, else one from the environment) with its readiness checks `needs`
    declared, its HTTP endpoint served meanwhile; one made here is shut down after."""
    tel = given or Telemetry(service, instance=instance)
    tel.readiness.need(*needs)  # before the endpoint answers, so /readyz never says ready too early
    await tel.start_http()
    try:
        yield tel
    finally:
        await tel.stop_http()
        if given is None:
            tel.shutdown()


# --- trace context across NATS -----------------------------------------------------------------------------
def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (`traceparent`, `tracestate`) to NATS headers; returns them."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's NATS headers carry (an empty context if none)."""
    return propagate.extract(headers or {})


def span_context_of(headers: Mapping[str, str] | None) -> SpanContext | None:
    """The remote span a message's headers name, or None."""
    if not headers:
        return None
    context = trace.get_current_span(extract(headers)).get_span_context()
    return context if context.is_valid else None


# --- logs --------------------------------------------------------------------------------------------------
_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_tenant", default=None)
_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_session", default=None)


@contextlib.contextmanager
def log_context(tenant: str | None, session_id: str | None) -> Iterator[None]:
    """Log lines written inside name this tenant and session."""
    tokens = (_tenant.set(tenant), _session.set(session_id))
    try:
        yield
    finally:
        _tenant.reset(tokens[0])
        _session.reset(tokens[1])


class LogContext(logging.Filter):
    """Puts the service, tenant, session and trace id on every record (empty where unknown)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.tenant = _tenant.get() or ""
        record.session = _session.get() or ""
        context = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(context.trace_id) if context.is_valid else ""
        return True


def _field(record: logging.LogRecord, name: str) -> str:
    """A field `LogContext` put on the record ("" if the record did not pass through it)."""
    return str(getattr(record, name, "") or "")


class TextFormat(logging.Formatter):
    """`time service LEVEL message [tenant=.. session=.. trace=..]`, the bracket only with what is known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(service)s %(levelname)s %(message)s", defaults={"service": ""})

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        known = [
            f"{key}={value}"
            for key, value in (
                ("tenant", _field(record, "tenant")),
                ("session", _field(record, "session")),
                ("trace", _field(record, "trace_id")),
            )
            if value
        ]
        if not known:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(known)}]{newline}{rest}"


class JsonFormat(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, tenant, session, trace_id (and the
    traceback as `exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": _field(record, "service"),
            "logger": record.name,
            "message": record.getMessage(),
            "tenant": _field(record, "tenant") or None,
            "session": _field(record, "session") or None,
            "trace_id": _field(record, "trace_id") or None,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# Libraries whose INFO lines are per call or per step (faster-whisper: one per decode; alembic: one per migration
# step; nats: connection chatter): WARNING and above unless the service logs at DEBUG.
CHATTY_LIBRARIES = ("faster_whisper", "alembic", "nats", "ctranslate2")


def quiet_libraries(level: int | str) -> None:
    """Hold `CHATTY_LIBRARIES` to WARNING unless `level` (the process's) is DEBUG or finer, then let them through."""
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    verbose = isinstance(numeric, int) and numeric <= logging.DEBUG
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def setup_logging(service: str, config: TelemetryConfig) -> None:
    """Configure the process's logging: one line per event, text or JSON (JETSCRIBE_LOG_FORMAT); chatty libraries
    at WARNING unless JETSCRIBE_LOG_LEVEL=DEBUG."""
    handler = logging.StreamHandler()
    handler.addFilter(LogContext(service))
    handler.setFormatter(JsonFormat() if config.log_format == "json" else TextFormat())
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
    quiet_libraries(config.log_level)


def exit_process(code: int) -> NoReturn:
    """End a service process that has stopped (its `serve` returned): flush the logs and stdio, then exit without
    the interpreter's teardown of every module, which takes a second or more on a busy host and so delays every
    orderly stop (`jetscribe up` waits for its services before it stops the servers). Its telemetry is already
    shut down and flushed by then."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def serve(service: str, run: Callable[[asyncio.Event, Telemetry], Awaitable[None]]) -> int:
    """Run a service's `run(stop, telemetry)` until SIGTERM or SIGINT sets `stop`; the process then exits 0.
    A setting that cannot work (a ConfigError, a bad JETSCRIBE_LOG_FORMAT or OTEL_*_EXPORTER, a metrics port in
    use) is one line on stderr, exit 2.

    `stop` is also the task's `service_stop`, so a service still connecting to NATS stops too.
    """
    try:
        config = TelemetryConfig.from_env()
    except ValueError as exc:
        print(f"jetscribe-{service}: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_logging(service, config)

    async def main() -> int:
        stop = asyncio.Event()
        service_stop.set(stop)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            tel = Telemetry(service, config=config)
        except ValueError as exc:
            print(f"jetscribe-{service}: {exc}", file=sys.stderr, flush=True)
            return 2
        tel.install_global()
        try:
            await run(stop, tel)
        except Stopped as exc:
            logging.getLogger(__name__).info("stopped before %s", exc)
        except (ConfigError, EndpointUnavailable) as exc:  # a setting that cannot work here: what to set, one line
            print(f"jetscribe-{service}: {exc}", file=sys.stderr, flush=True)
            return 2
        finally:
            await tel.stop_http()
            tel.shutdown()
        return 0

    return asyncio.run(main())
