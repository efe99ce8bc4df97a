"""The Grafana dashboard and the Prometheus rules query only what the worker exports.

Exported names come from a live ``streams.metrics.Metrics()`` registry: a renamed metric
or label in the code, or a typo in a panel, fails here instead of showing "No data".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_FILE = REPO / "deploy" / "grafana" / "refundguard.json"
ALERTS_FILE = REPO / "deploy" / "prometheus" / "alerts.yml"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})
# Grafana variables and the scrape health series are not worker metrics.
PROMETHEUS_BUILTIN = frozenset({"up"})

SERVICE_METRIC = re.compile(r"\b(?:refundguard|process|python)_[a-z0-9_]+\b")
RECORDED = re.compile(r"\brefundguard:[a-z0-9_:]+")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
RATE_ARGUMENT = re.compile(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")
COUNTER_LIKE_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query of the dashboard."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard_panels(load_dashboard())
        for target in panel.get("targets", [])
    ]


def alert_queries() -> list[tuple[str, str]]:
    """(rule name, PromQL) of every rule expression and every query in an annotation template."""
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            found.append((name, rule["expr"]))
            for text in rule.get("annotations", {}).values():
                found.extend((name, query) for query in re.findall(r'query\s+"([^"]+)"', text))
    return found


def referenced_labels(expr: str) -> set[str]:
    labels = set()
    for _name, matchers in SELECTOR.findall(expr):
        labels.update(MATCHER_LABEL.findall(matchers))
    for grouping in GROUPING.findall(expr):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    return labels


def check_expr(
    expr: str,
    exported: Any,
    default_collector_samples: dict[str, frozenset[str]],
    recorded: frozenset[str],
    legend: str = "",
) -> list[str]:
    """Problems of one PromQL expression; empty when it only uses exported names and labels."""
    problems = []
    available: dict[str, frozenset[str]] = {**default_collector_samples, **exported.samples}
    allowed_labels = set(TARGET_LABELS)
    free_labels = False
    for name in SERVICE_METRIC.findall(expr):
        if name not in available:
            problems.append(f"{name} is not exported")
            continue
        allowed_labels |= available[name]
        free_labels |= name in exported.free_label_samples
    for name in RECORDED.findall(expr):
        if name not in recorded:
            problems.append(f"{name} is not a recording rule of alerts.yml")
    for name in RATE_ARGUMENT.findall(expr):
        if not name.endswith(COUNTER_LIKE_SUFFIXES):
            problems.append(f"rate()/increase() over {name}, which is not a counter")
    if not free_labels:
        used = referenced_labels(expr) | set(LEGEND_LABEL.findall(legend))
        unknown = used - allowed_labels
        if unknown:
            problems.append(f"labels {sorted(unknown)} exist on none of its metrics")
    return problems


# ---- the check itself must catch mistakes ---------------------------------------------------


def test_check_rejects_unknown_names_labels_and_rates(exported, default_collector_samples, recorded_names):
    def problems(expr: str, legend: str = "") -> list[str]:
        return check_expr(expr, exported, default_collector_samples, recorded_names, legend)

    assert problems('sum by (decision) (rate(refundguard_decisions_total{decision="hold"}[5m]))') == []
    assert problems("rate(refundguard_decision_total[5m])")  # missing "s"
    assert problems("rate(refundguard_requests_consumed[5m])")  # counter without _total
    assert problems('sum by (cause) (rate(refundguard_scorer_errors_total{kind="timeout"}[5m]))')
    assert problems('rate(refundguard_dead_letters_total{reason="x"}[5m])')
    assert problems("rate(refundguard_consumer_lag_messages[5m])")  # gauge
    assert problems("refundguard:no_such:rule")
    assert problems("rate(refundguard_dead_letters_total[5m])", legend="{{scorer}}")


# ---- dashboard -----------------------------------------------------------------------------


@pytest.mark.parametrize(("title", "expr", "legend"), dashboard_queries(), ids=lambda v: str(v)[:60])
def test_dashboard_query_uses_only_exported_metrics(
    title, expr, legend, exported, default_collector_samples, recorded_names
):
    assert check_expr(expr, exported, default_collector_samples, recorded_names, legend) == [], title


def test_dashboard_shows_every_exported_metric_family(exported):
    used = {name for _title, expr, _legend in dashboard_queries() for name in SERVICE_METRIC.findall(expr)}
    # The service's own families each need a panel; process_* / python_* are there for ad-hoc queries.
    ours = [family for family in exported.families if family.startswith("refundguard_")]
    missing = [family for family in ours if not any(name.startswith(family) for name in used)]
    assert missing == [], f"metric families without a panel: {missing}"


def test_dashboard_is_importable_and_provisionable():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    datasource_var = variables["DS_PROMETHEUS"]
    assert datasource_var["type"] == "datasource"
    assert datasource_var["query"] == "prometheus"

    panels = list(dashboard_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [panel["title"] for panel in panels if panel["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_panels_do_not_overlap():
    occupied: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels(load_dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps {occupied[(x, y)]}"
                occupied[(x, y)] = panel["title"]


def test_histogram_quantiles_aggregate_buckets_by_le():
    quantile_exprs = [expr for _t, expr, _l in dashboard_queries() if "histogram_quantile" in expr]
    assert quantile_exprs
    for expr in quantile_exprs:
        for part in expr.split("histogram_quantile(")[1:]:
            grouping = GROUPING.search(part)
            assert grouping and "le" in [label.strip() for label in grouping.group(1).split(",")], expr
            assert re.search(r"_bucket\b", part), expr


@pytest.mark.parametrize(
    ("metric", "quantile"),
    [
        (metric, quantile)
        for metric in ("refundguard_end_to_end_latency_seconds_bucket", "refundguard_scoring_latency_seconds_bucket")
        for quantile in ("0.5", "0.95", "0.99")
    ],
)
def test_latency_percentiles_are_on_the_dashboard(metric, quantile):
    pattern = re.compile(rf"histogram_quantile\({re.escape(quantile)},\s*sum by \([^)]*\)\s*\(rate\({metric}\b")
    assert any(pattern.search(expr) for _t, expr, _l in dashboard_queries())


@pytest.mark.parametrize(
    ("metric", "label"),
    [
        ("refundguard_decisions_total", "decision"),
        ("refundguard_decisions_total", "reason"),
        ("refundguard_scorer_latency_seconds_bucket", "scorer"),
        ("refundguard_consumer_lag_messages", "partition"),
        ("refundguard_dead_letters_total", "cause"),
        ("refundguard_scorer_errors_total", "kind"),
        ("refundguard_image_fetches_total", "outcome"),
        ("refundguard_image_fetch_failures_total", "code"),
    ],
)
def test_breakdowns_the_operators_need(metric, label):
    assert any(
        re.search(rf"\b{metric}\b", expr) and label in referenced_labels(expr) for _t, expr, _l in dashboard_queries()
    ), f"no panel shows {metric} by {label}"


# ---- alert and recording rules --------------------------------------------------------------


@pytest.mark.parametrize(("rule", "expr"), alert_queries(), ids=lambda v: str(v)[:60])
def test_rule_uses_only_exported_metrics(rule, expr, exported, default_collector_samples, recorded_names):
    assert check_expr(expr, exported, default_collector_samples, recorded_names) == [], rule


def test_rules_cover_the_signals_operators_page_on():
    text = " ".join(expr for _rule, expr in alert_queries())
    for metric in (
        "refundguard_consumer_lag_messages",
        "refundguard_dead_letters_total",
        "refundguard_scorer_errors_total",
        "refundguard_scorer_latency_seconds_count",
        "refundguard_decisions_total",
        "refundguard_requests_consumed_total",
        "refundguard_end_to_end_latency_seconds_bucket",
        "refundguard_ready",
    ):
        assert re.search(rf"\b{metric}\b", text), metric
    assert re.search(r"\bup\{", text)
