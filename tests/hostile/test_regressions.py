"""Every bug the hostile-input work found, as a named test.

Fixed in pgwire (found by the pgwire fuzzer; the crashing inputs are in fuzz/regressions/pgwire/):
  * decode_error_fields raised ValueError on a field without its NUL (the relay decodes server errors);
  * a CopyFail with bytes after its message was accepted, unlike every other message type.
Fixed in analyze/ and session/ (found by probing by hand):
  * analyze raised RecursionError, not AnalysisError, for deeply nested SQL that PostgreSQL runs; through
    the proxy the client's connection was dropped without an ErrorResponse; now refused with 54001;
  * psycopg's server-side cursors failed: dbguard refused Describe of a portal made by SQL DECLARE.
"""

from __future__ import annotations

import contextlib

import psycopg
import pytest

from dbguard import analyze
from dbguard.pgwire import FrontendParser, RemoteProtocolError
from dbguard.pgwire import messages as m
from tests.fix_postgres import Postgres
from tests.fix_proxy import Proxy
from tests.hostile import wire

# -- pgwire (fixed) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, fields", [
    (b"SERROR\x00Mno", {"S": "ERROR", "M": "no"}),
    (b"SERROR\x00C42501\x00Mno\x00replication", {"S": "ERROR", "C": "42501", "M": "no", "r": "eplication"}),
    (b"S", {"S": ""}),
    (b"", {}),
])
def test_error_fields_without_their_terminator_decode_without_raising(payload: bytes, fields: dict):
    assert m.decode_error_fields(payload) == fields


def test_copy_fail_with_trailing_bytes_is_a_protocol_error():
    p = FrontendParser()
    p.receive_data(m.encode_startup({"user": "alice", "database": "app"}))
    p.next_message()
    p.receive_data(wire.frame(b"f", b"cl\x00\x00ient gave up"))
    with pytest.raises(RemoteProtocolError, match="unexpected trailing bytes"):
        p.next_message()
    p = FrontendParser()
    p.receive_data(m.encode_startup({"user": "alice", "database": "app"}))
    p.next_message()
    p.receive_data(wire.frame(b"f", b"client gave up\x00"))
    assert p.next_message() == m.CopyFail(raw=wire.frame(b"f", b"client gave up\x00"), message="client gave up")


# -- analyze / session (open) -----------------------------------------------------------------------

NESTED = {
    "200 nested subqueries": "SELECT " + "(SELECT " * 200 + "1" + ")" * 200,
    "1000 concatenations": "SELECT 'a'" + " || 'a'" * 1000,
    "500 NOTs": "SELECT " + "NOT " * 500 + "true",
    "400 nested CASEs": "SELECT " + "CASE WHEN true THEN " * 400 + "1" + " END" * 400,
}


@pytest.mark.parametrize("sql", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_sql_is_refused_with_an_analysis_error_not_a_recursion_error(sql: str):
    with contextlib.suppress(analyze.AnalysisError):  # refusing it (54001, 42601) is fine; so is analyzing it
        analyze.analyze(sql)


@pytest.mark.parametrize("extended", [False, True], ids=["Query", "Parse"])
def test_deeply_nested_statement_gets_an_error_and_the_connection_survives(pg: Postgres, proxy: Proxy,
                                                                           extended: bool):
    sql = NESTED["200 nested subqueries"]
    assert pg.psql(sql).strip() == "1"  # PostgreSQL itself runs it
    c = wire.Client(proxy.port)
    c.login()
    c.send(wire.parse("", sql) + wire.bind("", "") + wire.execute() + wire.SYNC if extended else m.encode_query(sql))
    replies = c.until_ready()
    errors = wire.errors(replies)
    assert not errors or errors[0]["S"] == "ERROR"
    c.send(m.encode_query("SELECT 1"))
    assert [t for t, _ in c.until_ready()] == ["T", "D", "C", "Z"]


def test_psycopg_server_side_cursor_works_through_the_proxy(proxy: Proxy):
    with psycopg.connect(proxy.dsn()) as conn, conn.cursor(name="hostile_cur") as cur:
        cur.execute("SELECT id FROM customers ORDER BY id")
        assert cur.fetchmany(1) == [(1,)]
        assert cur.fetchall() == [(2,)]
