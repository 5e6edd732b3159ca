"""Each statement's outcome reaches the ledger: rows affected, duration, error, skipped by an earlier error."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import orjson
import psycopg
import pytest

from dbguard.audit import search
from tests.audit.conftest import audit, ledger_proxy
from tests.fix_postgres import Postgres
from tests.fix_proxy import TOKENS


def entries(db, kind: str | None = None) -> list[dict]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT data FROM entries ORDER BY id").fetchall()
    finally:
        conn.close()
    events = []
    for (d,) in rows:
        e = orjson.loads(d)
        events += search.block_reads(e) if e["kind"] == "reads" else [e]  # a block of reads holds them in order
    return [e for e in events if kind is None or e["kind"] == kind]


def test_writes_reads_and_errors_record_their_outcome(pg: Postgres, tmp_path, keys):
    priv, _ = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.execute("UPDATE orders SET status = 'shipped' WHERE customer_id = 1")
            n_orders = len(conn.execute("SELECT id FROM orders").fetchall())
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                conn.execute("UPDATE orders SET amount = 'many'::int WHERE id = 1")
            with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
                conn.execute("SELECT 1 / 0")  # extended protocol, one Sync: the second is skipped
                conn.execute("SELECT 2")
    finally:
        proxy.stop()
    decisions = entries(db, "decision")
    completions = entries(db, "completion")
    by_text = {d["statement"]: d for d in decisions}

    update = by_text["UPDATE orders SET status = $1 WHERE customer_id = $2"]
    assert "completion" not in update  # a write is recorded before it runs ...
    done = [c["completion"] for c in completions if c["completion"]["stmt"] == update["stmt"]]
    assert done and done[0]["rows"] == 2 and done[0]["tags"] == ["UPDATE 2"] and done[0]["status"] == "ok"

    select = by_text["SELECT id FROM orders"]
    assert select["completion"]["rows"] == n_orders and select["completion"]["status"] == "ok"  # ... a read after
    assert select["completion"]["duration_ms"] >= 0

    failed = by_text["UPDATE orders SET amount = CAST($1 AS integer) WHERE id = $2"]
    (failed_done,) = [c["completion"] for c in completions if c["completion"]["stmt"] == failed["stmt"]]
    assert failed_done["status"] == "error" and failed_done["error"]["sqlstate"] == "22P02"
    assert failed_done["error"]["message"] == 'invalid input syntax for type integer: "…"'  # no values

    assert by_text["SELECT $1 / $2"]["completion"]["error"]["sqlstate"] == "22012"
    assert by_text["SELECT $1"]["completion"]["status"] == "skipped"

    # search joins a write's completion to its decision
    r = audit("search", "--ledger", str(db), "--table", "orders", "--op", "UPDATE", "--json")
    found = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [e["completion"]["rows"] for e in found if e["stmt"] == update["stmt"]] == [2]


def test_a_portal_fetched_in_pieces_records_each_piece(pg: Postgres, tmp_path, keys):
    priv, _ = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)

    async def run() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="bob", password=TOKENS["bob"],
                                     database="app", ssl=False)
        try:
            async with conn.transaction():
                return len([r async for r in conn.cursor("SELECT id FROM orders", prefetch=1)])
        finally:
            await conn.close()

    n_orders = int(pg.psql("SELECT count(*) FROM orders").strip())
    try:
        assert asyncio.run(run()) == n_orders
    finally:
        proxy.stop()
    (decision,) = [d for d in entries(db, "decision") if d["statement"] == "SELECT id FROM orders"]
    pieces = [c["completion"] for c in entries(db, "completion") if c["completion"]["stmt"] == decision["stmt"]]
    # One Execute per row and a last one that finds the end: the first is written with the read's decision.
    assert decision["completion"]["status"] == "ok"
    assert len(pieces) == n_orders and all(p["status"] == "ok" for p in pieces)
    assert pieces[-1]["tags"] == ["SELECT 0"]


def test_a_read_bound_but_never_executed_is_still_recorded(pg: Postgres, tmp_path, keys):
    from dbguard.pgwire import messages as m
    from tests.fix_proxy import TOKENS
    from tests.session.test_wire import Raw, parse

    priv, _ = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    try:
        raw = Raw(proxy.port)
        raw.login("bob", TOKENS["bob"])
        raw.send(parse("", "SELECT name FROM customers") + m.encode_bind(statement="") + m.encode_sync())
        raw.until_ready()
        raw.close()
    finally:
        proxy.stop()
    (decision,) = [d for d in entries(db, "decision") if d["statement"] == "SELECT name FROM customers"]
    assert decision["completion"]["status"] == "not-executed"
