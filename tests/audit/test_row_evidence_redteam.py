"""Red-team regressions for row-level evidence: what the markers must never change for the client,
and what must never wedge or mislead the evidence (docs/ledger.md, "Row-level evidence")."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.audit.test_row_evidence import POLICY, decision, rows_entries, rows_pg, rows_proxy  # noqa: F401 - fixture
from tests.fix_postgres import Postgres, wait_until
from tests.hostile.wire import SYNC, Client, bind, execute, parse

UNMASKED = POLICY.split("  masking:")[0]


def _types(replies: list[tuple[str, bytes]]) -> list[str]:
    return [t for t, _ in replies]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_notices_the_marker_raises_do_not_reach_the_client(rows_pg: Postgres, tmp_path, masked: bool):  # noqa: F811
    """With statement logging sent to the client (log_duration on the server, client_min_messages=log),
    the server raises a notice for each of the marker's messages. They must not reach the client, and
    (with masking, where notices are inspected) one between the marker's CommandComplete and its
    CloseCompletes used to end the swallowing: two stray CloseCompletes reached the client."""
    rows_pg.psql("ALTER ROLE app SET log_duration = on", db="postgres")
    proxy = rows_proxy(rows_pg, tmp_path, text=POLICY if masked else UNMASKED)
    try:
        c = Client(proxy.port)
        c.login("alice")
        c.send(b"Q" + (4 + len(b"SET client_min_messages = log\x00")).to_bytes(4, "big")
               + b"SET client_min_messages = log\x00")
        c.until_ready()
        c.send(parse("", "UPDATE customers SET balance = balance + 1 WHERE id = $1") + bind("", "", (b"1",))
               + execute("") + SYNC)
        # straight to the server: 1 N 2 N C N Z (a duration for Parse, Bind and Execute)
        assert _types(c.until_ready()) == ["1", "N", "2", "N", "C", "N", "Z"]
        q = b"UPDATE customers SET balance = balance + 1 WHERE id = 2\x00"
        c.send(b"Q" + (4 + len(q)).to_bytes(4, "big") + q)
        assert _types(c.until_ready()) == ["C", "N", "Z"]
        c.close()
    finally:
        proxy.stop()
        rows_pg.psql("ALTER ROLE app RESET log_duration", db="postgres")


def test_a_replication_message_larger_than_the_read_buffer_does_not_wedge_the_stream(
        rows_pg: Postgres, tmp_path):  # noqa: F811
    """One change whose pgoutput message exceeds the stream's 64 MB buffer used to pause reading with
    the message incomplete: the stream waited forever, nothing more was recorded and the slot held
    the WAL. Anyone who can write a published table (even around the proxy) could do it."""
    proxy = rows_proxy(rows_pg, tmp_path)
    try:
        rows_pg.psql("UPDATE customers SET name = repeat('x', 66 * 1024 * 1024), balance = 5 WHERE id = 2")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 6 WHERE id = 1")
        wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 2, timeout=30, what="row evidence")
    finally:
        proxy.stop()
    entries = rows_entries(tmp_path / "ledger.db")
    assert [e["changes"][0]["new"]["balance"] for e in entries] == ["5.00", "6.00"]
    assert entries[0]["attributed"] is False and entries[1]["session"]


def test_changes_of_an_unmarked_statement_are_not_credited_to_an_earlier_one(rows_pg: Postgres, tmp_path):  # noqa: F811
    rows_pg.psql("CREATE FUNCTION bump(i int) RETURNS int LANGUAGE sql AS "
                 "$$ UPDATE customers SET balance = balance + 1000 WHERE id = i RETURNING id $$; "
                 "ALTER FUNCTION bump(int) OWNER TO app")
    proxy = rows_proxy(rows_pg, tmp_path, text=UNMASKED)
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute("UPDATE customers SET balance = 11 WHERE id = 1")
            conn.execute("SAVEPOINT s; UPDATE customers SET balance = 22 WHERE id = 2")  # one Query: no marker
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            conn.execute("UPDATE customers SET balance = 33 WHERE id = 1")
            conn.execute("CREATE TEMP TABLE t AS SELECT bump(2)")  # not marked
            conn.execute("COMMIT")
        wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 2, timeout=20, what="row evidence")
    finally:
        proxy.stop()
        rows_pg.psql("DROP FUNCTION IF EXISTS bump(int)")
    entries = rows_entries(tmp_path / "ledger.db")
    assert all(e.get("session") for e in entries), entries
    # each statement has its own entry with only the row it changed: a marker ran in the transaction
    # already, so SAVEPOINT ...; UPDATE and CREATE TABLE AS get one too
    got = [(decision(tmp_path / "ledger.db", e["session"], e["stmt"])["statement"].split(" ")[0],
            [c["key"]["id"] for c in e["changes"]]) for e in entries]
    assert got == [("UPDATE", ["1"]), ("SAVEPOINT", ["2"]), ("UPDATE", ["1"]), ("CREATE", ["2"])], got


def test_a_query_skipped_after_an_extended_error_does_not_hang_the_next_write(rows_pg: Postgres, tmp_path):  # noqa: F811
    proxy = rows_proxy(rows_pg, tmp_path, text=UNMASKED)
    try:
        c = Client(proxy.port, timeout=5)
        c.login("alice")
        q1 = b"UPDATE customers SET balance = 1 WHERE id = 1\x00"
        c.send(parse("", "SELECT 1/0") + bind("", "") + execute("") + b"Q" + (4 + len(q1)).to_bytes(4, "big") + q1
               + SYNC)
        # a Query inside a batch is refused (the server would skip it after the error, unannounced):
        # the batch ends at the Sync, as after any error in it
        replies = c.until_ready()
        assert _types(replies) == ["1", "E", "Z"], replies
        q2 = b"UPDATE customers SET balance = 2 WHERE id = 2\x00"
        c.send(b"Q" + (4 + len(q2)).to_bytes(4, "big") + q2)
        assert _types(c.until_ready()) == ["C", "Z"]
        c.close()
    finally:
        proxy.stop()


def test_a_slot_dropped_under_the_proxy_is_created_again(rows_pg: Postgres, tmp_path):  # noqa: F811
    """A DBA (or anyone with the proxy's REPLICATION role) terminates the stream and drops the slot: the
    proxy used to retry START_REPLICATION forever ("the slot keeps the changes"), recording nothing."""
    proxy = rows_proxy(rows_pg, tmp_path, "--row-evidence-slot", "dbguard_redteam", text=UNMASKED)
    active = "SELECT active FROM pg_replication_slots WHERE slot_name = 'dbguard_redteam'"
    try:
        wait_until(lambda: rows_pg.psql(active, db="postgres").strip() == "t", timeout=10, what="the stream")
        rows_pg.psql("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE slot_name = 'dbguard_redteam'", db="postgres")
        wait_until(lambda: rows_pg.psql(active, db="postgres").strip() != "t", timeout=10, what="the stream to end")
        rows_pg.psql("SELECT pg_drop_replication_slot('dbguard_redteam')", db="postgres", check=False)
        wait_until(lambda: rows_pg.psql(active, db="postgres").strip() == "t", timeout=10, what="a new slot")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("UPDATE customers SET balance = 7 WHERE id = 1")
        wait_until(lambda: any(e.get("changes") for e in rows_entries(tmp_path / "ledger.db")), timeout=10,
                   what="row evidence")
    finally:
        proxy.stop()
    entries = rows_entries(tmp_path / "ledger.db")
    assert [e.get("gap") for e in entries[:-1]] == [True]  # the ledger says what it could not see
    assert entries[-1]["changes"][0]["new"]["balance"] == "7.00"
    assert "replication slot dbguard_redteam was gone" in proxy.log()


def test_a_fast_server_restart_is_not_held_up_by_the_stream_and_evidence_resumes(tmp_path):
    """A shutting-down server waits until its walsenders' clients confirm what they were sent: the proxy
    confirms everything it has recorded, keepalives included (as pg_recvlogical does), so
    `pg_ctl -m fast restart` finishes; the stream comes back by itself."""
    import time

    from tests.fix_postgres import reset_schema, throwaway_postgres
    from tests.reliability.harness import restart_postgres

    with throwaway_postgres("dbguard-rows-restart-") as pg:
        reset_schema(pg)
        pg.psql("ALTER ROLE app REPLICATION", db="postgres")
        proxy = rows_proxy(pg, tmp_path, text=UNMASKED)
        try:
            with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
                conn.execute("UPDATE customers SET balance = 1 WHERE id = 1")
            wait_until(lambda: rows_entries(tmp_path / "ledger.db"), timeout=20, what="row evidence")
            started = time.monotonic()
            restart_postgres(pg, "fast")
            assert time.monotonic() - started < 20
            wait_until(lambda: "t" in pg.psql("SELECT active FROM pg_replication_slots", db="postgres"),
                       timeout=30, what="the stream to come back")
            with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
                conn.execute("UPDATE customers SET balance = 2 WHERE id = 1")
            wait_until(lambda: len(rows_entries(tmp_path / "ledger.db")) >= 2, timeout=20, what="evidence again")
        finally:
            proxy.stop()
        assert proxy.proc.returncode == 0
    assert [e["changes"][0]["new"]["balance"] for e in rows_entries(tmp_path / "ledger.db")] == ["1.00", "2.00"]


def test_a_cancelled_write_records_nothing_and_the_session_goes_on(rows_pg: Postgres, tmp_path):  # noqa: F811
    """A cancel request reaches the server while the marked write runs (or while its marker does):
    the client gets 57014, nothing is recorded for the rolled-back statement, the next write is."""
    import threading

    proxy = rows_proxy(rows_pg, tmp_path, text=UNMASKED)
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

            def cancel_once_running(then: float) -> None:
                # A cancel that reaches an idle backend is ignored: wait until the proxy has sent
                # something (the marker or the write), then cancel at once or a while into the write.
                wait_until(lambda: rows_pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}").strip()
                           == "active", timeout=20, interval=0.01, what="the write to reach the server")
                time.sleep(then)
                conn.cancel()

            for then in (0.0, 0.3):
                timer = threading.Thread(target=cancel_once_running, args=(then,))
                timer.start()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    conn.execute("UPDATE customers SET balance = 99 WHERE id = 1 AND pg_sleep(1) IS NOT NULL")
                timer.join()
            conn.execute("UPDATE customers SET balance = 5 WHERE id = 2")
        wait_until(lambda: rows_entries(tmp_path / "ledger.db"), timeout=20, what="row evidence")
    finally:
        proxy.stop()
    assert [(e["changes"][0]["key"]["id"], e["changes"][0]["new"]["balance"])
            for e in rows_entries(tmp_path / "ledger.db")] == [("2", "5.00")]
