"""The PostgreSQL ledger sink: two proxies, one chain each, merged search, verify, tampering, outage."""

from __future__ import annotations

import threading

import orjson
import psycopg
import pytest

from tests.audit.conftest import audit
from tests.audit.test_ledger_e2e import kill_9_mid_writes
from tests.fix_postgres import Postgres, wait_until
from tests.fix_proxy import start_proxy


def pg_proxy(pg: Postgres, tmp_path, ledger_url: str, priv, chain: str):
    d = tmp_path / chain
    d.mkdir()
    return start_proxy(pg, d, "--ledger", ledger_url, "--ledger-signing-key", str(priv), "--ledger-chain", chain)


def _traffic(proxy, user: str, n: int) -> None:
    with psycopg.connect(proxy.dsn(user), autocommit=True) as conn:
        for i in range(n):
            conn.execute("UPDATE orders SET amount = %s WHERE id = 1", [i])
            conn.execute("SELECT count(*) FROM orders")


def _ledger_psql(pg: Postgres, ledger_url: str, sql: str) -> str:
    """Run SQL in the ledger database as the superuser, triggers off: an insider editing rows."""
    db = ledger_url.rsplit("/", 1)[1].split("?")[0]
    return pg.psql("SET session_replication_role = replica; " + sql, db=db)


def test_two_proxies_write_their_own_chains_and_search_merges_them(pg: Postgres, tmp_path, keys, ledger_db):
    priv, pub = keys
    a = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-a")
    b = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-b")
    try:
        threads = [threading.Thread(target=_traffic, args=(a, "bob", 30)),
                   threading.Thread(target=_traffic, args=(b, "bob", 30))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with psycopg.connect(b.dsn("alice"), autocommit=True) as conn, pytest.raises(psycopg.Error):
            conn.execute("UPDATE customers SET balance = 0 WHERE id = 1")
    finally:
        a.stop()
        b.stop()
    r = audit("verify", "--ledger", ledger_db, "--public-key", str(pub))
    assert r.returncode == 0 and "in 2 chain(s)" in r.stdout, r.stdout + r.stderr
    r = audit("search", "--ledger", ledger_db, "--table", "orders", "--op", "UPDATE", "--json")
    found = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert {e["ledger"]["chain"] for e in found} == {"proxy-a", "proxy-b"} and len(found) == 60
    assert all(e["completion"]["rows"] == 1 for e in found)
    r = audit("search", "--ledger", ledger_db, "--table", "customers", "--column", "balance", "--op", "UPDATE")
    assert "alice" in r.stdout and "(1 entry)" in r.stdout, r.stdout


def test_the_ledger_tables_refuse_updates_and_deletes(pg: Postgres, tmp_path, keys, ledger_db):
    priv, _ = keys
    proxy = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-a")
    try:
        _traffic(proxy, "bob", 2)
    finally:
        proxy.stop()
    with psycopg.connect(ledger_db, autocommit=True) as conn:  # the role the proxies write with
        for sql in ("UPDATE dbguard_audit.entries SET kind = 'x'", "DELETE FROM dbguard_audit.entries",
                    "TRUNCATE dbguard_audit.checkpoints"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(sql)


@pytest.mark.parametrize("tamper, kind", [
    ("UPDATE dbguard_audit.entries SET data = convert_to(replace(convert_from(data, 'UTF8'), 'bob', 'eve'), 'UTF8')"
     " WHERE seq = 7", "altered"),
    ("DELETE FROM dbguard_audit.entries WHERE seq = 9", "removed"),
    ("WITH p AS (SELECT min(id) a, max(id) b FROM dbguard_audit.entries WHERE seq IN (5, 6))"  # swap 5 and 6
     " UPDATE dbguard_audit.entries e SET id = CASE WHEN e.id = p.a THEN -p.b ELSE -p.a END FROM p"
     " WHERE e.seq IN (5, 6); UPDATE dbguard_audit.entries SET id = -id WHERE id < 0", "reordered"),
    # the signatures an attacker cannot redo, removed: the key vouches for nothing of the chain
    ("DELETE FROM dbguard_audit.checkpoints", "unsigned"),
])
def test_tampering_in_postgres_is_caught_and_named(pg: Postgres, tmp_path, keys, ledger_db, tamper, kind):
    priv, pub = keys
    proxy = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-a")
    try:
        _traffic(proxy, "bob", 10)
    finally:
        proxy.stop()
    assert audit("verify", "--ledger", ledger_db, "--public-key", str(pub)).returncode == 0
    _ledger_psql(pg, ledger_db, tamper)
    r = audit("verify", "--ledger", ledger_db, "--public-key", str(pub))
    assert r.returncode == 1 and "BROKEN chain proxy-a: entry" in r.stdout and kind in r.stdout, r.stdout


def test_an_unreachable_postgres_sink_refuses_writes_then_recovers(pg: Postgres, tmp_path, keys, ledger_db):
    priv, _ = keys
    proxy = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-a")
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.execute("UPDATE orders SET status = 'a' WHERE id = 1")
            pg.psql("ALTER ROLE ledger NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'dbguard-ledger'", db="postgres")
            try:
                with pytest.raises(psycopg.Error) as exc:
                    conn.execute("UPDATE orders SET status = 'b' WHERE id = 1")
                assert exc.value.sqlstate == "58030" and "audit ledger cannot record" in str(exc.value)
                assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection stays usable
            finally:
                pg.psql("ALTER ROLE ledger LOGIN", db="postgres")

            def write_goes_through() -> bool:
                try:
                    conn.execute("UPDATE orders SET status = 'c' WHERE id = 1")
                except psycopg.Error:
                    return False
                return True

            wait_until(write_goes_through, timeout=15, what="the ledger sink to come back")
        assert pg.psql("SELECT status FROM orders WHERE id = 1").strip() == "c"
        assert pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbguard-ledger'",
                       db="postgres").strip() == "1"
    finally:
        proxy.stop()
    assert "ledger unavailable" in proxy.log()


def test_kill_9_with_the_postgres_sink_loses_no_answered_write(pg: Postgres, tmp_path, keys, ledger_db):
    priv, pub = keys
    proxy = pg_proxy(pg, tmp_path, ledger_db, priv, "proxy-a")
    answered = kill_9_mid_writes(proxy)
    r = audit("verify", "--ledger", ledger_db, "--public-key", str(pub))
    assert r.returncode == 0, r.stdout
    db = ledger_db.rsplit("/", 1)[1].split("?")[0]
    writes = int(pg.psql("SELECT count(*) FROM dbguard_audit.entries WHERE kind = 'decision'"
                         " AND convert_from(data, 'UTF8') LIKE '%UPDATE orders SET amount%'", db=db).strip())
    assert writes >= answered, (writes, answered)
