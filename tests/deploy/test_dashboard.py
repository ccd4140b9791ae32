"""The Grafana dashboard (deploy/grafana/threadline-dashboard.json) graphs what the services export:
every metric an expression names is one of shared/metrics.py's, with the suffix its kind has in
the exposition, and every exported metric has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "threadline-dashboard.json"

# PromQL words that are not metric names (functions and aggregations are recognized by their `(`).
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                      "group_right", "inf", "nan"})


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects (as written: `…_bucket`, `…_total`, …)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery selectors (and $__rate_interval)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    names = []
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end():].lstrip().startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an aggregation, or an operator
        names.append(word)
    return names


def family(series: str) -> str:
    """The metric family of a sample name: without its `_bucket`/`_sum`/`_count` (histograms) or
    `_total` (counters) suffix, as `shared.metrics` knows it."""
    return metrics.exported_series()[series].prometheus_name


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def test_metric_names_are_read_from_expressions() -> None:
    """The extraction itself: functions, label lists, matchers, ranges and variables are not names."""
    assert metric_names('histogram_quantile(0.99, sum by (le, operation) (rate(a_b_bucket{engine="x",'
                        'operation=~"f.*"}[$__rate_interval])))') == ["a_b_bucket"]
    assert metric_names("sum(rate(x_total[5m])) / ignoring (result) sum(rate(y_total[5m])) > bool 0") == [
        "x_total", "y_total"]
    assert metric_names("sum by (group) (threadline_consumer_pending offset 5m)") == ["threadline_consumer_pending"]
    assert metric_names("up == 1 and on (job) absent(foo)") == ["up", "foo"]


def test_suffixes_map_to_the_families_shared_metrics_defines() -> None:
    assert family("threadline_store_duration_seconds_bucket") == "threadline_store_duration_seconds"
    assert family("threadline_store_duration_seconds_count") == "threadline_store_duration_seconds"
    assert family("threadline_messages_in_total") == "threadline_messages_in"
    assert family("threadline_consumer_pending") == "threadline_consumer_pending"
    # A suffix the metric's kind does not have is not exported: a counter has no _bucket, a
    # histogram no _total, a gauge no suffix at all.
    for wrong in ("threadline_messages_in_bucket", "threadline_store_duration_seconds_total",
                  "threadline_consumer_pending_total", "threadline_messages_in", "threadline_store_duration"):
        with pytest.raises(KeyError):
            family(wrong)


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert graphs
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_every_expression_names_only_exported_metrics() -> None:
    exported = metrics.exported_series()
    for expr in exprs(load()):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{name!r} (in {expr!r}) is not one of shared/metrics.py's {sorted(exported)}"
        if "histogram_quantile" in expr:
            assert all(name.endswith("_bucket") for name in names), expr
            assert re.search(r"\bby \([^)]*\ble\b", expr), f"histogram_quantile needs the le label: {expr!r}"
        if "rate(" in expr:
            assert all(exported[name].kind in ("counter", "histogram") for name in names), (
                f"rate() of a gauge: {expr!r}")


def test_every_exported_metric_has_a_panel() -> None:
    graphed = {family(name) for expr in exprs(load()) for name in metric_names(expr)}
    assert graphed == {spec.prometheus_name for spec in metrics.METRICS}
