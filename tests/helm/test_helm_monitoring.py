"""The Grafana dashboard and the alert rules reference only metrics the project exports, and the
rules pass `promtool check rules`. Exported names come from cluster/metrics.py, the one module that
defines metrics (a histogram `x` also exports x_bucket, x_sum and x_count)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.helm.helm_chart import CHART
from tests.test_metrics_doc import defined_metrics
from tests.tooling import REPO_ROOT, require_promtool

RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "inf", "nan", "le",
}


def exported_metric_names() -> set[str]:
    """Names cluster/metrics.py defines (as tests/test_metrics_doc.py reads them) plus the series
    names a histogram adds."""
    names: set[str] = set()
    for name, (kind, _) in defined_metrics().items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label
    names in matchers or grouping clauses, durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(rule.get("alert") or rule.get("record"), rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append((f"variable {var['name']}", m.group(1) if m else query))
    return exprs


def test_metric_name_extraction():
    """The extractor itself: finds selectors, skips functions, labels, durations and variables."""
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(gptoss_a_seconds_bucket{code!="OK", '
            'namespace=~"$namespace"}[$__rate_interval]))) / on(instance) group_left count(up_total) '
            '> 2 and deriv(sum(gptoss_b)[15m:1m]) > 0 unless absent(c:recorded:rate5m offset 5m)')
    assert metric_names_in(expr) == {"gptoss_a_seconds_bucket", "up_total", "gptoss_b", "c:recorded:rate5m"}


def test_exported_names_come_from_the_metrics_module():
    names = exported_metric_names()
    assert {"gptoss_frontdoor_requests_total", "gptoss_frontdoor_time_to_first_token_seconds_bucket",
            "gptoss_frontdoor_requests_in_flight"} <= names
    assert "gptoss_frontdoor_requests_in_flight_bucket" not in names  # a gauge has no buckets
    assert {"gptoss_replica_waiting_requests", "gptoss_replica_preemptions_total"} <= names  # collector families


@pytest.mark.parametrize("source", ["alert rules", "dashboard"])
def test_every_promql_expression_references_only_exported_metrics(source):
    exported = exported_metric_names()
    exprs = rule_expressions() if source == "alert rules" else dashboard_expressions()
    assert exprs
    unknown = {f"{where}: {name}" for where, expr in exprs for name in metric_names_in(expr) if name not in exported}
    assert not unknown, f"not defined in cluster/metrics.py: {sorted(unknown)}"
    assert all(metric_names_in(expr) for _, expr in exprs), "an expression selects no metric at all"


def test_dashboard_has_the_panels_operators_need():
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {"Time to first token", "Inter-token latency", "Tokens per second", "Errors by gRPC code",
            "Requests in flight (front door queue)", "Waiting requests per replica", "Running requests per replica",
            "KV-cache usage per replica", "Prefix cache hit ratio", "Preemptions per second",
            "Generated tokens per second per replica", "Router decisions by outcome",
            "Autoscaler: desired vs running replicas", "Expert imbalance (max/mean per rank)"} <= titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "gptoss-cluster"


def test_alerts_cover_ttft_errors_queue_and_saturation():
    alerts = {name for name, _ in rule_expressions()}
    assert {"GptossTimeToFirstTokenP99High", "GptossErrorRatioHigh", "GptossRequestsPilingUp",
            "GptossCapacityExhausted", "GptossKvCacheSaturated"} <= alerts
    exprs = dict(rule_expressions())
    assert "gptoss_replica_waiting_requests" in metric_names_in(exprs["GptossRequestsPilingUp"])
    assert "gptoss_replica_kv_cache_usage_ratio" in metric_names_in(exprs["GptossKvCacheSaturated"])


def test_promtool_check_rules_passes():
    result = subprocess.run([require_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "rules.yaml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m])\n")
    result = subprocess.run([require_promtool(), "check", "rules", str(broken)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0


def test_deploy_files_are_the_chart_files():
    """One source: deploy/ links to the files the chart renders."""
    assert (REPO_ROOT / "deploy/prometheus/alerts.yaml").resolve() == RULES.resolve()
    assert (REPO_ROOT / "deploy/grafana/gptoss-cluster.json").resolve() == DASHBOARD.resolve()
