"""Prometheus metrics of one proxy process, read from its counters when scraped.

The statement path only bumps plain integers on the proxy (``ProxyStats``); this collector turns
them into metric families at scrape time, so metrics cost nothing per statement.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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


def serve(proxy: Any, host: str, port: int) -> None:
    """Expose /metrics on HOST:PORT from a background thread."""
    registry = CollectorRegistry()
    registry.register(ProxyCollector(proxy))
    start_http_server(port, addr=host, registry=registry)
