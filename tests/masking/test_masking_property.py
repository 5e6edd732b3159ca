"""Property: whatever SELECT a masked identity writes, no seeded PII value reaches it, in any byte.

Hypothesis builds queries from plain columns, expressions, aggregates, JSON builders, predicates,
orderings, joins, subqueries, CTEs, set operations, cursors and COPY over the demo schema. Each runs through the
proxy twice: raw simple protocol (every byte the client receives is checked) and psycopg's
extended protocol with binary results (every decoded value is checked).
"""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbguard.pgwire import messages as m
from tests.fix_proxy import TOKENS, Proxy
from tests.masking.test_masking_e2e import PII, masked, no_pii  # noqa: F401 - the fixture
from tests.session.test_wire import Raw

CUSTOMER_COLUMNS = ["id", "name", "email", "phone", "ssn", "balance"]
ORDER_COLUMNS = ["id", "customer_id", "amount", "status"]
LITERALS = ["1", "'a%'", "'m'", "'Ada'", "0", "'%@%'", "NULL"]
WRAPPERS = ["{q}", "SELECT * FROM ({q}) s", "WITH w AS ({q}) SELECT * FROM w", "{q} UNION ALL {q}",
            "SELECT (SELECT count(*) FROM ({q}) i)", "SELECT * FROM customers c0 WHERE EXISTS ({q})",
            "DECLARE cur CURSOR FOR {q}", "EXPLAIN {q}", "COPY ({q}) TO STDOUT",
            "COPY ({q}) TO STDOUT WITH (FORMAT csv, HEADER)"]


@st.composite
def column(draw: st.DrawFn, joined: bool) -> str:
    if joined and draw(st.booleans()):
        return "o." + draw(st.sampled_from(ORDER_COLUMNS))
    return "c." + draw(st.sampled_from(CUSTOMER_COLUMNS))


@st.composite
def expression(draw: st.DrawFn, joined: bool) -> str:
    col = draw(column(joined))
    form = draw(st.sampled_from([
        "{c}", "{c}", "lower({c}::text)", "{c}::text", "coalesce({c}::text, 'x')", "length({c}::text)",
        "count({c})", "max({c}::text)", "string_agg({c}::text, ',')", "'p' || {c}::text", "array_agg({c})",
        "CASE WHEN {c}::text > 'm' THEN 'hi' ELSE 'lo' END", "substring({c}::text, 1, 3)", "to_jsonb({c})",
        "json_build_object('k', {c})", "row_to_json(c)", "upper(reverse({c}::text))", "{c} IS NULL",
    ]))
    return form.format(c=col)


@st.composite
def query(draw: st.DrawFn) -> str:
    joined = draw(st.booleans())
    items = draw(st.lists(st.one_of(st.sampled_from(["*", "c.*"]), expression(joined)), min_size=1, max_size=3))
    sql = f"SELECT {', '.join(items)} FROM customers c"
    if joined:
        sql += " JOIN orders o ON o.customer_id = c.id"
    if draw(st.booleans()):
        op = draw(st.sampled_from(["=", "<>", ">", "LIKE"]))
        sql += f" WHERE {draw(column(joined))}::text {op} {draw(st.sampled_from(LITERALS))}"
    if draw(st.booleans()):
        sql += f" ORDER BY {draw(column(joined))}"
    return draw(st.sampled_from(WRAPPERS)).format(q=sql)


@pytest.fixture(scope="module")
def raw(masked: Proxy) -> Raw:  # noqa: F811 - the fixture imported above
    r = Raw(masked.port)
    r.login("alice", TOKENS["alice"])
    yield r
    r.close()


@pytest.fixture(scope="module")
def conn(masked: Proxy) -> psycopg.Connection:  # noqa: F811
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as c:
        yield c


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=query())
def test_no_seeded_pii_value_reaches_a_masked_identity(raw: Raw, conn: psycopg.Connection, sql: str):
    raw.send(m.encode_query(f"BEGIN; {sql}; ROLLBACK") if sql.startswith("DECLARE") else m.encode_query(sql))
    replies = raw.until_ready()
    if any(t == "E" for t, _ in replies) and sql.startswith("DECLARE"):
        raw.send(m.encode_query("ROLLBACK"))
        raw.until_ready()
    no_pii(b"".join(p for _, p in replies))
    if sql.startswith(("DECLARE", "EXPLAIN", "COPY")):
        return
    try:
        rows = conn.execute(sql, binary=True).fetchall()
    except psycopg.Error as exc:
        no_pii(str(exc).encode() + str(exc.diag.message_detail).encode())
        return
    text = repr(rows)
    for value in PII:
        assert value not in text, f"{value!r} reached the client through {sql!r}"
