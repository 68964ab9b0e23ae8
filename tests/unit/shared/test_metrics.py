"""The metrics registry (shared/metrics.py): conventions, bounded attributes, and the README's table."""

import re
from pathlib import Path

import pytest
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from jetscribe.shared import metrics
from jetscribe.shared.metrics import ALL, GaugeFeed, IngestMetrics, PersisterMetrics, TranscriberMetrics, WebMetrics

README = Path(__file__).parents[3] / "README.md"


class RecordingMeter(NoOpMeter):
    """A meter that notes what each service's metrics class creates."""

    def __init__(self):
        super().__init__("test")
        self.created = []

    def create_counter(self, name, unit="", description=""):
        self.created.append((name, "counter", unit))
        return super().create_counter(name, unit, description)

    def create_up_down_counter(self, name, unit="", description=""):
        self.created.append((name, "updown", unit))
        return super().create_up_down_counter(name, unit, description)

    def create_histogram(self, name, unit="", description="", *, explicit_bucket_boundaries_advisory=None):
        assert explicit_bucket_boundaries_advisory, f"{name}: a histogram needs buckets in its unit"
        self.created.append((name, "histogram", unit))
        return super().create_histogram(name, unit, description)

    def create_observable_gauge(self, name, callbacks=None, unit="", description=""):
        self.created.append((name, "gauge", unit))
        return super().create_observable_gauge(name, callbacks, unit, description)


def test_every_instrument_comes_from_a_spec_and_every_spec_is_used():
    meter = RecordingMeter()
    for kind in (IngestMetrics, TranscriberMetrics, PersisterMetrics, WebMetrics):
        kind(meter)
    assert set(meter.created) == {(spec.name, spec.kind, spec.unit) for spec in ALL}


def test_no_attribute_names_a_session():
    for spec in ALL:
        for key in spec.attributes:
            assert "session" not in key.lower(), f"{spec.name} has attribute {key}: one series per session"


@pytest.mark.parametrize("spec", ALL, ids=lambda spec: spec.name)
def test_names_units_and_descriptions(spec):
    assert re.fullmatch(r"(jetscribe|messaging|db)(\.[a-z_]+)+", spec.name), spec.name
    assert spec.unit and spec.description
    if spec.kind == "histogram":
        assert spec.buckets and list(spec.buckets) == sorted(spec.buckets)
    assert len(set(spec.attributes)) == len(spec.attributes)


def test_names_are_unique():
    names = [spec.name for spec in ALL]
    assert len(names) == len(set(names))


def test_readme_table_lists_every_metric_with_its_unit_and_attributes():
    text = README.read_text()
    section = text[text.index("## Operating it") :]
    section = section[: section.find("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`") and "." in cells[0]:
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {spec.name for spec in ALL}
    for spec in ALL:
        _, unit, attributes = rows[spec.name][:3]
        assert unit.strip("`") == spec.unit, spec.name
        for key in spec.attributes:
            assert key in attributes, f"README: {spec.name} does not name its attribute {key}"


def test_a_gauge_reads_what_it_is_fed_and_survives_a_failing_read():
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    gauge = GaugeFeed(meter, metrics.BUFFERED)
    gauge.feed(lambda: [(2.5, {metrics.TENANT: "acme", metrics.WORKER: "w1"})])
    points = _points(reader, metrics.BUFFERED.name)
    assert [(p.value, dict(p.attributes)) for p in points] == [(2.5, {metrics.TENANT: "acme", metrics.WORKER: "w1"})]

    def broken():
        raise RuntimeError("no")

    gauge.feed(broken)
    assert _points(reader, metrics.BUFFERED.name) == []


def _points(reader, name):
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_every_metric_is_exported_to_prometheus_under_the_readme_name():
    from opentelemetry.metrics import Histogram

    from jetscribe.shared.config import TelemetryConfig
    from jetscribe.shared.telemetry import Telemetry

    tel = Telemetry("test", config=TelemetryConfig())
    specs = {spec.name: spec for spec in ALL}
    try:
        for kind in (IngestMetrics, TranscriberMetrics, PersisterMetrics, WebMetrics):
            for name, instrument in vars(kind(tel.meter)).items():
                if isinstance(instrument, metrics.ConsumerLag):
                    attributes = {metrics.STREAM: "AUDIO", metrics.CONSUMER: "transcriber-p3", metrics.PARTITION: "3"}
                    instrument._latest = {("AUDIO", "transcriber-p3"): (4, 2, attributes)}
                elif isinstance(instrument, GaugeFeed):
                    spec = metrics.BUFFERED if name == "buffered" else metrics.PARTITIONS_OWNED
                    instrument.feed(lambda spec=spec: [(1.0, {key: "x" for key in spec.attributes})])
                elif isinstance(instrument, Histogram):
                    instrument.record(1, {key: "x" for key in specs[instrument.name].attributes})
                else:
                    instrument.add(1, {key: "x" for key in specs[instrument.name].attributes})
        exposed = {line.split()[2] for line in tel.render_metrics().decode().splitlines() if line.startswith("# TYPE")}
    finally:
        tel.shutdown()
    text = README.read_text()
    listed = re.findall(r"^\| `([a-z_.]+)` \| `[^`]+` \| [^|]+ \| `([a-z_]+)` \|", text, re.MULTILINE)
    assert {name for name, _ in listed} == set(specs)
    for name, prometheus in listed:
        family = prometheus.removesuffix("_total")
        assert prometheus in exposed or family in exposed, f"{name}: README says {prometheus}, exposed {exposed}"


def test_otel_sdk_disabled_records_nothing(monkeypatch):
    from jetscribe.shared.config import TelemetryConfig
    from jetscribe.shared.telemetry import Telemetry

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tel = Telemetry("test", config=TelemetryConfig())
    try:
        IngestMetrics(tel.meter).chunks.add(1, {metrics.TENANT: "acme"})
        assert b"jetscribe" not in tel.render_metrics()
        assert not tel.tracer.start_span("x").get_span_context().is_valid
    finally:
        tel.shutdown()
