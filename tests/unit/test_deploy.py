"""deploy/: the Grafana dashboard queries only metrics and labels the services export (shared/metrics.py, as the
Prometheus exporter names them), and compose.yaml, Prometheus and Grafana agree on files, ports and names."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy/grafana/jetscribe.json"
PROMETHEUS = ROOT / "deploy/prometheus.yml"
COMPOSE = ROOT / "compose.yaml"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_ALWAYS = {"job", "instance"}  # added by Prometheus to every series it scrapes


def exported() -> dict[str, set[str]]:
    """Every sample name the services' metrics produce on /metrics, with its label names: each instrument of
    shared/metrics.py created as the services create it, recorded once with all its attributes, then scraped."""
    metrics = pytest.importorskip("jetscribe.shared.metrics", reason="shared/metrics.py (issue 12, part 1) not here")
    prometheus = pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    reader = prometheus.PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    meter = MeterProvider(metric_readers=[reader]).get_meter("deploy-test")
    for spec in metrics.ALL:
        attributes = {key: "x" for key in spec.attributes}
        if spec.kind == "counter":
            metrics.counter(meter, spec).add(1, attributes)
        elif spec.kind == "updown":
            metrics.updown(meter, spec).add(1, attributes)
        elif spec.kind == "histogram":
            metrics.histogram(meter, spec).record(1, attributes)
        else:
            metrics.GaugeFeed(meter, spec).feed(lambda attributes=attributes: [(1, attributes)])
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else query)
    return found


def parse(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric: label names in its selector}, label names in by/without clauses and label_values) of one query."""
    if found := re.fullmatch(rf"label_values\(\s*({_NAME})\s*,\s*({_NAME})\s*\)", expr.strip()):
        return {found.group(1): set()}, {found.group(2)}
    selectors: dict[str, set[str]] = {}
    for name, matchers in re.findall(rf"({_NAME})\s*\{{([^}}]*)\}}", expr):
        selectors.setdefault(name, set()).update(re.findall(rf"({_NAME})\s*(?:=~|!~|!=|=)", matchers))
    grouped = {
        label for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for label in re.findall(_NAME, group)
    }
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)', " ", expr)
    for name in re.findall(rf"(?<![\w$:])({_NAME})(?![\w:])(?!\s*\()", bare):
        if name not in _KEYWORDS:
            selectors.setdefault(name, set())
    return selectors, grouped


def test_the_query_parser_finds_metrics_and_labels():
    selectors, grouped = parse(
        'histogram_quantile(0.95, sum by (le, w) (rate(a_bucket{t=~"$tenant", s="x"}[1m]))) / on() b_total'
    )
    assert selectors == {"a_bucket": {"t", "s"}, "b_total": set()}
    assert grouped == {"le", "w"}
    assert parse("label_values(a_total, t)") == ({"a_total": set()}, {"t"})


def test_every_dashboard_query_uses_exported_metrics_and_their_labels():
    names = exported()
    used = set()
    for expr in queries():
        selectors, grouped = parse(expr)
        assert selectors, f"no metric in {expr!r}"
        for metric, labels in selectors.items():
            assert metric in names, f"{metric} (in {expr!r}) is not exported; exported: {sorted(names)}"
            assert labels <= names[metric] | _ALWAYS, f"{metric} has no label {labels - names[metric]} ({expr!r})"
        available = set().union(*(names[m] for m in selectors)) | _ALWAYS
        assert grouped <= available, f"{expr!r} groups by {grouped - available}, which its metrics lack"
        used |= {m.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for m in selectors}
    # the list: sessions active, final latency, decode seconds by kind, consumer lag per partition,
    # chunks accepted, refusals by code, rows written, write latency
    for wanted in (
        "jetscribe_transcriber_session_active",
        "jetscribe_transcriber_final_latency_seconds",
        "jetscribe_transcriber_decode_duration_seconds",
        "jetscribe_jetstream_consumer_pending",
        "jetscribe_ingest_chunks_total",
        "jetscribe_ingest_refusals_total",
        "jetscribe_persister_rows_total",
        "db_client_operation_duration_seconds",
    ):
        assert wanted in used, f"the dashboard shows no {wanted}"


def test_dashboard_panels_have_unique_ids_and_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_compose_mounts_the_deploy_files_and_prometheus_scrapes_the_services_port():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    mounts = [v.split(":")[0] for name in ("prometheus", "grafana") for v in services[name]["volumes"]]
    local = [m for m in mounts if m.startswith("./")]
    assert "./deploy/prometheus.yml" in local and "./deploy/grafana/jetscribe.json" in local
    for path in local:
        assert (ROOT / path).exists(), path
    port = int(services["ingest"]["environment"]["JETSCRIBE_METRICS_PORT"])
    for name in ("ingest", "transcriber", "persister"):
        assert services[name]["environment"]["JETSCRIBE_METRICS_HOST"] == "0.0.0.0"
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    for name in ("ingest", "transcriber", "persister"):
        [target] = jobs[f"jetscribe-{name}"]["dns_sd_configs"]
        assert target["names"] == [name] and target["port"] == port
