"""Row-level evidence through the real proxy: markers in the client's transactions, logical decoding
(pgoutput) on the real server, rows entries in the ledger, the 2 a.m. question with the rows."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sqlite3
import subprocess

import asyncpg
import orjson
import psycopg
import pytest

from tests.audit.conftest import audit
from tests.fix_postgres import Postgres, wait_until
from tests.fix_proxy import TOKENS, start_proxy
from tests.hostile.wire import Client, bind, describe, execute, frame, parse

POLICY = """apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata: {name: row-evidence}
spec:
  audit:
    rows: [public.customers.balance, public.customers.email]
  masking:
    - {columns: [public.customers.email], strategy: email}
"""


@pytest.fixture
def rows_pg(pg: Postgres) -> Postgres:
    """The session PostgreSQL (wal_level=logical) with the app role allowed to read a replication slot."""
    pg.psql("ALTER ROLE app REPLICATION", db="postgres")
    pg.psql("ALTER TABLE customers REPLICA IDENTITY FULL")
    yield pg
    drop_dbguard_slots(pg)
    pg.psql("DROP PUBLICATION IF EXISTS dbguard_rows")
    pg.psql("ALTER ROLE app NOREPLICATION", db="postgres")


def drop_dbguard_slots(pg: Postgres) -> None:
    """Drop the tests' slots; a walsender that has not exited yet still holds its slot (dropping
    it then fails, and a slot left behind feeds old changes to the next test)."""
    pg.psql("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name LIKE 'dbguard%' AND active_pid IS NOT NULL", db="postgres")
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'dbguard%' AND active",
                               db="postgres").strip() == "0", timeout=20, what="the slots to be released")
    pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'dbguard%'",
            db="postgres")


def psql(proxy, sql: str, user: str = "alice") -> str:  # noqa: ANN001 - tests.fix_proxy.Proxy
    r = subprocess.run(["psql", "-X", "-At", proxy.dsn(user), "-c", sql], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def rows_proxy(pg: Postgres, tmp_path: pathlib.Path, *extra: str, text: str = POLICY):  # noqa: ANN201
    policy = tmp_path / "rows.yaml"
    policy.write_text(text)
    return start_proxy(pg, tmp_path, "--ledger", str(tmp_path / "ledger.db"), "--ledger-chain", "proxy-rows",
                       "--row-evidence", "on", "--row-evidence-interval", "0.1", *extra, policy=policy)


def rows_entries(db: pathlib.Path) -> list[dict]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [orjson.loads(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind = 'rows' ORDER BY id")]


def decision(db: pathlib.Path, session: str, stmt: int) -> dict:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (data,) = conn.execute("SELECT data FROM entries WHERE kind = 'decision' AND session = ? AND stmt = ?",
                               (session, stmt)).fetchone()
    return orjson.loads(data)


def test_each_write_names_the_rows_it_changed_with_old_and_new_values(rows_pg: Postgres, tmp_path):
    pg = rows_pg
    # A trigger on orders moves money: its change of customers belongs to the INSERT that fired it.
    pg.psql("CREATE FUNCTION charge() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE customers SET balance = balance - NEW.amount WHERE id = NEW.customer_id; RETURN NEW; END $$;"
            "CREATE TRIGGER charge AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION charge()")
    proxy = rows_proxy(pg, tmp_path)
    db = tmp_path / "ledger.db"
    try:
        # simple protocol, autocommit
        out = psql(proxy, "UPDATE customers SET balance = balance + 10 WHERE id = 1", "bob")
        assert out.strip() == "UPDATE 1", out
        # extended protocol, one explicit transaction, two statements
        with psycopg.connect(proxy.dsn("alice")) as conn:
            conn.execute("UPDATE customers SET balance = balance * 2 WHERE id = %s", (2,))
            conn.execute("UPDATE customers SET email = %s WHERE id = %s", ("ada.l@newmail.org", 1))
            conn.execute("UPDATE customers SET name = 'Ada L.' WHERE id = 1")  # no watched column changes
            conn.commit()
        # rolled back: nothing changed, nothing recorded
        with psycopg.connect(proxy.dsn("alice")) as conn:
            conn.execute("UPDATE customers SET balance = 0 WHERE id = 1")
            conn.rollback()
            conn.execute("INSERT INTO orders (customer_id, amount) VALUES (2, 0.50)")  # the trigger's change
            conn.commit()

        async def prepared() -> None:  # asyncpg: prepared, binary parameters
            conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="sam", password=TOKENS["sam"],
                                         database="app", ssl=False)
            try:
                stmt = await conn.prepare("UPDATE customers SET balance = $1 WHERE id = $2")
                await stmt.fetch(7.25, 2)
                assert await conn.fetchval("SELECT balance FROM customers WHERE id = 2") == pytest.approx(7.25)
            finally:
                await conn.close()

        asyncio.run(prepared())
        pg.psql("UPDATE customers SET balance = 1 WHERE id = 1")  # straight to the server, around dbguard
        wait_until(lambda: len(rows_entries(db)) >= 6, timeout=20, what="row evidence in the ledger")
    finally:
        proxy.stop()
    entries = rows_entries(db)
    attributed = [e for e in entries if e.get("session")]
    changes = [(e["changes"][0]["key"], e["changes"][0]["old"], e["changes"][0]["new"]) for e in attributed]
    assert changes == [
        ({"id": "1"}, {"email": "****@example.com", "balance": "100.00"},
         {"email": "****@example.com", "balance": "110.00"}),
        ({"id": "2"}, {"email": "****@example.com", "balance": "250.50"},
         {"email": "****@example.com", "balance": "501.00"}),
        ({"id": "1"}, {"email": "****@example.com", "balance": "110.00"},
         {"email": "****@newmail.org", "balance": "110.00"}),
        ({"id": "2"}, {"email": "****@example.com", "balance": "501.00"},
         {"email": "****@example.com", "balance": "500.50"}),
        ({"id": "2"}, {"email": "****@example.com", "balance": "500.50"},
         {"email": "****@example.com", "balance": "7.25"}),
    ], entries
    assert all(e["count"] == 1 and e["changes"][0]["op"] == "UPDATE" and e["changes"][0]["table"] == "public.customers"
               for e in attributed)
    # each entry names the statement that made it: its decision entry holds the statement text
    texts = [decision(db, e["session"], e["stmt"])["statement"] for e in attributed]
    assert texts[0].startswith("UPDATE customers SET balance = balance + ")
    assert texts[1].startswith("UPDATE customers SET balance = balance * ")
    assert texts[2].startswith("UPDATE customers SET email = ")
    assert texts[3].startswith("INSERT INTO orders")  # the trigger's change, attributed to what fired it
    assert texts[4] == "UPDATE customers SET balance = $1 WHERE id = $2"
    assert attributed[1]["session"] == attributed[2]["session"] and attributed[1]["xid"] == attributed[2]["xid"]
    outside = [e for e in entries if not e.get("session")]
    assert len(outside) == 1 and outside[0]["attributed"] is False
    assert outside[0]["changes"][0]["new"]["balance"] == "1.00"
    # no clear e-mail address reaches the ledger, old or new
    raw = db.read_bytes() + (tmp_path / "ledger.db-wal").read_bytes() if (tmp_path / "ledger.db-wal").exists() \
        else db.read_bytes()
    assert b"ada.l@newmail.org" not in raw and b"ada@example.com" not in raw
    # the 2 a.m. question shows the rows
    r = audit("search", "--ledger", str(db), "--table", "customers", "--column", "balance", "--op", "UPDATE")
    assert r.returncode == 0, r.stderr
    assert "public.customers id=1: balance 100.00 -> 110.00" in r.stdout, r.stdout
    assert "public.customers id=2: balance 500.50 -> 7.25" in r.stdout, r.stdout
    r = audit("search", "--ledger", str(db), "--kind", "rows", "--json")
    assert r.returncode == 0, r.stderr
    found = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert len(found) == len(entries)
    r = audit("verify", "--ledger", str(db))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_client_receives_exactly_what_it_would_without_markers(rows_pg: Postgres, tmp_path):
    proxy = rows_proxy(rows_pg, tmp_path)
    try:
        c = Client(proxy.port)
        c.login("alice")
        # an extended batch: two writes, each preceded by a marker, and a read in between
        c.send(parse("", "UPDATE customers SET balance = balance + 1 WHERE id = $1") + bind("", "", (b"1",))
               + describe("P", "") + execute("") + parse("s2", "SELECT balance FROM customers WHERE id = 1")
               + bind("p2", "s2") + execute("p2") + bind("", "", (b"2",)) + execute("") + frame(b"S", b""))
        replies = c.until_ready()
        assert [t for t, _ in replies] == ["1", "2", "n", "C", "1", "2", "D", "C", "2", "C", "Z"], replies
        assert replies[3][1] == b"UPDATE 1\x00" and replies[6][1].endswith(b"101.00")
        # Parse/Bind/Flush answered before the Execute arrives: the counts still line up
        c.send(parse("s3", "UPDATE customers SET balance = balance + 1 WHERE id = 2") + bind("p3", "s3")
               + frame(b"H", b""))
        assert [c.recv()[0], c.recv()[0]] == ["1", "2"]
        c.send(execute("p3") + frame(b"S", b""))
        assert [t for t, _ in c.until_ready()] == ["C", "Z"]
        # two simple Queries sent at once (the second waits for the first: see rowmarks)
        c.send(frame(b"Q", b"UPDATE customers SET balance = balance + 1 WHERE id = 1\x00")
               + frame(b"Q", b"UPDATE customers SET balance = balance + 1 WHERE id = 2\x00"))
        assert [t for t, _ in c.until_ready()] == ["C", "Z"]
        assert [t for t, _ in c.until_ready()] == ["C", "Z"]
        c.close()
        wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 5, timeout=20, what="row evidence")
    finally:
        proxy.stop()
    assert [e["changes"][0]["key"]["id"] for e in rows_entries(tmp_path / "ledger.db")] == ["1", "2", "2", "1", "2"]


def test_a_failed_transaction_and_a_read_only_one_keep_the_connection_usable(rows_pg: Postgres, tmp_path):
    proxy = rows_proxy(rows_pg, tmp_path)
    try:
        with psycopg.connect(proxy.dsn("alice")) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("UPDATE customers SET balance = 5 WHERE id = 1")
            conn.rollback()
            conn.execute("SET TRANSACTION READ ONLY")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("UPDATE customers SET balance = 5 WHERE id = 1")
            conn.rollback()
            assert conn.execute("SELECT balance FROM customers WHERE id = 1").fetchone()[0] == 100
            conn.rollback()
        out = psql(proxy, "BEGIN READ ONLY; UPDATE customers SET balance = 5 WHERE id = 1")
        assert "read-only transaction" in out
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 6 WHERE id = 1")
        wait_until(lambda: rows_entries(tmp_path / "ledger.db"), timeout=20, what="row evidence")
    finally:
        proxy.stop()
    assert [e["changes"][0]["new"]["balance"] for e in rows_entries(tmp_path / "ledger.db")] == ["6.00"]


def test_a_killed_proxy_loses_no_evidence(rows_pg: Postgres, tmp_path):
    """The slot advances only after the ledger commits: what a killed proxy had not recorded waits in it."""
    proxy = rows_proxy(rows_pg, tmp_path, "--row-evidence-interval", "3600")
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        for i in range(5):
            conn.execute("UPDATE customers SET balance = %s WHERE id = 1", (i,))
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(10)
    assert rows_entries(tmp_path / "ledger.db") == []
    again = rows_proxy(rows_pg, tmp_path)
    try:
        wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 5, timeout=20, what="row evidence")
    finally:
        again.stop()
    entries = rows_entries(tmp_path / "ledger.db")
    assert [e["changes"][0]["new"]["balance"] for e in entries] == ["0.00", "1.00", "2.00", "3.00", "4.00"]
    r = audit("verify", "--ledger", str(tmp_path / "ledger.db"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_what_the_server_cannot_give_stops_the_proxy_with_a_clear_error(pg: Postgres, tmp_path):
    policy = tmp_path / "rows.yaml"
    policy.write_text(POLICY)
    # no REPLICATION attribute: no slot
    pg.psql("CREATE PUBLICATION dbguard_rows FOR TABLE customers")
    try:
        with pytest.raises(RuntimeError) as err:
            start_proxy(pg, tmp_path, "--row-evidence", "on", policy=policy)
        assert "cannot create replication slot" in str(err.value) and "REPLICATION attribute" in str(err.value)
    finally:
        pg.psql("DROP PUBLICATION dbguard_rows")
    # a column the table does not have
    policy.write_text(POLICY.replace("public.customers.email]", "public.customers.emial]"))
    with pytest.raises(RuntimeError) as err:
        start_proxy(pg, tmp_path, "--row-evidence", "on", policy=policy)
    assert "public.customers has no column(s) emial" in str(err.value)
    # a table this database does not have (policies may serve several): a warning, and the proxy serves
    policy.write_text(POLICY.replace("[public.customers.balance, public.customers.email]", "[public.ledgers.total]"))
    proxy = start_proxy(pg, tmp_path, "--row-evidence", "on", policy=policy)
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        conn.execute("UPDATE customers SET balance = 1 WHERE id = 1")
    proxy.stop()
    assert "no table public.ledgers in database app" in proxy.log() and "nothing to watch" in proxy.log()
    # a policy that lists rows while --row-evidence is off: a warning, and the proxy serves
    policy.write_text(POLICY)
    proxy = start_proxy(pg, tmp_path, policy=policy)
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 1 WHERE id = 1")
    finally:
        proxy.stop()
    assert "--row-evidence is off" in proxy.log()


def test_a_bad_audit_rows_reference_is_refused_with_its_line(tmp_path):
    from dbguard.errors import ConfigError
    from dbguard.policy import spec

    with pytest.raises(ConfigError) as err:
        spec.load_text(POLICY.replace("public.customers.balance", "customers.balance"), "p.yaml")
    assert "spec.audit.rows" in str(err.value) and "schema.table.column" in str(err.value)
    assert "p.yaml:6" in str(err.value) or "line 6" in str(err.value), str(err.value)


def test_sigterm_records_what_was_committed_before_it_stops(rows_pg: Postgres, tmp_path):
    proxy = rows_proxy(rows_pg, tmp_path, "--row-evidence-interval", "3600")  # batched until the end
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        for i in range(3):
            conn.execute("UPDATE customers SET balance = %s WHERE id = 2", (i,))
    assert rows_entries(tmp_path / "ledger.db") == []
    proxy.stop()
    assert proxy.proc.returncode == 0
    assert [e["changes"][0]["new"]["balance"] for e in rows_entries(tmp_path / "ledger.db")] == ["0.00", "1.00", "2.00"]


def test_the_postgresql_sink_joins_rows_to_their_statement(rows_pg: Postgres, tmp_path, ledger_db):
    policy = tmp_path / "rows.yaml"
    policy.write_text(POLICY)
    proxy = start_proxy(rows_pg, tmp_path, "--ledger", ledger_db, "--ledger-chain", "pg-rows", "--row-evidence", "on",
                        policy=policy)
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 42 WHERE id = 2")
    finally:
        proxy.stop()  # records what was committed before it stops
    r = audit("search", "--ledger", ledger_db, "--table", "customers", "--op", "UPDATE")
    assert r.returncode == 0, r.stderr
    assert "public.customers id=2: balance 250.50 -> 42.00" in r.stdout, r.stdout


def test_proxies_sharing_a_slot_record_each_others_rows_and_take_over(rows_pg: Postgres, tmp_path):
    """A gateway's replicas name one slot: one streams it and records every replica's rows, the
    other stands by and takes over when the first stops."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    shared = ("--row-evidence-slot", "dbguard_gateway")
    a = rows_proxy(rows_pg, a_dir, *shared, "--ledger-chain", "gw-a")
    b = rows_proxy(rows_pg, b_dir, *shared, "--ledger-chain", "gw-b")
    try:
        for proxy, balance in ((a, 11), (b, 22)):
            with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
                conn.execute("UPDATE customers SET balance = %s WHERE id = 1", (balance,))
        wait_until(lambda: len(rows_entries(a_dir / "ledger.db")) >= 2, timeout=20, what="rows of both proxies")
        assert rows_entries(b_dir / "ledger.db") == []
        a.stop()
        with psycopg.connect(b.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 33 WHERE id = 1")
        wait_until(lambda: rows_entries(b_dir / "ledger.db"), timeout=20, what="the standby to take over")
    finally:
        a.stop()
        b.stop()
    first = rows_entries(a_dir / "ledger.db")
    assert [e["changes"][0]["new"]["balance"] for e in first] == ["11.00", "22.00"]
    assert "chain" not in first[0] and first[1]["chain"] == "gw-b"  # B's statement, recorded by A
    assert [e["changes"][0]["new"]["balance"] for e in rows_entries(b_dir / "ledger.db")] == ["33.00"]
    assert "standing by" in b.log()


def test_a_client_cannot_pose_as_a_dbguard_marker(rows_pg: Postgres, tmp_path):
    """A marker is authenticated with a key only proxies hold: a forged one is recorded as such, with the
    changes after it unattributed, never credited to the session it names. (Example policies also deny
    pg_logical_emit_message as a dangerous function; this policy allows everything.)"""
    # masking refuses such calls on its own: test without it
    proxy = rows_proxy(rows_pg, tmp_path, text=POLICY.split("  masking:")[0])
    forged = '{"chain": "proxy-rows", "session": "someone-else", "stmt": 1, "mac": "00"}'
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 5 WHERE id = 1 AND "
                         f"pg_logical_emit_message(true, 'dbguard', '{forged}') IS NOT NULL")
        wait_until(lambda: rows_entries(tmp_path / "ledger.db"), timeout=20, what="row evidence")
    finally:
        proxy.stop()
    [entry] = rows_entries(tmp_path / "ledger.db")
    assert entry["attributed"] is False and entry["forged_marker"]["session"] == "someone-else"
    assert "session" not in entry and entry["changes"][0]["new"]["balance"] == "5.00"
    assert "a marker that no dbguard proxy wrote" in proxy.log()


