"""Live decision counts for GuardrailPolicy status: the sum of the proxies' own counters.

Every proxy counts its decisions per policy and outcome (``dbguard_policy_decisions_total`` on its
metrics port). The operator reads those counters from the injected pods of the accesses that use
a policy and writes the sum into ``status.decisions``. The counts are those of the proxies running
now (a restarted proxy starts again from zero); the ledger keeps every decision for good.
"""

from __future__ import annotations

import logging
import urllib.request
from typing import Any

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from dbguard.controller.settings import ACCESS_LABEL

log = logging.getLogger(__name__)
OUTCOMES = ("allow", "deny", "requireApproval", "dryrun", "warn")
METRICS_PORT_ANNOTATION = "dbguard.io/metrics-port"
SCRAPE_TIMEOUT_S = 2.0


def parse(text: str, policy: str) -> dict[str, int]:
    """The policy's counts in one proxy's metrics page."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for family in text_string_to_metric_families(text):
        if family.name != "dbguard_policy_decisions":
            continue
        for sample in family.samples:
            outcome = sample.labels.get("outcome", "")
            if sample.labels.get("policy") == policy and outcome in counts and sample.name.endswith("_total"):
                counts[outcome] += int(sample.value)
    return counts


def _scrape(ip: str, port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
            return r.read().decode("utf-8", "replace")
    except OSError as exc:
        log.debug("cannot read the metrics of the proxy at %s:%s: %s", ip, port, exc)
        return None


def count(api: client.ApiClient, namespace: str, policy: str, accesses: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """(summed counts, proxies read) over the injected pods of these accesses."""
    totals = dict.fromkeys(OUTCOMES, 0)
    read = 0
    core = client.CoreV1Api(api)
    for access in accesses:
        name = access["metadata"]["name"]
        for pod in core.list_namespaced_pod(namespace, label_selector=f"{ACCESS_LABEL}={name}").items:
            annotations = pod.metadata.annotations or {}
            ip = pod.status.pod_ip if pod.status else None
            if "dbguard.io/injected" not in annotations or not ip:
                continue
            text = _scrape(ip, int(annotations.get(METRICS_PORT_ANNOTATION, "9187")))
            if text is None:
                continue
            read += 1
            for outcome, n in parse(text, policy).items():
                totals[outcome] += n
    return totals, read
