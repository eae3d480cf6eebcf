"""deploy/prometheus/alerts.yml: well-formed rules over metric names (and labels) the code really exports.

A renamed metric or label in services/common/metrics.py makes an alert silently never fire; these
tests turn that into a failure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from services.common import metrics

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"

METRIC_NAME = re.compile(r"\bwatistream_[A-Za-z0-9_]*[A-Za-z0-9]")
# `name{label="x", other=~"y"}`: the selector's label names
SELECTOR = re.compile(r"\b(watistream_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")
DURATION = re.compile(r"^(?:\d+(?:ms|[smhdwy]))+$")
# labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}

# Sample names each metric type exports (prometheus_client text format); a family without children
# yet (labelled, never incremented) has no samples, so the names are derived from the type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def exported_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every sample name the registry can export -> its family name."""
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
        for sample in family.samples:
            names[sample.name] = family.name
    return names


def label_names() -> dict[str, set[str]]:
    """Family name -> label names, from the metric objects of services.common.metrics."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client keeps these on private attributes; there is no public accessor
            out[value._name] = set(value._labelnames)
            if isinstance(value, Histogram):  # a histogram's buckets carry their bound as `le`
                out[value._name].add("le")
    return out


def load_rules(text: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(text)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def missing_metrics(rules: list[dict[str, Any]], exported: dict[str, str]) -> list[str]:
    """`alert: name` for every metric name used in an expression that the registry does not export."""
    return [
        f"{rule['alert']}: {name}"
        for rule in rules
        for name in sorted(set(METRIC_NAME.findall(rule["expr"])))
        if name not in exported
    ]


def label_problems(rules: list[dict[str, Any]], exported: dict[str, str]) -> list[str]:
    """Label names in selectors, by()/without() and annotation templates that the metrics lack."""
    labels = label_names()
    problems: list[str] = []
    for rule in rules:
        expr: str = rule["expr"]
        used = {exported[n] for n in METRIC_NAME.findall(expr) if n in exported}
        available = set().union(*(labels.get(f, set()) for f in used)) | TARGET_LABELS
        for name, matchers in SELECTOR.findall(expr):
            family = exported.get(name)
            for label in MATCHER_LABEL.findall(matchers):
                if family is not None and label not in labels.get(family, set()):
                    problems.append(f"{rule['alert']}: {name} has no label {label!r}")
        if used:
            for grouping in GROUPING.findall(expr):
                for label in (x.strip() for x in grouping.split(",") if x.strip()):
                    if label not in available:
                        problems.append(f"{rule['alert']}: grouping by unknown label {label!r}")
        for text in rule.get("annotations", {}).values():
            for label in TEMPLATE_LABEL.findall(str(text)):
                if label not in available:
                    problems.append(f"{rule['alert']}: annotation uses unknown label {label!r}")
    return problems


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return load_rules(ALERTS.read_text(encoding="utf-8"))


def test_file_is_a_prometheus_rule_file(rules: list[dict[str, Any]]) -> None:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(doc) == {"groups"}
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["name"] and group["rules"]
    assert len({g["name"] for g in doc["groups"]}) == len(doc["groups"])
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert re.fullmatch(r"Watistream[A-Z][A-Za-z0-9]+", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert DURATION.match(str(rule["for"])), f"{rule['alert']}: bad for {rule['for']!r}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip()
        expr = rule["expr"]
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), f"{rule['alert']}: unbalanced {opening}"


def test_the_alerts_the_issue_asks_for_are_there(rules: list[dict[str, Any]]) -> None:
    by_metric = {name: [r for r in rules if name in r["expr"]] for name in (
        "watistream_history_fetch_failures_total", "watistream_webhooks_missing_total",
        "watistream_dead_letters_total", "watistream_consumer_lag", "watistream_agent_up",
        "watistream_http_requests_total",
    )}
    assert all(by_metric.values()), {k: len(v) for k, v in by_metric.items()}
    (ratio,) = by_metric["watistream_history_fetch_failures_total"]
    assert "watistream_history_fetch_total" in ratio["expr"] and "/" in ratio["expr"]
    (stopped,) = by_metric["watistream_agent_up"]
    assert "== 0" in stopped["expr"] and stopped["labels"]["severity"] == "critical"
    (dead,) = by_metric["watistream_dead_letters_total"]
    assert "by (service, reason)" in dead["expr"]


def test_every_metric_name_is_exported_by_the_code(rules: list[dict[str, Any]]) -> None:
    exported = exported_names(metrics.REGISTRY)
    used = {n for r in rules for n in METRIC_NAME.findall(r["expr"])}
    assert len(used) >= 8, used
    assert missing_metrics(rules, exported) == []


def test_every_label_is_a_label_of_its_metric(rules: list[dict[str, Any]]) -> None:
    assert label_problems(rules, exported_names(metrics.REGISTRY)) == []


def test_suffixes_derived_for_empty_families_match_real_samples() -> None:
    """The type-based derivation agrees with what prometheus_client really exports once a child exists."""
    registry = CollectorRegistry()
    Counter("demo_events_total", "x", ["kind"], registry=registry).labels("a").inc()
    Gauge("demo_level", "x", registry=registry).set(1)
    Histogram("demo_seconds", "x", registry=registry).observe(0.1)
    for family in registry.collect():
        expected = {family.name + s for s in SUFFIXES[family.type]}
        assert family.samples and {s.name for s in family.samples} <= expected, family.name
    assert {"demo_events_total", "demo_level", "demo_seconds_bucket", "demo_seconds_count"} <= set(
        exported_names(registry)
    )


def test_a_renamed_metric_is_caught(rules: list[dict[str, Any]]) -> None:
    """The check can fail: rename in the alerts, or in the code (a registry without the old name)."""
    exported = exported_names(metrics.REGISTRY)
    renamed = load_rules(ALERTS.read_text(encoding="utf-8").replace(
        "watistream_consumer_lag", "watistream_consumer_lag_messages"))
    assert missing_metrics(renamed, exported) == [
        "WatistreamConsumerLag: watistream_consumer_lag_messages"
    ]
    registry = CollectorRegistry()
    for family in metrics.REGISTRY.collect():
        if family.name != "watistream_webhooks_missing":
            registry.register(_Fixed(family))
    Counter("watistream_webhooks_lost", "renamed", registry=registry)
    assert missing_metrics(rules, exported_names(registry)) == [
        "WatistreamWebhooksMissing: watistream_webhooks_missing_total"
    ]


def test_a_wrong_label_is_caught(rules: list[dict[str, Any]]) -> None:
    exported = exported_names(metrics.REGISTRY)
    broken = load_rules(ALERTS.read_text(encoding="utf-8").replace("by (service, reason)", "by (svc, reason)")
                        .replace('status="503"', 'code="503"'))
    problems = label_problems(broken, exported)
    assert "WatistreamDeadLetters: grouping by unknown label 'svc'" in problems
    assert "WatistreamIngestBrokerUnavailable: watistream_http_requests_total has no label 'code'" in problems


BUCKET_BOUND = re.compile(r'\b(watistream_[A-Za-z0-9_]+)_bucket\s*\{[^}]*\ble\s*=\s*"([^"]*)"')


def bucket_problems(rules: list[dict[str, Any]]) -> list[str]:
    """`le` values in the alerts that are no bucket bound of their histogram, as the code exports it
    (prometheus_client writes the bound 1 as "1.0": a rule with `le="1"` would match nothing)."""
    bounds = {
        value._name: {floatToGoString(b) for b in value._upper_bounds}
        for value in vars(metrics).values()
        if isinstance(value, Histogram)
    }
    return [
        f"{rule['alert']}: {name} has no bucket le={le!r}"
        for rule in rules
        for name, le in BUCKET_BOUND.findall(rule["expr"])
        if le not in bounds.get(name, set())
    ]


def test_every_bucket_bound_named_is_one_the_histogram_has(rules: list[dict[str, Any]]) -> None:
    assert any(BUCKET_BOUND.search(rule["expr"]) for rule in rules)  # the check has something to check
    assert bucket_problems(rules) == []
    wrong = load_rules(ALERTS.read_text(encoding="utf-8").replace('le="1.0"', 'le="1"'))
    assert bucket_problems(wrong) == [
        "WatistreamEventLoopBlocked: watistream_event_loop_lag_seconds has no bucket le='1'"
    ]


class _Fixed:
    """A collector that re-exports one already collected family (to build a doctored registry)."""

    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> list[Any]:
        return [self.family]

    def describe(self) -> list[Any]:
        return [self.family]
