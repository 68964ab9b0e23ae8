"""shared/telemetry.py: which exporters the OTEL_* variables choose, log lines, trace context in headers."""

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jetscribe.shared import telemetry
from jetscribe.shared.config import TelemetryConfig


@pytest.mark.parametrize(
    ("environ", "console", "metrics", "traces"),
    [
        ({}, "", {"prometheus"}, set()),
        ({}, "1", {"prometheus", "console"}, {"console"}),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "", {"prometheus", "otlp"}, {"otlp"}),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "", {"prometheus"}, {"otlp"}),
        ({"OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "console"}, "", set(), {"console"}),
        (
            {"OTEL_METRICS_EXPORTER": "otlp,prometheus", "OTEL_TRACES_EXPORTER": "none"},
            "1",
            {"otlp", "prometheus"},
            set(),
        ),
    ],
)
def test_exporters_follow_the_standard_variables(environ, console, metrics, traces):
    config = TelemetryConfig(console=console)
    assert telemetry.exporters("metrics", config, environ) == metrics
    assert telemetry.exporters("traces", config, environ) == traces


def test_an_unknown_exporter_is_one_clear_error():
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER names \\['jaeger'\\]"):
        telemetry.exporters("traces", TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "jaeger"})


def test_bad_log_format_and_port_are_refused():
    with pytest.raises(ValueError, match="JETSCRIBE_LOG_FORMAT"):
        TelemetryConfig(log_format="xml")
    with pytest.raises(ValueError, match="JETSCRIBE_METRICS_PORT"):
        TelemetryConfig(metrics_port=70000)


def test_otel_service_name_wins_over_the_default(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "asr-gateway")
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig(), instance="i1")
    try:
        assert tel.tracer_provider.resource.attributes["service.name"] == "asr-gateway"
    finally:
        tel.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig(), instance="i1")
    try:
        assert tel.tracer_provider.resource.attributes["service.name"] == "jetscribe-ingest"
        assert tel.tracer_provider.resource.attributes["service.instance.id"] == "i1"
    finally:
        tel.shutdown()


def test_the_sampler_follows_otel_traces_sampler(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig(), span_exporter=exporter)
    try:
        with tel.tracer.start_as_current_span("x"):
            pass
        assert exporter.get_finished_spans() == ()
    finally:
        tel.shutdown()


def _tracer():
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("t"), exporter


def test_trace_context_round_trips_through_headers():
    tracer, _ = _tracer()
    assert telemetry.span_context_of(None) is None
    assert telemetry.span_context_of({"Nats-Msg-Id": "a:b:1"}) is None
    with tracer.start_as_current_span("sender") as span:
        headers = telemetry.inject({"Nats-Msg-Id": "a:b:1"})
    assert headers["Nats-Msg-Id"] == "a:b:1" and headers["traceparent"].startswith("00-")
    received = telemetry.span_context_of(headers)
    assert received.trace_id == span.get_span_context().trace_id
    assert received.span_id == span.get_span_context().span_id
    assert received.is_remote


def _logger(fmt):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(telemetry.LogContext("ingest"))
    handler.setFormatter(fmt)
    logger = logging.getLogger(f"test-telemetry-{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_log_lines_carry_tenant_session_and_trace_id():
    logger, stream = _logger(telemetry.JsonFormat())
    tracer, _ = _tracer()
    logger.info("outside")
    with telemetry.log_context("acme", "s1"), tracer.start_as_current_span("request") as span:
        logger.warning("refused %s", "seq=3")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    outside, inside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["tenant"] is None and outside["session"] is None and outside["trace_id"] is None
    assert inside["message"] == "refused seq=3"
    assert inside["level"] == "WARNING" and inside["service"] == "ingest" and inside["logger"].startswith("test-")
    assert (inside["tenant"], inside["session"]) == ("acme", "s1")
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["time"].endswith("Z")
    assert "RuntimeError: boom" in failed["exception"]


def test_text_log_lines_name_what_is_known_after_the_message():
    logger, stream = _logger(telemetry.TextFormat())
    logger.info("plain")
    with telemetry.log_context("acme", "s1"):
        logger.info("in a session")
    plain, session = stream.getvalue().splitlines()
    assert plain.endswith(" ingest INFO plain")
    assert session.endswith(" ingest INFO in a session [tenant=acme session=s1]")


def test_without_an_exporter_spans_are_not_recorded_but_their_ids_travel(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig())
    try:
        with tel.tracer.start_as_current_span("ingest.audio") as span:
            headers = telemetry.inject({})
        assert not span.is_recording()
        assert telemetry.span_context_of(headers).trace_id == span.get_span_context().trace_id
    finally:
        tel.shutdown()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig())
    try:
        with tel.tracer.start_as_current_span("ingest.audio") as span:
            assert span.is_recording()
    finally:
        tel.shutdown()


def test_a_bad_number_names_its_variable(monkeypatch):
    monkeypatch.setenv("JETSCRIBE_METRICS_PORT", "ninety")
    with pytest.raises(ValueError, match="^JETSCRIBE_METRICS_PORT is 'ninety': not a valid int$"):
        TelemetryConfig.from_env()


@pytest.mark.parametrize(("level", "chatty_info"), [("INFO", False), ("WARNING", False), ("DEBUG", True)])
def test_library_chatter_is_held_to_warning_unless_debug(level, chatty_info):
    """faster-whisper logs one INFO line per decode, alembic one per migration step: off unless DEBUG."""
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        telemetry.setup_logging("transcriber", TelemetryConfig(log_level=level))
        for name in telemetry.CHATTY_LIBRARIES:
            library = logging.getLogger(f"{name}.inner")
            assert library.isEnabledFor(logging.INFO) is chatty_info, name
            assert library.isEnabledFor(logging.WARNING) is True, name
        assert logging.getLogger("jetscribe.services.transcriber.app").isEnabledFor(logging.INFO) is (
            level != "WARNING"
        )
    finally:
        telemetry.quiet_libraries("WARNING")
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
