"""pgcat-style fidelity: the same raw messages sent directly and through dbguard get identical replies."""

from __future__ import annotations

import struct

import pytest

from dbguard.pgwire import messages as m
from tests.fix_postgres import Postgres
from tests.fix_proxy import Proxy
from tests.session.test_wire import Raw, parse


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    body = portal.encode() + b"\x00" + struct.pack("!i", max_rows)
    return b"E" + struct.pack("!i", 4 + len(body)) + body


def describe(kind: str, name: str) -> bytes:
    body = kind.encode() + name.encode() + b"\x00"
    return b"D" + struct.pack("!i", 4 + len(body)) + body


CONVERSATIONS = {
    "simple select": [m.encode_query("SELECT id, name, balance FROM customers ORDER BY id")],
    "multi-statement with an error": [m.encode_query("SELECT 1; SELECT 1/0; SELECT 2")],
    "empty query": [m.encode_query("")],
    "extended, unnamed, binary params": [parse("", "SELECT name FROM customers WHERE id = $1")
                                         + m.encode_bind(statement="", params=[b"2"]) + describe("P", "")
                                         + execute() + m.encode_sync()],
    "portal fetched in pieces": [m.encode_query("BEGIN"),
                                 parse("s", "SELECT generate_series(1, 10)") + m.encode_bind(statement="s", portal="p")
                                 + execute("p", 3) + execute("p", 3) + execute("p", 0) + m.encode_sync(),
                                 m.encode_query("COMMIT")],
    "error in a transaction block": [m.encode_query("BEGIN"), m.encode_query("SELECT * FROM nope"),
                                     m.encode_query("SELECT 1"), m.encode_query("ROLLBACK")],
    "copy out": [m.encode_query("COPY (SELECT id, email FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv)")],
    "describe statement": [parse("d1", "SELECT id, email FROM customers WHERE id = $1") + describe("S", "d1")
                           + m.encode_sync()],
}


def converse(raw: Raw, messages: list[bytes]) -> list[tuple[str, bytes]]:
    replies = []
    for msg in messages:
        raw.send(msg)
        replies += raw.until_ready()
    return replies


def direct(pg: Postgres) -> Raw:
    """A raw connection straight to PostgreSQL, as the same role, over its socket (trust)."""
    raw = Raw(unix_path=str(pg.sockdir / f".s.PGSQL.{pg.port}"))
    raw.send(m.encode_startup({"user": "app", "database": "app", "client_encoding": "UTF8"}))
    raw.until_ready()
    return raw


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_replies_through_dbguard_are_byte_identical_to_direct(pg: Postgres, proxy: Proxy, name: str):
    expected = converse(direct(pg), CONVERSATIONS[name])
    through = Raw(proxy.port)
    through.login()
    got = converse(through, CONVERSATIONS[name])
    # Error messages carry the server's source position fields (F, L, R): identical too.
    assert got == expected
