"""Regression tests from the red-team pass over approvals: each was an exploit that worked."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import psycopg
import pytest

from dbguard.approvals.local import LocalStore
from dbguard.pgwire import messages as m
from tests.fix_postgres import Postgres
from tests.fix_proxy import EXAMPLE_MASKING, TOKENS, Proxy, start_proxy
from tests.hostile import wire


def approve(store, name: str) -> None:  # noqa: ANN001
    r = subprocess.run([sys.executable, "-m", "dbguard", "approve", name, "--store", str(store), "--as", "bob",
                        "--group", "dba", "--reason", "ok"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def raw(proxy: Proxy) -> wire.Client:
    c = wire.Client(proxy.port)
    c.login("alice", TOKENS["alice"])
    return c


def outcome(replies: list[tuple[str, bytes]]) -> list[tuple[str, ...]]:
    """('E', sqlstate, message) for errors, ('C', tag) for completions, in order."""
    out: list[tuple[str, ...]] = []
    for t, p in replies:
        if t == "E":
            f = m.decode_error_fields(p)
            out.append(("E", f.get("C", ""), f.get("M", "")))
        elif t == "C":
            out.append(("C", p[:-1].decode()))
    return out


def request_name(text: str) -> str:
    found = re.search(r"request (\S+?)[ ;:]", text)
    assert found, text
    return found.group(1)


def balance(pg: Postgres, i: int = 1) -> str:
    return pg.psql(f"SELECT balance FROM customers WHERE id = {i}").strip()


@pytest.fixture
def store(tmp_path):  # noqa: ANN001, ANN201
    return tmp_path / "approvals.db"


@pytest.fixture
def px(pg: Postgres, tmp_path, store) -> Proxy:  # noqa: ANN001
    p = start_proxy(pg, tmp_path, "--approvals", str(store), "--ledger", str(tmp_path / "ledger.db"))
    yield p
    p.stop()


def test_the_row_estimate_never_runs_a_smuggled_statement(pg: Postgres, px: Proxy, store) -> None:  # noqa: ANN001
    c = raw(px)
    c.send(m.encode_query("UPDATE customers SET balance = balance + 1 WHERE id = 1; COMMIT; "
                   "UPDATE customers SET balance = 0 WHERE id = 2"))
    out = outcome(c.until_ready())
    assert out[-1][1] == "42501" and "pending" in out[-1][2]
    assert balance(pg, 2) == "250.50" and balance(pg, 1) == "100.00"
    (request,) = LocalStore(store).list_sync()
    assert "estimatedRows" not in request.spec  # a multi-statement string is not estimated at all


def test_a_binary_bool_is_not_shown_as_something_else(pg: Postgres, px: Proxy, store) -> None:  # noqa: ANN001
    sql = "UPDATE customers SET balance = balance + CASE WHEN $1 THEN 1000 ELSE 0 END WHERE id = 1"
    c = raw(px)
    c.send(wire.parse("", sql, (16,)) + wire.bind("", "", (b"false",), (0,)) + wire.execute("") + wire.SYNC)
    name = request_name(outcome(c.until_ready())[-1][2])
    approve(store, name)
    # PostgreSQL reads any non-zero byte as true; the approval was for text 'false'.
    c.send(wire.parse("", sql, (16,)) + wire.bind("", "", (b"\x02",), (1,)) + wire.execute("") + wire.SYNC)
    out = outcome(c.until_ready())
    assert out[-1][1] == "42501" and request_name(out[-1][2]) != name
    requests = {r.name: r.spec for r in LocalStore(store).list_sync()}
    other = next(spec for n, spec in requests.items() if n != name)
    assert other["parameters"] == ["\\x02"] and other["parameterFormats"] == [1] and other["parameterTypes"] == [16]
    assert balance(pg) == "100.00"


def test_text_and_binary_parameters_that_look_alike_are_different_requests(pg: Postgres, px: Proxy,
                                                                             store) -> None:  # noqa: ANN001
    sql = "UPDATE customers SET balance = balance + 0, name = $1 WHERE id = 1"
    c = raw(px)
    c.send(wire.parse("", sql) + wire.bind("", "", (b"\\x61646d696e",), (0,)) + wire.execute("") + wire.SYNC)
    approve(store, request_name(outcome(c.until_ready())[-1][2]))
    c.send(wire.parse("", sql) + wire.bind("", "", (b"admin",), (1,)) + wire.execute("") + wire.SYNC)
    assert outcome(c.until_ready())[-1][1] == "42501"
    assert pg.psql("SELECT name FROM customers WHERE id = 1").strip() == "Ada"


def test_an_approved_execute_is_tied_to_the_body_it_was_approved_with(pg: Postgres, px: Proxy,
                                                                       store) -> None:  # noqa: ANN001
    def run(conn: psycopg.Connection, sql: str) -> None:
        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege as exc:
            approve(store, request_name(str(exc)))
            conn.execute(sql)

    with psycopg.connect(px.dsn("alice"), autocommit=True) as conn:
        run(conn, "PREPARE p AS UPDATE customers SET balance = balance + 1 WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute("EXECUTE p")
        shown = LocalStore(store).get_sync(request_name(str(exc.value))).spec["statement"]
        assert "balance + 1" in shown and shown.endswith("EXECUTE p")  # the approver sees the body
        approve(store, request_name(str(exc.value)))
    with psycopg.connect(px.dsn("alice"), autocommit=True) as conn:
        run(conn, "PREPARE p AS UPDATE customers SET balance = 0 WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("EXECUTE p")  # another body: the approval for "+ 1" does not apply
    assert balance(pg) == "100.00"


def test_a_statement_masking_refuses_does_not_use_up_an_approval(pg: Postgres, tmp_path, store) -> None:  # noqa: ANN001
    proxy = start_proxy(pg, tmp_path, "--approvals", str(store), "--policy", str(EXAMPLE_MASKING))
    try:
        sql = "UPDATE customers SET balance = balance + 1 WHERE id = 1 RETURNING ssn || 'x'"
        with psycopg.connect(proxy.dsn("sam"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masked"):
                conn.execute(sql)  # refused by masking before any request is made
            conn.execute("UPDATE orders SET status = 'x' WHERE id = 1")
        assert LocalStore(store).list_sync() == []
        time.sleep(0.3)
        notes = [e for e in proxy.events() if e.get("kind") == "decision" and "approval_request" in e]
        assert notes == []
    finally:
        proxy.stop()
    assert balance(pg) == "100.00"


def test_a_second_bind_in_the_same_batch_never_runs_twice(pg: Postgres, px: Proxy, store) -> None:  # noqa: ANN001
    sql = "UPDATE customers SET balance = balance + 10 WHERE id = 1"
    c = raw(px)
    c.send(wire.parse("s1", sql) + wire.bind("", "s1") + wire.execute("") + wire.SYNC)
    approve(store, request_name(outcome(c.until_ready())[-1][2]))
    c.send(wire.bind("a", "s1") + wire.bind("b", "s1") + wire.execute("a") + wire.execute("b") + wire.SYNC)
    out = outcome(c.until_ready())
    # The second Bind needs a new approval; its refusal ends the batch, so nothing in it ran.
    assert [e[1] for e in out if e[0] == "E"] == ["42501"] and not any(e[0] == "C" for e in out)
    assert balance(pg) == "100.00"


def test_statements_held_by_different_rules_are_not_approved_together(pg: Postgres, px: Proxy, store) -> None:  # noqa: ANN001
    both = "UPDATE customers SET balance = balance + 1 WHERE id = 1; ALTER TABLE orders ADD COLUMN z int"
    with psycopg.connect(px.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approval required") as exc:
            conn.execute(both)  # two rules, two sets of approvers: no single request can stand for both
        assert "send them one at a time" in exc.value.diag.message_hint
    assert LocalStore(store).list_sync() == []
    assert balance(pg) == "100.00"
