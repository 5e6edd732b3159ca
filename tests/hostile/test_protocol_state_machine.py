"""A hypothesis state machine drives a real proxy in front of a real PostgreSQL with raw messages.

Rules queue Query, Parse/Bind/Describe/Execute/Close/Sync/Flush, COPY, unknown and FunctionCall
messages in any order (pipelined: nothing is sent until an exchange), with allowed, failing and
refused statements. Each exchange sends the queue plus a fence (``ROLLBACK; SELECT 'fence-N'``)
and checks, after every step:

* the proxy answers with one ReadyForQuery per Sync and Query (a Query inside a failed extended
  batch is discarded, as PostgreSQL does: it may earn none), and nothing after the fence's;
* the connection stays usable after any refusal (the fence runs), errors are ERROR, never FATAL;
* a refused statement never reaches the server: the marker table every refused statement would
  change is byte-for-byte unchanged, read over a direct connection;
* malformed and oversized messages close that one connection with a FATAL 08P01/54000, and the
  proxy process never dies; its log shows no internal error.
"""

from __future__ import annotations

import os
import pathlib

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

from dbguard.pgwire import messages as m
from tests.fix_postgres import Postgres
from tests.fix_proxy import start_proxy
from tests.hostile import wire
from tests.hostile.wire import Client

MAX_MESSAGE = 65536
EXAMPLES = int(os.environ.get("DBGUARD_HOSTILE_EXAMPLES", "50"))  # more for a longer local hunt

