"""The probes the injected sidecar uses: /healthz (alive), /readyz (accepting clients), /metrics."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import start_proxy


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_follow_the_proxy_lifecycle(pg: Postgres, tmp_path) -> None:
    port = free_port()
    proxy = start_proxy(pg, tmp_path, "--metrics-listen", f"127.0.0.1:{port}")
    try:
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "ready\n")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("SELECT 1")
            status, text = _get(port, "/metrics")
            assert status == 200 and "dbguard_sessions 1.0" in text
            # Draining (SIGTERM with a client still connected): alive, but no longer ready.
            proxy.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _get(port, "/readyz")[0] == 503, timeout=10, what="/readyz to turn 503")
            assert _get(port, "/healthz")[0] == 200
    finally:
        proxy.stop()


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_decisions_and_time_statements(pg: Postgres, tmp_path) -> None:
    port = free_port()
    store = tmp_path / "approvals.db"
    proxy = start_proxy(pg, tmp_path, "--metrics-listen", f"127.0.0.1:{port}", "--approvals", str(store))
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            for _ in range(3):
                conn.execute("SELECT count(*) FROM orders")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM orders")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE customers SET balance = 0 WHERE id = 1")
        seen = _samples(_get(port, "/metrics")[1])
        assert seen['dbguard_decisions_total{action="allow",database="app",rule=""}'] == 3
        assert seen['dbguard_decisions_total{action="deny",database="app",rule="no-unfiltered-writes"}'] == 1
        assert seen['dbguard_decisions_total{action="require-approval",database="app",'
                    'rule="balance-change-needs-approval"}'] == 1
        assert seen["dbguard_statement_duration_seconds_count"] == 3  # the forwarded ones
        assert seen['dbguard_statement_duration_seconds_bucket{le="+Inf"}'] == 3
        assert seen["dbguard_policy_evaluation_seconds_count"] >= 3  # cache misses: one per new shape
        assert seen["dbguard_approval_requests_total"] == 1 and seen["dbguard_approvals_held"] == 0
    finally:
        proxy.stop()
