"""Approvals end to end without Kubernetes: a real proxy, real PostgreSQL, real clients, the local
store and the `dbguard approve` command — reject-and-retry, hold, run-once, restarts and races."""

from __future__ import annotations

import http.server
import json
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pytest

from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import EXAMPLE_POLICY, Proxy, start_proxy

UPDATE = "UPDATE customers SET balance = balance + 10 WHERE id = 1"


def dbguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbguard", *args], capture_output=True, text=True, timeout=60)


def request_name(error: BaseException) -> str:
    found = re.search(r"request (\S+?)[ ;:]", str(error))
    assert found, str(error)
    return found.group(1)


def store_doc(store: pathlib.Path, name: str) -> dict:
    from dbguard.approvals.local import LocalStore

    found = LocalStore(store).get_sync(name)
    assert found is not None
    return found.doc


def policy_with(tmp_path: pathlib.Path, **approval: str) -> pathlib.Path:
    text = EXAMPLE_POLICY.read_text()
    for key, value in approval.items():
        text = re.sub(rf"(\n        {key}: ).*", rf"\g<1>{value}", text, count=1)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def store(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "approvals.db"


@pytest.fixture
def retry_proxy(pg: Postgres, tmp_path: pathlib.Path, store: pathlib.Path) -> Proxy:
    proxy = start_proxy(pg, tmp_path, "--approvals", str(store), "--ledger", str(tmp_path / "ledger.db"))
    yield proxy
    proxy.stop()


def balance(pg: Postgres) -> str:
    return pg.psql("SELECT balance FROM customers WHERE id = 1").strip()


def test_reject_and_retry_runs_once_after_approval(pg: Postgres, retry_proxy: Proxy, store: pathlib.Path,
                                                   tmp_path: pathlib.Path) -> None:
    with psycopg.connect(retry_proxy.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as first:
            conn.execute(UPDATE)
        name = request_name(first.value)
        assert "is pending" in str(first.value) and "balance-change-needs-approval" in str(first.value)
        assert f"dbguard approve {name} --store {store}" in first.value.diag.message_hint
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as again:
            conn.execute(UPDATE)  # a retry reuses the pending request
        assert request_name(again.value) == name
        doc = store_doc(store, name)
        spec = doc["spec"]
        assert spec["requester"] == {"user": "alice", "groups": ["developers"]}
        assert spec["statement"] == UPDATE and spec["parameters"] == [] and len(spec["fingerprint"]) == 64
        assert spec["rule"]["name"] == "balance-change-needs-approval" and spec["approvers"]["groups"] == ["dba"]
        assert spec["estimatedRows"] == 1  # EXPLAIN, never ANALYZE
        assert balance(pg) == "100.00"

        # Who may not decide.
        own = dbguard("approve", name, "--store", str(store), "--as", "alice", "--group", "developers")
        assert own.returncode == 1 and "cannot approve their own request" in own.stderr
        outsider = dbguard("approve", name, "--store", str(store), "--as", "sam", "--group", "support-leads")
        assert outsider.returncode == 1 and "not an approver" in outsider.stderr
        ok = dbguard("approve", name, "--store", str(store), "--as", "bob", "--group", "dba", "--reason", "CHG-42")
        assert ok.returncode == 0 and "Approved (by bob)" in ok.stdout, ok.stderr

        conn.execute(UPDATE)  # the identical statement now runs
        assert balance(pg) == "110.00"
        wait_until(lambda: (store_doc(store, name)["status"].get("execution") or {}).get("rowsAffected") == 1,
                   timeout=10, what="the execution to be recorded on the request")
        status = store_doc(store, name)["status"]
        assert status["phase"] == "Executed" and status["execution"]["ledgerEntry"] > 0
        # The entry named on the request is the one that recorded the execution, in the verified chain.
        import sqlite3

        with sqlite3.connect(tmp_path / "ledger.db") as db:
            (data,) = db.execute("SELECT data FROM entries WHERE seq = ?",
                                 (status["execution"]["ledgerEntry"],)).fetchone()
        recorded = json.loads(data)
        assert recorded["kind"] == "approval" and recorded["event"] == "executing" and recorded["request"] == name

        with pytest.raises(psycopg.errors.InsufficientPrivilege) as third:
            conn.execute(UPDATE)  # an approval runs once: this is a new request
        assert request_name(third.value) != name
        assert balance(pg) == "110.00"
    events = retry_proxy.events()
    approvals = [e for e in events if e.get("kind") == "approval"]
    assert [e["event"] for e in approvals] == ["requested", "executing", "requested"]
    assert approvals[1]["request"] == name and approvals[1]["approvals"][0]["user"] == "bob"


def test_an_approval_is_for_the_same_identity_and_parameters_only(pg: Postgres, retry_proxy: Proxy,
                                                                   store: pathlib.Path) -> None:
    sql = "UPDATE customers SET balance = balance + %s WHERE id = %s"
    with psycopg.connect(retry_proxy.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as first:
            conn.execute(sql, ("5", 1))
        name = request_name(first.value)
        assert store_doc(store, name)["spec"]["parameters"] == ["5", "1"]
        assert dbguard("approve", name, "--store", str(store), "--as", "bob", "--group", "dba").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as other_param:
            conn.execute(sql, ("500", 1))
        assert request_name(other_param.value) != name
        conn.execute("SELECT 1")
    with psycopg.connect(retry_proxy.dsn("sam"), autocommit=True) as other_user:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            other_user.execute(sql, ("5", 1))  # the same statement, another identity
        assert request_name(exc.value) != name
    with psycopg.connect(retry_proxy.dsn("alice"), autocommit=True) as conn:
        conn.execute(sql, ("5", 1))  # the approved parameters, the approved identity
    assert balance(pg) == "105.00"


def test_no_replay_after_a_restart_and_one_winner_among_racing_proxies(pg: Postgres, tmp_path: pathlib.Path,
                                                                       store: pathlib.Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_proxy(pg, tmp_path / "a", "--approvals", str(store))
    b = start_proxy(pg, tmp_path / "b", "--approvals", str(store))
    try:
        with psycopg.connect(a.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(UPDATE)
        name = request_name(exc.value)
        # A restart before approval replays nothing.
        a.stop()
        a = start_proxy(pg, tmp_path / "a", "--approvals", str(store))
        assert balance(pg) == "100.00"
        assert dbguard("approve", name, "--store", str(store), "--as", "bob", "--group", "dba").returncode == 0
        results: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def send(label: str, proxy: Proxy) -> None:
            with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
                barrier.wait()
                try:
                    conn.execute(UPDATE)
                    results[label] = "ran"
                except psycopg.errors.InsufficientPrivilege as err:
                    results[label] = f"refused: {err}"

        threads = [threading.Thread(target=send, args=(label, p)) for label, p in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(v.split(":")[0] for v in results.values()) == ["ran", "refused"], results
        assert balance(pg) == "110.00"
        # After a restart the executed approval is not run again.
        a.stop()
        a = start_proxy(pg, tmp_path / "a", "--approvals", str(store))
        with psycopg.connect(a.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(UPDATE)
        assert balance(pg) == "110.00"
    finally:
        a.stop()
        b.stop()


def test_hold_mode_waits_and_runs_when_approved(pg: Postgres, tmp_path: pathlib.Path, store: pathlib.Path) -> None:
    metrics_port = free_port()
    proxy = start_proxy(pg, tmp_path, "--approvals", str(store), "--metrics-listen", f"127.0.0.1:{metrics_port}",
                        policy=policy_with(tmp_path, mode="hold\n        timeout: 30s"))
    notices: list[str] = []
    outcome: dict[str, object] = {}
    try:
        conn = psycopg.connect(proxy.dsn("alice"), autocommit=True)
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))

        def run() -> None:
            t0 = time.monotonic()
            cur = conn.execute(UPDATE)
            outcome.update(rows=cur.rowcount, waited=time.monotonic() - t0)

        worker = threading.Thread(target=run)
        worker.start()
        wait_until(lambda: notices, timeout=15, what="the hold notice")
        name = request_name(Exception(notices[0]))
        assert "held for approval" in notices[0] and "dbguard approve" in notices[0]
        assert worker.is_alive() and balance(pg) == "100.00"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert "dbguard_approvals_held 1.0" in r.read().decode()
        time.sleep(0.5)
        assert dbguard("approve", name, "--store", str(store), "--as", "bob", "--group", "dba",
                       "--reason", "CHG-7").returncode == 0
        worker.join(30)
        assert outcome["rows"] == 1 and balance(pg) == "110.00"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()
    finally:
        proxy.stop()


def test_hold_mode_denied_timed_out_and_cancelled(pg: Postgres, tmp_path: pathlib.Path, store: pathlib.Path) -> None:
    proxy = start_proxy(pg, tmp_path, "--approvals", str(store),
                        policy=policy_with(tmp_path, mode="hold\n        timeout: 3s"))
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled, match="not decided within 3s"):
                conn.execute(UPDATE)
            assert 2.5 < time.monotonic() - t0 < 10
            from dbguard.approvals.local import LocalStore

            pending = [r for r in LocalStore(store).list_sync() if r.phase() == "Pending"]
            assert len(pending) == 1
            name = pending[0].name
            assert dbguard("deny", name, "--store", str(store), "--as", "bob", "--group", "dba",
                           "--reason", "not during the freeze").returncode == 0
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by bob: not during the freeze"):
                conn.execute(UPDATE)  # a denial stands until the request expires: refused at once, no new request
            assert time.monotonic() - t0 < 2
            # Another statement is held; the client cancels: the wait ends, nothing ran, the connection lives.
            threading.Timer(0.5, conn.cancel).start()
            with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
                conn.execute(UPDATE.replace("+ 10", "+ 20"))
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert balance(pg) == "100.00"
    finally:
        proxy.stop()


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []  # noqa: RUF012 - one test server per class use
    failures_left = 1

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Hook.failures_left > 0:
            _Hook.failures_left -= 1
            self.send_response(500)
            self.end_headers()
            return
        _Hook.received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_approvers_are_notified_with_retries(pg: Postgres, tmp_path: pathlib.Path, store: pathlib.Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    proxy = start_proxy(pg, tmp_path, "--approvals", str(store), "--approval-notify-url", url)
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(UPDATE)
        name = request_name(exc.value)
        wait_until(lambda: _Hook.received, timeout=15, what="the notification (after one failed attempt)")
        message = _Hook.received[0]
        assert message["request"] == name and "alice" in message["text"] and UPDATE in message["text"]
    finally:
        proxy.stop()
        server.shutdown()
