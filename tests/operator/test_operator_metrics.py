"""The operator's Prometheus metrics (``dbguard operator --metrics-listen``), scraped from the real
process while it reconciles real resources on the real API server and answers real admission
reviews: reconciliations by kind, webhook reviews by outcome and their latency, approval phases."""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.fix_operator import Operator
from tests.fix_postgres import wait_until
from tests.operator.test_approvals import APPROVER_RBAC, request_doc, wait_phase
from tests.operator.test_operator import MASKING, POLICY, access_doc, pod_doc, secret, wait_ready

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "charts" / "dbguard" / "dashboards" / "dbguard.json"


class Scrape:
    """One scrape of /metrics: samples by name and labels."""

    def __init__(self, op: Operator) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
            assert r.status == 200
            self.text = r.read().decode()
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert found, f"no sample {name}{labels} in:\n{self.text}"
        return sum(found)

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


KINDS = ("GuardrailPolicy", "DatabaseAccess", "ApprovalRequest")
WEBHOOKS = ("inject-sidecar", "stamp-approval", "guard-approval")


def test_every_series_is_there_from_the_first_scrape(op: Operator) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")  # Prometheus' text format
    scrape = Scrape(op)
    for kind in KINDS:
        for result in ("success", "error"):
            scrape.value("dbguard_operator_reconciliations_total", kind=kind, result=result)
    for webhook in WEBHOOKS:
        for outcome in ("allowed", "denied", "error"):
            scrape.value("dbguard_operator_webhook_requests_total", webhook=webhook, outcome=outcome)
        scrape.value("dbguard_operator_webhook_duration_seconds_count", webhook=webhook)
    for phase in ("Pending", "Approved", "Denied", "Cancelled", "Expired"):
        scrape.value("dbguard_operator_approval_transitions_total", phase=phase)
    assert "process_resident_memory_bytes" in scrape.names()


def test_reconciliations_and_sidecar_reviews_are_counted(op: Operator, kube_ns: str) -> None:
    kube, ns = op.kube, kube_ns
    before = Scrape(op)
    secret(kube, ns)
    kube.kubectl("-n", ns, "apply", "-f", "-", input=POLICY)
    kube.kubectl("-n", ns, "apply", "-f", "-", input=MASKING)
    wait_ready(op, "gp", ns, "shop-guardrails", "True")
    kube.kubectl("-n", ns, "apply", "-f", "-", input=access_doc("shop-api", ["shop-guardrails", "pii-masking"]))
    wait_ready(op, "dba", ns, "shop-api", "True", timeout=40)
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-1", "shop-api"))
    refused = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-2", "no-such-access"), check=False)
    assert refused.returncode != 0 and "no-such-access" in refused.stderr
    after = Scrape(op)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("dbguard_operator_reconciliations_total", kind="GuardrailPolicy", result="success") >= 2
    assert delta("dbguard_operator_reconciliations_total", kind="DatabaseAccess", result="success") >= 1
    assert delta("dbguard_operator_webhook_requests_total", webhook="inject-sidecar", outcome="allowed") == 1
    assert delta("dbguard_operator_webhook_requests_total", webhook="inject-sidecar", outcome="denied") == 1
    assert delta("dbguard_operator_webhook_requests_total", webhook="inject-sidecar", outcome="error") == 0
    assert delta("dbguard_operator_webhook_duration_seconds_count", webhook="inject-sidecar") == 2
    took = delta("dbguard_operator_webhook_duration_seconds_sum", webhook="inject-sidecar")
    assert 0 < took < 10
    # The latency is a real histogram: the +Inf bucket holds every review.
    assert delta("dbguard_operator_webhook_duration_seconds_bucket", webhook="inject-sidecar", le="+Inf") == 2


def test_approval_reviews_and_the_phases_the_operator_writes_are_counted(op: Operator, kube_ns: str) -> None:
    kube, ns = op.kube, kube_ns
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    before = Scrape(op)
    kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r1", requester="bob"))
    wait_phase(op, ns, "r1", "Pending")
    approve = json.dumps({"spec": {"decision": "Approved", "reason": "CHG-42"}})
    own = kube.kubectl("-n", ns, "patch", "approvalrequest", "r1", "--type", "merge", "-p", approve, user="bob",
                       check=False)
    assert own.returncode != 0  # the requester may not approve their own statement
    kube.kubectl("-n", ns, "patch", "approvalrequest", "r1", "--type", "merge", "-p", approve, user="alice")
    wait_phase(op, ns, "r1", "Approved")

    def moved() -> Scrape | None:
        s = Scrape(op)
        done = s.value("dbguard_operator_approval_transitions_total", phase="Approved") > \
            _or_zero(before, "dbguard_operator_approval_transitions_total", phase="Approved")
        return s if done else None

    after = wait_until(moved, timeout=10, interval=0.2, what="the Approved transition to be counted")

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - _or_zero(before, name, **labels)

    assert delta("dbguard_operator_approval_transitions_total", phase="Pending") == 1
    assert delta("dbguard_operator_approval_transitions_total", phase="Approved") == 1
    assert delta("dbguard_operator_reconciliations_total", kind="ApprovalRequest", result="success") >= 2
    assert delta("dbguard_operator_webhook_requests_total", webhook="guard-approval", outcome="denied") == 1
    assert delta("dbguard_operator_webhook_requests_total", webhook="guard-approval", outcome="allowed") >= 2
    assert delta("dbguard_operator_webhook_requests_total", webhook="stamp-approval", outcome="allowed") >= 2


def _or_zero(scrape: Scrape, name: str, **labels: str) -> float:
    found = [s.value for s in scrape.samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found)


def test_the_dashboard_uses_only_operator_series_the_operator_serves(op: Operator) -> None:
    """The Grafana dashboard's operator panels, checked against a real scrape (the proxy's names are
    checked against the code in tests/chart/test_dashboard.py)."""
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bdbguard_operator_[a-z_]+", e)}
    assert used, "the dashboard shows no operator metric"
    served = Scrape(op).names()
    assert used <= served, f"the dashboard queries series the operator does not serve: {sorted(used - served)}"
