"""Prometheus metrics of one proxy process, read from its counters when scraped.

The statement path only bumps plain integers on the proxy (``ProxyStats``); this collector turns
them into metric families at scrape time, so metrics cost nothing per statement.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry


class Buckets:
    """A histogram kept as plain integers (observe is a bisect and two adds), read at scrape time."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def merged(self, other: dict[str, Any]) -> Buckets:
        """These counts plus another histogram's, as ``{"counts", "total", "count"}`` (the ledger
        writer process reports its own this way)."""
        out = Buckets(self.bounds)
        out.counts = [a + b for a, b in zip(self.counts, other.get("counts") or [0] * len(self.counts), strict=True)]
        out.total = self.total + other.get("total", 0.0)
        out.count = self.count + other.get("count", 0)
        return out

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


STATEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
POLICY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0)
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters the sessions bump; read by the collector."""

    refusals: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by rule
    ledger_refusals: int = 0  # statements refused because the ledger could not commit them
    connections: int = 0
    masked_rows: int = 0  # DataRows and COPY rows rewritten by masking
    decisions: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (action, rule)
    policy_outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (policy, outcome)
    statements: Buckets = dataclasses.field(default_factory=lambda: Buckets(STATEMENT_BUCKETS))


class ProxyCollector(Collector):
    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Any]:
        proxy = self.proxy
        stats: ProxyStats = proxy.stats
        yield GaugeMetricFamily("dbguard_sessions", "client sessions open now", value=len(proxy.sessions))
        yield CounterMetricFamily("dbguard_connections", "client connections accepted", value=stats.connections)
        refusals = CounterMetricFamily("dbguard_refusals", "statements and messages refused, by rule",
                                       labels=["rule"])
        for rule, n in sorted(stats.refusals.items()):
            refusals.add_metric([rule], n)
        yield refusals
        yield CounterMetricFamily("dbguard_masked_rows", "result rows sent with masked values", value=stats.masked_rows)
        decisions = CounterMetricFamily("dbguard_decisions", "statements decided, by enforced action and rule "
                                        "(rule is empty for a policy's default)", labels=["action", "rule", "database"])
        database = proxy.settings.upstream.database
        for (action, rule), n in sorted(stats.decisions.items()):
            decisions.add_metric([str(action), rule, database], n)
        yield decisions
        outcomes = CounterMetricFamily("dbguard_policy_decisions", "decisions by GuardrailPolicy and what they did "
                                       "(allow, deny, requireApproval, dryrun, warn): what the operator sums into "
                                       "each policy's status", labels=["policy", "outcome"])
        for (policy, outcome), n in sorted(stats.policy_outcomes.items()):
            outcomes.add_metric([policy, outcome], n)
        yield outcomes
        yield stats.statements.family("dbguard_statement_duration_seconds",
                                      "time from forwarding a statement to its last response from the server")
        decider = proxy.decider
        if getattr(decider, "latency", None) is not None:
            yield decider.latency.family("dbguard_policy_evaluation_seconds",
                                         "policy evaluations (cache misses), including the wait for the engine")
        approvals = proxy.approvals
        if approvals is not None:
            yield GaugeMetricFamily("dbguard_approvals_held", "statements waiting now for an approval (hold mode)",
                                    value=sum(1 for s in list(proxy.sessions) if s.holding()))  # a copy: the loop thread changes it
            yield CounterMetricFamily("dbguard_approval_requests", "approval requests created",
                                      value=approvals.created)
            yield CounterMetricFamily("dbguard_approved_executions", "statements run under a claimed approval",
                                      value=approvals.executed)
        reloader = getattr(proxy, "reloader", None)
        if reloader is not None:
            yield CounterMetricFamily("dbguard_policy_reloads", "policy revisions loaded while running",
                                      value=reloader.reloads)
            yield CounterMetricFamily("dbguard_policy_reload_failures", "changed policy files that did not load",
                                      value=reloader.failures)
        cache = proxy.facts_cache
        yield CounterMetricFamily("dbguard_facts_cache_hits", "statement analyses served from cache", value=cache.hits)
        yield CounterMetricFamily("dbguard_facts_cache_misses", "statements parsed and analyzed",
                                  value=cache.misses)
        yield CounterMetricFamily("dbguard_events", "audit events emitted", value=proxy.events.emitted)
        ledger = proxy.events.ledger
        if ledger is not None:
            yield CounterMetricFamily("dbguard_ledger_entries_committed", "ledger entries committed",
                                      value=ledger.committed)
            yield CounterMetricFamily("dbguard_ledger_commit_failures", "ledger batches that failed to commit",
                                      value=ledger.failures)
            yield CounterMetricFamily("dbguard_ledger_entries_dropped",
                                      "non-durable entries dropped after the retry buffer filled",
                                      value=ledger.dropped)
            yield CounterMetricFamily("dbguard_ledger_refused_statements",
                                      "statements refused because the ledger could not record them",
                                      value=stats.ledger_refusals)
            yield GaugeMetricFamily("dbguard_ledger_queue", "entries waiting for the ledger writer (lag)",
                                    value=ledger.queued())
            yield GaugeMetricFamily("dbguard_ledger_up", "1 when the last ledger commit succeeded",
                                    value=0 if ledger.last_failed else 1)
            yield CounterMetricFamily("dbguard_ledger_writer_restarts",
                                      "times the ledger's writer process died and was started again",
                                      value=getattr(ledger, "restarts", 0))
            yield ledger.commit_latency.family("dbguard_ledger_commit_seconds",
                                               "time to commit one batch of ledger entries")
        rows = getattr(proxy, "row_evidence", None)
        if rows is not None and rows.active:
            yield GaugeMetricFamily("dbguard_row_evidence_streaming",
                                    "1 while this proxy streams its replication slot (0: down, or standing by)",
                                    value=1 if rows.streaming else 0)
            yield CounterMetricFamily("dbguard_row_evidence_entries", "rows entries recorded from logical decoding",
                                      value=rows.recorded)
            yield CounterMetricFamily("dbguard_row_evidence_forged_markers",
                                      "row markers in the WAL that no dbguard proxy wrote", value=rows.forged_markers)
            yield CounterMetricFamily("dbguard_row_evidence_gaps",
                                      "times the replication slot was gone and created again", value=rows.gaps)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # probes every few seconds would flood the log


def ready(proxy: Any) -> bool:
    """Accepting clients and not draining: what a readiness probe should see."""
    server = proxy.server
    return server is not None and server.is_serving()


def serve(proxy: Any, host: str, port: int) -> None:
    """Serve /metrics, /healthz (the process answers) and /readyz (accepting clients) from a thread."""
    registry = CollectorRegistry()
    registry.register(ProxyCollector(proxy))
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok = ready(proxy)
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"not ready\n"]
        return metrics_app(environ, start_response)

    httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="dbguard-metrics", daemon=True).start()