MARKER_ROWS = ((1, 10), (2, 20), (3, 30))
ALLOWED = [
    "SELECT 1", "SELECT v FROM hostile_marker ORDER BY id", "SELECT $1::int", "SELECT generate_series(1, 5)",
    "INSERT INTO hostile_scratch VALUES (1, 1)", "UPDATE hostile_scratch SET v = v + 1 WHERE id = 1",
    "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT sp", "SELECT 1/0", "SELECT * FROM no_such_table",
    "COPY (SELECT id FROM hostile_marker) TO STDOUT", "SHOW search_path", "", "EXECUTE pp",
]
REFUSED = [
    "DROP TABLE hostile_marker", "DELETE FROM hostile_marker", "UPDATE hostile_marker SET v = 0",
    "TRUNCATE hostile_marker", "DELETE FROM hostile_marker WHERE 1 = 1", "UPDATE hostile_marker SET v = v WHERE true",
    "WITH x AS (DELETE FROM hostile_marker RETURNING *) SELECT * FROM x",
    "EXPLAIN ANALYZE DELETE FROM hostile_marker", "SELECT 1; DELETE FROM hostile_marker",
    "DO $$ BEGIN DELETE FROM hostile_marker WHERE id = 1; END $$",
    "PREPARE pp AS DELETE FROM hostile_marker",
]
UNPARSABLE = ["SELEC 1", "SELECT 'unterminated", "DELETE FROM hostile_marker WHERE"]
SQL = st.sampled_from(ALLOWED + REFUSED + UNPARSABLE)
STATEMENTS = st.sampled_from(["", "s1", "s2", "dbguard.reserved"])
PORTALS = st.sampled_from(["", "p1", "p2"])
MALFORMED = {
    "unterminated query": wire.frame(b"Q", b"SELECT 1"),
    "NUL inside query": wire.frame(b"Q", b"SELECT 1\x00; DROP TABLE hostile_marker\x00"),
    "length below 4": b"Q\x00\x00\x00\x02",
    "truncated bind": wire.frame(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09ab"),
    "describe of kind X": wire.frame(b"D", b"Xs1\x00"),
    "sync with a body": wire.frame(b"S", b"\x00"),
    "copy fail with trailing bytes": wire.frame(b"f", b"no\x00DROP TABLE hostile_marker"),
    "oversized query": b"Q" + (MAX_MESSAGE + 10).to_bytes(4, "big") + b"SELECT '" + b"x" * 1000,
}


@pytest.fixture
def marked(pg: Postgres) -> Postgres:
    pg.psql("DROP TABLE IF EXISTS hostile_marker, hostile_scratch; SET ROLE app; "
            "CREATE TABLE hostile_marker (id int PRIMARY KEY, v int NOT NULL); "
            "CREATE TABLE hostile_scratch (id int, v int); "
            "INSERT INTO hostile_marker VALUES " + ", ".join(f"({i}, {v})" for i, v in MARKER_ROWS))
    yield pg
    pg.psql("DROP TABLE IF EXISTS hostile_marker, hostile_scratch")


def _machine(port: int, proc, direct: psycopg.Connection):  # noqa: ANN001, ANN202 - subprocess.Popen -> class
    class ProxyProtocol(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client = Client(port, timeout=10)
            self.client.login()
            self.queue: list[bytes] = []
            self.min_ready = 0  # ReadyForQuery messages the queue must earn at least ...
            self.max_ready = 0  # ... and at most
            self.in_batch = False  # extended-protocol messages since the last Sync (as the proxy counts)
            self.fences = 0

        # -- extended protocol -----------------------------------------------------------------

        def _extended(self, data: bytes) -> None:
            self.queue.append(data)
            self.in_batch = True

        statements = Bundle("statements")
        portals = Bundle("portals")

        @rule(target=statements, name=STATEMENTS, sql=SQL)
        def parse(self, name: str, sql: str) -> str:
            self._extended(wire.parse(name, sql))
            return name

        @rule(target=portals, portal=PORTALS, statement=st.one_of(statements, STATEMENTS),
              params=st.sampled_from([(), (b"1",), (None,), (b"x", b"y")]))
        def bind(self, portal: str, statement: str, params: tuple) -> str:
            self._extended(wire.bind(portal, statement, params))
            return portal

        @rule(sql=SQL, max_rows=st.sampled_from([0, 1]), sync=st.booleans())
        def statement_cycle(self, sql: str, max_rows: int, sync: bool) -> None:
            """Parse, Bind, Describe, Execute of one unnamed statement: what most drivers send."""
            self._extended(wire.parse("", sql) + wire.bind("", "") + wire.describe("P", "") + wire.execute("", max_rows))
            if sync:
                self.sync()

        @rule(kind=st.sampled_from("SP"), name=st.sampled_from(["", "s1", "p1", "nope"]))
        def describe(self, kind: str, name: str) -> None:
            self._extended(wire.describe(kind, name))

        @rule(portal=st.one_of(portals, PORTALS), max_rows=st.sampled_from([0, 1, 2]))
        def execute(self, portal: str, max_rows: int) -> None:
            self._extended(wire.execute(portal, max_rows))

        @rule(kind=st.sampled_from("SP"), name=st.sampled_from(["", "s1", "s2", "p1"]))
        def close(self, kind: str, name: str) -> None:
            self._extended(wire.close(kind, name))

        @rule()
        def sync(self) -> None:
            self.queue.append(wire.SYNC)
            self.in_batch = False
            self.min_ready += 1
            self.max_ready += 1

        @rule()
        def flush(self) -> None:
            self.queue.append(wire.FLUSH)

        # -- simple protocol and odd messages --------------------------------------------------

        def _query_like(self, data: bytes) -> None:
            self.queue.append(data)
            if not self.in_batch:  # inside an extended batch that failed, it is discarded: no reply
                self.min_ready += 1
            self.max_ready += 1

        @rule(sql=SQL)
        def query(self, sql: str) -> None:
            self._query_like(m.encode_query(sql))

        @rule(fail=st.booleans())
        def copy_in(self, fail: bool) -> None:
            end = wire.frame(b"f", b"client gave up\x00") if fail else wire.frame(b"c", b"")
            self._query_like(m.encode_query("COPY hostile_scratch FROM STDIN")
                             + wire.frame(b"d", b"7\t7\n8\t8\n") + end)

        @rule(code=st.sampled_from([b"y", b"z", b"F", b"p", b"\x00", b"\xff"]))
        def unknown_message(self, code: bytes) -> None:
            self.queue.append(wire.frame(code, b"\x00\x00\x00\x01\x00\x00"))
            if not self.in_batch:  # refused politely: outside a batch it ends with its own ReadyForQuery
                self.min_ready += 1
                self.max_ready += 1

        @rule(code=st.sampled_from([b"d", b"c"]))
        def stray_copy_message(self, code: bytes) -> None:
            """CopyData/CopyDone outside COPY: forwarded, and ignored by the server (no reply)."""
            self.queue.append(wire.frame(code, b"1\t1\n" if code == b"d" else b""))

        # -- exchanges and checks --------------------------------------------------------------

        @rule()
        def exchange(self) -> None:
            if self.in_batch:
                self.sync()
            self.fences += 1
            fence = f"fence-{self.fences}-end"
            self.client.send(b"".join(self.queue) + m.encode_query(f"ROLLBACK; SELECT '{fence}'"))
            replies = []
            readies = 0
            while True:
                t, p = self.client.recv()
                replies.append((t, p))
                if t == "Z":
                    readies += 1
                    if len(replies) >= 2 and replies[-2][0] == "C" and fence.encode() in b"".join(
                            p for t, p in replies[-4:] if t == "D"):
                        break
                assert readies <= self.max_ready + 1, f"more ReadyForQuery than Sync and Query: {replies}"
            assert self.min_ready + 1 <= readies <= self.max_ready + 1, (readies, self.min_ready, self.max_ready)
            fatal = [e for e in wire.errors(replies) if e.get("S") != "ERROR"]
            assert not fatal, f"a refusal or error that is not a plain ERROR: {fatal}"
            self.queue, self.min_ready, self.max_ready = [], 0, 0
            self._check_world()

        @rule(sql=st.sampled_from(REFUSED))
        def refused_alone(self, sql: str) -> None:
            self.exchange()
            self.client.send(m.encode_query(sql))
            replies = self.client.until_ready()
            errors = wire.errors(replies)
            assert [t for t, _ in replies] == ["E", "Z"], replies
            assert errors[0]["C"] == "42501" and errors[0]["S"] == "ERROR", errors
            self.exchange()  # and the connection is still usable

        @rule(sql=st.sampled_from([sql for sql in REFUSED if ";" not in sql]))  # Parse takes one statement
        def refused_extended_alone(self, sql: str) -> None:
            self.exchange()
            self.client.send(wire.parse("", sql) + wire.bind("", "") + wire.execute() + wire.SYNC)
            replies = self.client.until_ready()
            assert [t for t, _ in replies] == ["1", "E", "Z"], replies
            error = wire.errors(replies)[0]
            assert error["C"] == "42501" and error["S"] == "ERROR", error
            self.exchange()

        @rule(kind=st.sampled_from(sorted(MALFORMED)))
        def malformed(self, kind: str) -> None:
            self.client.send(b"".join(self.queue) + MALFORMED[kind])
            replies = self.client.read_to_eof(timeout=10)
            assert replies and replies[-1][0] == "E", (kind, replies)
            last = m.decode_error_fields(replies[-1][1])
            assert last["S"] == "FATAL" and last["C"] in ("08P01", "54000"), (kind, last)
            assert sum(t == "Z" for t, _ in replies) <= self.max_ready
            self._reconnect()

        @rule()
        def terminate(self) -> None:
            self.exchange()
            self.client.send(m.encode_terminate())
            assert self.client.is_closed(timeout=5)
            self._reconnect()

        def _reconnect(self) -> None:
            self.client.close()
            self._check_world()
            self.client = Client(port, timeout=10)
            self.client.login()
            self.queue, self.min_ready, self.max_ready, self.in_batch = [], 0, 0, False

        def _check_world(self) -> None:
            assert proc.poll() is None, "the proxy process died"
            rows = direct.execute("SELECT to_regclass('hostile_marker') IS NOT NULL").fetchone()
            assert rows == (True,), "a refused DROP reached the server"
            got = direct.execute("SELECT id, v FROM hostile_marker ORDER BY id").fetchall()
            assert tuple(got) == MARKER_ROWS, f"a refused statement reached the server: marker is now {got}"

        def teardown(self) -> None:
            try:
                if self.queue or self.in_batch:
                    self.exchange()
                else:
                    self._check_world()
            finally:
                self.client.close()

    return ProxyProtocol


@pytest.mark.timeout(120 + EXAMPLES)
def test_any_interleaving_of_messages_keeps_the_protocol_in_step_and_refusals_off_the_server(
        marked: Postgres, tmp_path: pathlib.Path):
    proxy = start_proxy(marked, tmp_path, "--max-message-size", str(MAX_MESSAGE))
    try:
        with psycopg.connect(marked.app_dsn, autocommit=True) as direct:
            machine = _machine(proxy.port, proxy.proc, direct)
            run_state_machine_as_test(machine, settings=settings(
                max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow]))
        log = proxy.log()
        assert "Traceback" not in log and "internal error" not in log, log[-4000:]
        assert proxy.proc.poll() is None
        assert wire.one_query(proxy.port)[-1][0] == "Z"
    except BaseException:
        print("---- dbguard proxy log ----\n" + proxy.log()[-6000:])
        raise
    finally:
        proxy.stop()
