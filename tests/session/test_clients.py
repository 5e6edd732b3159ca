"""Real clients through the real proxy to a real PostgreSQL, with the example policy."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.fix_postgres import Postgres
from tests.fix_proxy import Proxy


def psql(proxy: Proxy, sql: str, user: str = "alice") -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=0", proxy.dsn(user), "-c", sql],
                          capture_output=True, text=True, timeout=30)


# --- psql ---------------------------------------------------------------------------------------


def test_psql_reads_and_writes_through_the_proxy(proxy: Proxy, pg: Postgres):
    r = psql(proxy, "SELECT name FROM customers ORDER BY id")
    assert r.returncode == 0, r.stderr
    assert "Ada" in r.stdout and "Grace" in r.stdout
    r = psql(proxy, "INSERT INTO orders (customer_id, amount) VALUES (2, 99)")
    assert r.returncode == 0 and "INSERT 0 1" in r.stdout, r.stderr
    assert pg.psql("SELECT count(*) FROM orders WHERE amount = 99").strip() == "1"


def test_psql_drop_table_is_refused_with_the_rule_name(proxy: Proxy, pg: Postgres):
    r = psql(proxy, "DROP TABLE customers")
    assert "ERROR:" in r.stderr and "no-drop-table" in r.stderr, r.stderr
    assert pg.psql("SELECT count(*) FROM customers").strip() == "2"


def test_refusal_events_name_the_rule(proxy: Proxy):
    psql(proxy, "DELETE FROM orders")
    decisions = [e for e in proxy.events() if e["kind"] == "decision" and e["outcome"] == "refused"]
    assert decisions, proxy.events()
    assert decisions[-1]["identity"]["user"] == "alice"
    assert decisions[-1]["rule"]
    assert decisions[-1]["sqlstate"] == "42501"


# --- psycopg: simple, extended, pipeline, transactions --------------------------------------------


def test_refusal_keeps_the_connection_usable(proxy: Proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege, match="dbguard denied"):
            conn.execute("DELETE FROM orders")
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)


def test_delete_without_where_is_refused_with_42501_in_both_protocols(proxy: Proxy, pg: Postgres):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for prepare in (False, True):
            with pytest.raises(psycopg.Error) as exc:
                conn.execute("DELETE FROM orders WHERE 1 = 1", prepare=prepare)
            assert exc.value.sqlstate == "42501"
        with conn.cursor() as cur:  # binary parameters, extended protocol
            cur.execute("DELETE FROM orders WHERE id = %b", [1])
            assert cur.rowcount == 1
    assert pg.psql("SELECT count(*) FROM orders").strip() == "2"


def test_refusal_inside_a_transaction_block_fails_the_block_like_postgres(proxy: Proxy, pg: Postgres):
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 77)")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("DROP TABLE orders")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM orders WHERE amount = 77").fetchone() == (0,)


def test_pipeline_mode_discards_until_sync_after_a_refusal(proxy: Proxy, pg: Postgres):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline() as p:
            c1 = conn.execute("SELECT 1")
            p.sync()
            with pytest.raises(pg_errors.InsufficientPrivilege):
                conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 5)")
                conn.execute("DELETE FROM orders")  # refused: the INSERT before it is rolled back too
                conn.execute("SELECT 2")
                p.sync()
            c3 = conn.execute("SELECT 3")
        assert c1.fetchone() == (1,)
        assert c3.fetchone() == (3,)
    assert pg.psql("SELECT count(*) FROM orders WHERE amount = 5").strip() == "0"


def test_multi_statement_query_is_refused_whole(proxy: Proxy, pg: Postgres):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, pytest.raises(pg_errors.InsufficientPrivilege):
        conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 6); DROP TABLE orders")
    assert pg.psql("SELECT count(*) FROM orders WHERE amount = 6").strip() == "0"


def test_update_of_balance_answers_approval_required(proxy: Proxy, pg: Postgres):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege, match="approval required"):
            conn.execute("UPDATE customers SET balance = balance + 1 WHERE id = 1")
        conn.execute("UPDATE customers SET name = 'Ada L.' WHERE id = 1")
    assert pg.psql("SELECT balance FROM customers WHERE id = 1").strip() == "100.00"


@pytest.mark.parametrize("sql", [
    "WITH x AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM x",
    "EXPLAIN ANALYZE DELETE FROM orders",
    "PREPARE p AS DELETE FROM orders",
    "delete /* comment */ from \"orders\"",
    'DELETE FROM U&"\\006Frders"',
    "DO $$ BEGIN DELETE FROM orders; END $$",
    "SELECT pg_read_file('/etc/passwd')",
    "COPY orders TO '/tmp/x.csv'",
    "SET standard_conforming_strings = off",
    "SELECT set_config('standard_conforming_strings', 'off', false)",
    "SET ROLE postgres",
    "ALTER SYSTEM SET work_mem = '1GB'",
    "LOAD 'auto_explain'",
])
def test_evasions_are_refused_and_nothing_changes(proxy: Proxy, pg: Postgres, sql: str):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(sql)
        assert exc.value.sqlstate in ("42501", "0A000"), exc.value
        assert "dbguard" in str(exc.value)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
    assert pg.psql("SHOW standard_conforming_strings").strip() == "on"


def test_execute_of_a_prepared_statement_is_judged_again(proxy: Proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("PREPARE q(int) AS SELECT name FROM customers WHERE id = $1")
        assert conn.execute("EXECUTE q(1)").fetchone() == ("Ada",)
        with pytest.raises(pg_errors.InvalidSqlStatementName, match="unknown to dbguard"):
            conn.execute("EXECUTE never_prepared(1)")


def test_unparseable_sql_is_refused_with_42601_and_connection_survives(proxy: Proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(pg_errors.SyntaxError, match="does not parse"):
            conn.execute("SELEKT * FROM customers")
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- asyncpg: extended protocol, binary formats ------------------------------------------------------


def test_asyncpg_binary_results_and_refusals(proxy: Proxy):
    async def go() -> None:
        conn = await asyncpg.connect(proxy.url())
        try:
            row = await conn.fetchrow("SELECT id, balance, email FROM customers WHERE id = $1", 2)
            assert (row["id"], str(row["balance"]), row["email"]) == (2, "250.50", "grace@example.com")
            stmt = await conn.prepare("SELECT count(*) FROM orders WHERE customer_id = $1")
            assert await stmt.fetchval(1) == 2
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("TRUNCATE orders")
            assert await stmt.fetchval(2) == 1
            async with conn.transaction():
                await conn.execute("INSERT INTO orders (customer_id, amount) VALUES ($1, $2)", 1, 3)
            # An array parameter makes asyncpg introspect types, with set_config('jit', 'off', false) first.
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = ANY($1::int[])", [1, 2]) == 2
        finally:
            await conn.close()
    asyncio.run(go())


# --- pgbench ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only_runs_in_every_protocol_mode(proxy: Proxy, pg: Postgres, mode: str):
    env = {"PGPASSWORD": "bob-dba-token"}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "app", "app"],
                          env={"PGPASSWORD": "app-secret-pw-7d1c", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    r = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", "4", "-t", "200", "-h", "127.0.0.1",
                        "-p", str(proxy.port), "-U", "bob", "app"],
                       env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "number of transactions actually processed: 800/800" in r.stdout
    pg.psql("DROP TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")


# --- cancel ---------------------------------------------------------------------------------------------


def test_cancel_request_reaches_the_right_backend(proxy: Proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)
