"""The probes the injected sidecar uses: /healthz (alive), /readyz (accepting clients), /metrics."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import psycopg

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
