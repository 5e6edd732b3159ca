"""Secrets never leave where they belong: a full run of the proxy (logins good and bad, allowed,
refused, masked and held statements, errors, a metrics scrape, a policy reload) and then every
output is searched for every secret: the log, the JSON-lines events, the SQLite ledger's bytes,
the approval store, the metrics page, and the process list."""

from __future__ import annotations

import contextlib
import pathlib
import urllib.request

import psycopg
import pytest

from tests.fix_postgres import APP_PASSWORD, Postgres, free_port
from tests.fix_proxy import EXAMPLE_MASKING, TOKENS, start_proxy


def test_no_output_of_a_full_run_contains_a_secret(pg: Postgres, tmp_path: pathlib.Path) -> None:
    metrics_port = free_port()
    ledger, store = tmp_path / "ledger.db", tmp_path / "approvals.db"
    proxy = start_proxy(pg, tmp_path, "--policy", str(EXAMPLE_MASKING), "--ledger", str(ledger),
                        "--approvals", str(store), "--metrics-listen", f"127.0.0.1:{metrics_port}",
                        "--log-level", "DEBUG")
    wrong = "not-a-real-token-5f1e"
    try:
        for user, token in TOKENS.items():
            with psycopg.connect(proxy.dsn(user), autocommit=True) as conn:
                conn.execute("SELECT * FROM customers")
                with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # AI agents may not write
                    conn.execute("UPDATE orders SET status = 'x' WHERE id = 1")
                for refused in ("DELETE FROM orders", "UPDATE customers SET balance = 1 WHERE id = 1",
                                f"SELECT '{token}'::int"):  # the server quotes the token in its error
                    with pytest.raises(psycopg.Error):
                        conn.execute(refused)
                with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # refused unless clear text
                    conn.execute("SELECT lower(ssn) FROM customers")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("alice", password=wrong))
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("alice", password=APP_PASSWORD))  # the database password as a token
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        cmdline = pathlib.Path(f"/proc/{proxy.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    finally:
        proxy.stop()
    outputs = {
        "log": proxy.log(),
        "events": proxy.events_path.read_text(),
        "ledger": ledger.read_bytes().decode("latin-1") + "".join(
            p.read_bytes().decode("latin-1") for p in tmp_path.glob("ledger.db-*")),
        "approvals": store.read_bytes().decode("latin-1"),
        "metrics": metrics,
        "process list": cmdline,
    }
    secrets = {"the database password": APP_PASSWORD, "a wrong token": wrong,
               **{f"{user}'s token": token for user, token in TOKENS.items()}}
    assert all(len(text) > 0 for name, text in outputs.items() if name != "approvals"), outputs.keys()
    leaks = [f"{what} in the {where}" for where, text in outputs.items() for what, secret in secrets.items()
             if secret in text]
    assert leaks == []
