"""Prometheus metrics of the operator process, served on ``--metrics-listen`` (``/metrics``).

Every metric is defined here, once, in the operator's own registry (the proxy's are in
``dbguard.metrics``; the two processes never share one). Handlers count through the two
decorators and :func:`approval_phase`; nothing else in the operator knows about Prometheus.

- ``dbguard_operator_reconciliations_total{kind,result}``: handler runs per resource kind,
  ``result`` ``success`` or ``error`` (an exception: kopf retries it).
- ``dbguard_operator_webhook_requests_total{webhook,outcome}``: admission reviews per webhook
  (``inject-sidecar``, ``stamp-approval``, ``guard-approval``), ``outcome`` ``allowed``,
  ``denied`` (the webhook refused, with a message) or ``error`` (it failed).
- ``dbguard_operator_webhook_duration_seconds{webhook}``: time spent deciding one review.
- ``dbguard_operator_approval_transitions_total{phase}``: ApprovalRequest phases the operator
  wrote (``Pending``, ``Approved``, ``Denied``, ``Cancelled``, ``Expired``).
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import kopf
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    exposition,
    gc_collector,
    platform_collector,
    process_collector,
)

F = TypeVar("F", bound=Callable[..., Any])


class Result(str, enum.Enum):
    SUCCESS = "success"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


REGISTRY = CollectorRegistry()
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

RECONCILIATIONS = Counter("dbguard_operator_reconciliations", "handler runs, by resource kind and result",
                          ["kind", "result"], registry=REGISTRY)
WEBHOOK_REQUESTS = Counter("dbguard_operator_webhook_requests", "admission reviews answered, by webhook and outcome",
                           ["webhook", "outcome"], registry=REGISTRY)
WEBHOOK_DURATION = Histogram("dbguard_operator_webhook_duration_seconds", "time to decide one admission review",
                             ["webhook"], registry=REGISTRY,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
APPROVAL_TRANSITIONS = Counter("dbguard_operator_approval_transitions", "ApprovalRequest phases written by the operator",
                               ["phase"], registry=REGISTRY)
for _phase in ("Pending", "Approved", "Denied", "Cancelled", "Expired"):  # at 0 from the first scrape
    APPROVAL_TRANSITIONS.labels(_phase)


def reconciles(kind: str) -> Callable[[F], F]:
    """Count the runs of a (synchronous) kopf handler of ``kind``. Put it under kopf's decorators:
    kopf keeps the handler's id (``functools.wraps``), so its progress annotations stay the same."""
    def decorate(fn: F) -> F:
        for result in Result:  # every series exists from the first scrape, at 0
            RECONCILIATIONS.labels(kind, result)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except Exception:
                RECONCILIATIONS.labels(kind, Result.ERROR).inc()
                raise
            RECONCILIATIONS.labels(kind, Result.SUCCESS).inc()
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


def admits(webhook: str) -> Callable[[F], F]:
    """Count and time the reviews of a (synchronous) admission handler; ``kopf.AdmissionError`` is a denial."""
    def decorate(fn: F) -> F:
        WEBHOOK_DURATION.labels(webhook)
        for outcome in Outcome:
            WEBHOOK_REQUESTS.labels(webhook, outcome)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outcome = Outcome.ERROR
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                outcome = Outcome.ALLOWED
                return result
            except kopf.AdmissionError:
                outcome = Outcome.DENIED
                raise
            finally:
                WEBHOOK_DURATION.labels(webhook).observe(time.perf_counter() - start)
                WEBHOOK_REQUESTS.labels(webhook, outcome).inc()
        return wrapper  # type: ignore[return-value]
    return decorate


def approval_phase(phase: str) -> None:
    APPROVAL_TRANSITIONS.labels(phase).inc()


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` from a daemon thread (prometheus-client's own HTTP server)."""
    exposition.start_http_server(port, addr=host, registry=REGISTRY)