def test_a_dropped_slot_is_created_again_and_the_gap_is_recorded(rows_pg: Postgres, tmp_path):
    from tests.audit.test_ledger_e2e import metrics
    from tests.fix_postgres import free_port

    port = free_port()
    proxy = rows_proxy(rows_pg, tmp_path, "--metrics-listen", f"127.0.0.1:{port}")
    db = tmp_path / "ledger.db"
    try:
        wait_until(lambda: metrics(port).get("dbguard_row_evidence_streaming") == 1, timeout=20, what="streaming")
        # someone with the rights drops the slot under the running proxy (which retries after 1 s)
        rows_pg.psql("""DO $$ DECLARE pid int; BEGIN
            SELECT active_pid INTO pid FROM pg_replication_slots WHERE slot_name LIKE 'dbguard%';
            PERFORM pg_terminate_backend(pid);
            FOR i IN 1..100 LOOP
              EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'dbguard%' AND active);
              PERFORM pg_sleep(0.01);
            END LOOP;
            PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'dbguard%';
            END $$""", db="postgres")
        wait_until(lambda: metrics(port).get("dbguard_row_evidence_gaps_total") == 1, timeout=20, what="a new slot")
        wait_until(lambda: metrics(port).get("dbguard_row_evidence_streaming") == 1, timeout=20, what="streaming")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 77 WHERE id = 1")
        wait_until(lambda: any(e.get("changes") for e in rows_entries(db)), timeout=20, what="rows after the gap")
    finally:
        proxy.stop()
    entries = rows_entries(db)
    assert entries[0]["gap"] is True and "does not exist" in entries[0]["reason"]
    assert entries[-1]["changes"][0]["new"]["balance"] == "77.00"
    assert "was gone" in proxy.log()


def test_returning_rows_are_masked_and_the_marker_row_never_shows(rows_pg: Postgres, tmp_path):
    proxy = rows_proxy(rows_pg, tmp_path)  # e-mail masked for everyone in this policy
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            for binary in (False, True):
                got = conn.execute("UPDATE customers SET balance = balance + 1 WHERE id <= 2 RETURNING id, email",
                                   binary=binary).fetchall()
                assert sorted(got) == [(1, "****@example.com"), (2, "****@example.com")]
        out = psql(proxy, "UPDATE customers SET balance = 3 WHERE id = 1 RETURNING email")
        assert out.splitlines()[0] == "****@example.com" and "UPDATE 1" in out, out
        wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 3, timeout=20, what="row evidence")
    finally:
        proxy.stop()
