"""The Grafana dashboard (charts/dbguard/dashboards/dbguard.json) cannot drift from the code: it parses,
every panel queries something, and every metric and ``by (...)`` label in its PromQL is one the code
exports (read from the metric definitions in operator/dbguard, as Prometheus names them: counters get
``_total``, histograms ``_bucket``/``_sum``/``_count``). tests/operator/test_operator_metrics.py also
checks the operator's names against a real scrape."""

from __future__ import annotations

import json
import re

import pytest

from tests.chart.conftest import CHART, ROOT

DASHBOARD = CHART / "dashboards" / "dbguard.json"
CODE = ROOT / "operator" / "dbguard"
# Labels Prometheus adds when it scrapes (prometheus-operator's PodMonitor/ServiceMonitor targets), the
# PodMonitor's relabelling, and the histogram bucket label.
SCRAPE_LABELS = {"namespace", "pod", "container", "service", "endpoint", "job", "instance", "dbguard_access", "le"}

# prometheus-client definitions: Counter("name", ..., ["a", "b"]), CounterMetricFamily("name", ..., labels=[...]),
# and the proxy's Buckets.family("name", ...) histograms.
_DEFINITION = re.compile(r"\b(?P<kind>Counter|Gauge|Histogram|Summary)(?:MetricFamily)?\(\s*\"(?P<name>dbguard_\w+)\"")
_FAMILY = re.compile(r"\.family\(\s*\"(?P<name>dbguard_\w+)\"")
_LABELS = re.compile(r"\[((?:\s*\"\w+\"\s*,?)+)\]")


def _call_arguments(text: str, start: int) -> str:
    """The rest of a call's arguments from ``start`` to its closing parenthesis (strings skipped)."""
    depth, i, quote = 1, start, ""
    while i < len(text) and depth:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        i += 1
    return text[start:i]


def exported() -> tuple[dict[str, str], set[str]]:
    """{series name: kind} and every label name, from the code."""
    series: dict[str, str] = {}
    labels: set[str] = set()
    for path in CODE.rglob("*.py"):
        text = path.read_text()
        for m in _DEFINITION.finditer(text):
            kind, name = m.group("kind").lower(), m.group("name")
            base = name.removesuffix("_total")
            if kind == "counter":
                series[base + "_total"] = kind
            elif kind in ("histogram", "summary"):
                for suffix in ("_bucket", "_sum", "_count"):
                    series[base + suffix] = kind
            else:
                series[name] = kind
            for group in _LABELS.findall(_call_arguments(text, m.end())):
                labels |= set(re.findall(r"\"(\w+)\"", group))
        for m in _FAMILY.finditer(text):
            for suffix in ("_bucket", "_sum", "_count"):
                series[m.group("name") + suffix] = "histogram"
    return series, labels


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "dbguard" and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for _, expr in queries():
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"unknown variable ${var} in {expr}"


def test_the_code_exports_what_the_issue_promised() -> None:
    series, _ = exported()
    for name in ("dbguard_decisions_total", "dbguard_statement_duration_seconds_bucket",
                 "dbguard_policy_evaluation_seconds_bucket", "dbguard_sessions", "dbguard_approvals_held",
                 "dbguard_approval_requests_total", "dbguard_masked_rows_total", "dbguard_refusals_total",
                 "dbguard_ledger_commit_seconds_bucket", "dbguard_ledger_commit_failures_total", "dbguard_ledger_queue",
                 "dbguard_ledger_up", "dbguard_operator_reconciliations_total", "dbguard_operator_webhook_requests_total",
                 "dbguard_operator_webhook_duration_seconds_bucket", "dbguard_operator_approval_transitions_total"):
        assert name in series, name


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[f"{t}:{e[:40]}" for t, e in queries()])
def test_every_query_uses_only_exported_metrics_and_labels(title: str, expr: str) -> None:
    series, labels = exported()
    used = set(re.findall(r"\b(dbguard_\w+)", expr))
    assert used, f"{title}: no dbguard metric in {expr}"
    unknown = sorted(u for u in used if u not in series)
    assert not unknown, f"{title}: {unknown} are not exported by operator/dbguard (renamed?)"
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (x.strip() for x in group.split(",")):
            assert label in labels | SCRAPE_LABELS, f"{title}: label {label!r} is not exported"
    # Counters are read as rates, histograms as quantiles of their buckets: never raw.
    for name in used:
        if series[name] == "counter":
            assert re.search(rf"(rate|increase)\({name}\b", expr), f"{title}: counter {name} read without rate()"
        if name.endswith("_bucket"):
            assert "histogram_quantile(" in expr, f"{title}: {name} without histogram_quantile()"


def test_the_dashboard_covers_the_promised_panels() -> None:
    used = {m for _, expr in queries() for m in re.findall(r"\b(dbguard_\w+)", expr)}
    for name in ("dbguard_decisions_total", "dbguard_refusals_total", "dbguard_statement_duration_seconds_bucket",
                 "dbguard_policy_evaluation_seconds_bucket", "dbguard_sessions", "dbguard_approvals_held",
                 "dbguard_ledger_commit_seconds_bucket", "dbguard_ledger_commit_failures_total",
                 "dbguard_ledger_queue", "dbguard_operator_webhook_duration_seconds_bucket"):
        assert name in used, name

