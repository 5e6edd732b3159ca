"""Prometheus metrics of one proxy process, read from its counters when scraped.

The statement path only bumps plain integers on the proxy (``ProxyStats``); this collector turns
them into metric families at scrape time, so metrics cost nothing per statement.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters the sessions bump; read by the collector."""

    refusals: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by rule
    ledger_refusals: int = 0  # statements refused because the ledger could not commit them
    connections: int = 0
    masked_rows: int = 0  # DataRows and COPY rows rewritten by masking


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
