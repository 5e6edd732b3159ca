"""Masking through the real proxy and real PostgreSQL, with psql, psycopg and asyncpg (binary).

Each bypass class has a test; assertions are on what the client received. The seeded PII values
(`PII`) must never appear in any byte a masked identity receives.
"""

from __future__ import annotations

import asyncio
import decimal
import pathlib
import struct
import subprocess
import sys

import asyncpg
import orjson
import psycopg
import pytest

from dbguard.pgwire import messages as m
from tests.audit.test_ledger_e2e import metrics
from tests.fix_postgres import Postgres, free_port, reset_schema, wait_until
from tests.fix_proxy import EXAMPLE_MASKING, TOKENS, Proxy, start_proxy
from tests.session.test_wire import Raw, parse

PII = ["ada@example.com", "grace@example.com", "+1-555-0101", "+1-555-0102", "123-45-6789", "987-65-4321",
       "555-0101", "45-6789", "ada@", "grace@"]

SETUP = """
CREATE VIEW customer_contacts AS SELECT id, lower(email) AS mail FROM customers;
CREATE MATERIALIZED VIEW customer_mv AS SELECT id, ssn FROM customers;
CREATE OR REPLACE FUNCTION leak_emails() RETURNS SETOF text LANGUAGE sql AS $$ SELECT email FROM customers $$;
CREATE UNIQUE INDEX IF NOT EXISTS customers_email ON customers (email);
CREATE VIEW customer_names AS SELECT c.id, c.name, o.amount FROM customers c LEFT JOIN orders o ON o.customer_id = c.id;
CREATE VIEW customer_rows AS SELECT id, row_to_json(c) AS j FROM customers c;
CREATE VIEW customer_filter AS SELECT id FROM customers WHERE ssn LIKE '1%';
"""
TELL = """
CREATE OR REPLACE FUNCTION tell() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NEW.name = 'Notice me' THEN RAISE NOTICE 'customer % has ssn %', NEW.id, NEW.ssn USING DETAIL = NEW.email; END IF;
  IF NEW.name = 'Fail me' THEN RAISE EXCEPTION 'ssn % taken', NEW.ssn; END IF;
  RETURN NEW; END $$;
DROP TRIGGER IF EXISTS tell ON customers;
CREATE TRIGGER tell BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION tell();
"""


@pytest.fixture(scope="module")
def masked(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    reset_schema(postgres)
    postgres.psql("SET ROLE app;" + SETUP)
    proxy = start_proxy(postgres, tmp_path_factory.mktemp("masking"), "--policy", str(EXAMPLE_MASKING))
    yield proxy
    proxy.stop()


def no_pii(data: bytes) -> None:
    for value in PII:
        assert value.encode() not in data, f"{value!r} reached the client"


def raw_query(proxy: Proxy, user: str, sql: str) -> list[tuple[str, bytes]]:
    raw = Raw(proxy.port)
    try:
        raw.login(user, TOKENS[user])
        raw.send(m.encode_query(sql))
        return raw.until_ready()
    finally:
        raw.close()


def data_rows(replies: list[tuple[str, bytes]]) -> list[list[bytes | None]]:
    rows = []
    for t, p in replies:
        if t != "D":
            continue
        (n,) = struct.unpack_from("!h", p, 0)
        pos, row = 2, []
        for _ in range(n):
            (length,) = struct.unpack_from("!i", p, pos)
            pos += 4
            row.append(None if length < 0 else p[pos:pos + length])
            pos += max(length, 0)
        rows.append(row)
    return rows


def test_plain_columns_are_masked_in_the_exact_bytes_sent(masked: Proxy):
    replies = raw_query(masked, "alice", "SELECT id, email, phone, ssn, name FROM customers ORDER BY id")
    no_pii(b"".join(p for _, p in replies))
    assert data_rows(replies) == [
        [b"1", b"****@example.com", b"+1-******01", b"****", b"Ada"],
        [b"2", b"****@example.com", b"+1-******02", b"****", b"Grace"],
    ]


def test_the_ledger_records_which_columns_were_masked(masked: Proxy):
    raw_query(masked, "alice", "SELECT id, email, ssn FROM customers WHERE id = 2")


    def entry() -> dict | None:
        for line in masked.events_path.read_bytes().splitlines():
            e = orjson.loads(line)
            if e.get("statement") == "SELECT id, email, ssn FROM customers WHERE id = $1":
                return e
        return None

    wait_until(lambda: entry() is not None, what="the read's entry")
    assert entry()["completion"]["masked"] == ["email", "ssn"]


def test_each_group_sees_what_its_rule_allows(masked: Proxy):
    sql = "SELECT ssn FROM customers ORDER BY id"
    assert data_rows(raw_query(masked, "sam", sql)) == [[b"*******6789"], [b"*******4321"]]  # last four
    assert data_rows(raw_query(masked, "frida", sql)) == [[b"123-45-6789"], [b"987-65-4321"]]  # clear text
    assert data_rows(raw_query(masked, "copilot", sql)) == [[b"****"], [b"****"]]  # agents never see it


def test_star_and_table_star_with_psql(masked: Proxy):
    for sql in ("SELECT * FROM customers", "SELECT c.* FROM customers c JOIN orders o ON o.customer_id = c.id",
                "TABLE customers"):
        r = subprocess.run(["psql", "-X", "-At", masked.dsn("alice"), "-c", sql], capture_output=True)
        assert r.returncode == 0, r.stderr
        no_pii(r.stdout + r.stderr)
        assert b"****@example.com" in r.stdout


def test_extended_protocol_and_pipeline_with_psycopg(masked: Proxy):
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute("SELECT email, ssn FROM customers WHERE id = %s", [1]).fetchall()
        assert rows == [("****@example.com", "****")]
        with conn.pipeline():
            a = conn.execute("SELECT phone FROM customers WHERE id = %s", [2])
            b = conn.execute("SELECT email FROM customers WHERE id = %s", [2], binary=True)
        assert a.fetchall() == [("+1-******02",)] and b.fetchall() == [("****@example.com",)]
        cur = conn.execute("SELECT email FROM customers WHERE id = %s", [1], prepare=True)
        for _ in range(6):  # prepared: later executions have no Describe of their own
            assert conn.execute("SELECT email FROM customers WHERE id = %s", [1], prepare=True).fetchall() \
                == [("****@example.com",)]
        assert cur.fetchall() == [("****@example.com",)]


def test_binary_format_and_portals_fetched_in_pieces_with_asyncpg(masked: Proxy, postgres: Postgres):
    postgres.psql("ALTER TABLE customers ADD COLUMN tax_id numeric")  # "*.tax_id" is masked: redact -> 0
    postgres.psql("UPDATE customers SET tax_id = 424242 * id")

    async def run() -> tuple[list, list, list]:
        conn = await asyncpg.connect(host="127.0.0.1", port=masked.port, user="alice", password=TOKENS["alice"],
                                     database="app", ssl=False)
        try:
            rows = await conn.fetch("SELECT id, email, ssn, tax_id FROM customers ORDER BY id")
            async with conn.transaction():
                pieces = [r async for r in conn.cursor("SELECT email FROM customers ORDER BY id", prefetch=1)]
            frida = await asyncpg.connect(host="127.0.0.1", port=masked.port, user="frida",
                                          password=TOKENS["frida"], database="app", ssl=False)
            clear = await frida.fetch("SELECT tax_id FROM customers ORDER BY id")
            await frida.close()
            return rows, pieces, clear
        finally:
            await conn.close()

    try:
        rows, pieces, clear = asyncio.run(run())
    finally:
        postgres.psql("ALTER TABLE customers DROP COLUMN tax_id")
    assert [tuple(r) for r in rows] == [(1, "****@example.com", "****", decimal.Decimal(0)),
                                        (2, "****@example.com", "****", decimal.Decimal(0))]
    assert [r["email"] for r in pieces] == ["****@example.com", "****@example.com"]
    assert [r["tax_id"] for r in clear] == [decimal.Decimal(424242), decimal.Decimal(848484)]


BYPASSES = {
    "expression": "SELECT lower(email) FROM customers",
    "cast": "SELECT email::varchar FROM customers",
    "concatenation": "SELECT 'x' || ssn FROM customers",
    "substring": "SELECT substring(ssn from 1 for 3) FROM customers",
    "coalesce": "SELECT coalesce(phone, 'none') FROM customers",
    "case": "SELECT CASE WHEN ssn > '5' THEN 'high' ELSE 'low' END FROM customers",
    "string_agg": "SELECT string_agg(email, ',') FROM customers",
    "array_agg": "SELECT array_agg(ssn) FROM customers",
    "row_to_json": "SELECT row_to_json(c) FROM customers c",
    "to_jsonb star": "SELECT to_jsonb(c.*) FROM customers c",
    "json_build_object": "SELECT json_build_object('e', email) FROM customers",
    "union": "SELECT email FROM customers UNION SELECT 'x'",
    "intersect": "SELECT ssn FROM customers INTERSECT SELECT ssn FROM customers",
    "cte": "WITH x AS (SELECT email FROM customers) SELECT * FROM x",
    "subquery in from": "SELECT * FROM (SELECT ssn FROM customers) s",
    "scalar subquery": "SELECT (SELECT email FROM customers LIMIT 1)",
    "set-returning user function": "SELECT * FROM leak_emails()",
    "view over pii": "SELECT * FROM customer_contacts",
    "materialized view over pii": "SELECT * FROM customer_mv",
    "view passing whole rows": "SELECT j FROM customer_rows",
    "view probing a masked column": "SELECT * FROM customer_filter",
    "whole row": "SELECT c FROM customers c",
    "where probe": "SELECT id FROM customers WHERE ssn LIKE '1%'",
    "equality probe": "SELECT id FROM customers WHERE ssn = '123-45-6789'",
    "order by": "SELECT id FROM customers ORDER BY ssn",
    "group by": "SELECT count(*) FROM customers GROUP BY email",
    "join on masked": "SELECT a.id FROM customers a JOIN customers b ON a.ssn = b.ssn",
    "using": "SELECT id FROM customers JOIN customers c2 USING (email)",
    "natural join": "SELECT id FROM customers NATURAL JOIN customers",
    "exists probe": "SELECT 1 WHERE EXISTS (SELECT 1 FROM customers WHERE email LIKE 'a%')",
    "pg_stats": "SELECT most_common_vals FROM pg_stats WHERE tablename = 'customers'",
    "query_to_xml": "SELECT query_to_xml('SELECT * FROM customers', true, true, '')",
    "insert select copies clear values": "CREATE TABLE stolen AS SELECT email FROM customers",
    "select into": "SELECT email INTO stolen2 FROM customers",
    "copy binary": "COPY customers TO STDOUT WITH (FORMAT binary)",
    "copy query expression": "COPY (SELECT lower(email) FROM customers) TO STDOUT",
    "copy query probe": "COPY (SELECT id FROM customers WHERE ssn LIKE '1%') TO STDOUT",
    "returning expression": "UPDATE customers SET name = name WHERE id = 1 RETURNING lower(email)",
    "returning whole row": "UPDATE customers SET name = name WHERE id = 1 RETURNING customers",
    "update probe": "UPDATE customers SET name = name WHERE ssn LIKE '1%'",
    "unique probe on conflict": "INSERT INTO customers (id, name, email) VALUES (9, 'x', 'ada@example.com') "
                                "ON CONFLICT (email) DO NOTHING RETURNING id",
    "unique probe merge": "MERGE INTO customers c USING (SELECT 9 AS id) s ON c.id = s.id "
                          "WHEN NOT MATCHED THEN INSERT (id, name, email) VALUES (9, 'x', 'ada@example.com')",
    "cursor over expression": "DECLARE c CURSOR FOR SELECT upper(email) FROM customers",
    # found by a red-team pass: each of these returned or probed clear values before it was fixed
    "function-style column": "SELECT c.row_to_json FROM customers c",
    "function-style column, table name": "SELECT customers.to_json FROM customers",
    "function-style column in returning": "UPDATE customers SET name = name WHERE id = 1 RETURNING customers.row_to_json",
    "function-style column in copy": "COPY (SELECT c.row_to_json FROM customers c) TO STDOUT",
    "function-style column probe": "SELECT id FROM customers c WHERE c.to_jsonb->>'ssn' LIKE '123%'",
    "ts_stat runs sql text": "SELECT ts_stat('SELECT to_tsvector(''simple'', email) FROM customers')",
    "copy with encoding": "COPY (SELECT 'x' AS x, email, ssn FROM customers) TO STDOUT (ENCODING 'SJIS')",
    "copy star over join using": "COPY (SELECT * FROM customers c JOIN customers d USING (id)) TO STDOUT",
    "copy null string probe": "COPY (SELECT id, ssn FROM customers) TO STDOUT (NULL '123-45-6789')",
    "order by ordinal": "SELECT id, ssn FROM customers ORDER BY 2, 1",
    "order by ordinal over star": "SELECT * FROM customers ORDER BY 5",
    "order by output alias": "SELECT email AS name FROM customers ORDER BY name",
    "group by ordinal": "SELECT ssn, count(*) FROM customers GROUP BY 1",
    "distinct on ordinal": "SELECT DISTINCT ON (2) id, ssn FROM customers",
    "rename column": "ALTER TABLE customers RENAME COLUMN ssn TO s2",
    "rename table": "ALTER TABLE customers RENAME TO cust3",
    "set schema": "ALTER TABLE customers SET SCHEMA pg_temp",
    "returning whole row of another table": "UPDATE orders SET status = status FROM customers c"
                                            " WHERE c.id = orders.customer_id AND orders.id = 1 RETURNING c",
    # a second red-team pass
    "column aliases in from": "SELECT i, upper(e), s || '' FROM customers c(i, n, e, p, s)",
    "join column aliases": "SELECT upper(x) FROM (customers CROSS JOIN orders) AS j(a, b, x)",
    "cte name shadowing the table": "SELECT upper(email), ssn || '', (WITH customers AS (SELECT 1) SELECT 1)"
                                    " FROM customers",
    "cte name shadowing pg_stats": "SELECT histogram_bounds::text, (WITH pg_stats AS (SELECT 1) SELECT 1)"
                                   " FROM pg_stats WHERE tablename = 'customers'",
    "inherit": "ALTER TABLE customers INHERIT orders",
    "alter column type": "ALTER TABLE customers ALTER COLUMN ssn TYPE varchar(3)",
    "index on masked column": "CREATE INDEX cust_ssn ON customers (ssn)",
    "cluster": "CLUSTER customers USING customers_email",
    "rollup by ordinal": "SELECT ssn, id, count(*) FROM customers GROUP BY ROLLUP (1, 2)",
    "rollup by alias": "SELECT ssn AS s, count(*) FROM customers GROUP BY ROLLUP (s)",
    "plain distinct": "SELECT DISTINCT ssn, id FROM customers",
    "distinct star": "SELECT DISTINCT * FROM customers",
    "pg_notify": "SELECT pg_notify('leak', email) FROM customers",
    "do block raise": "DO $$ BEGIN RAISE NOTICE '%', (SELECT email FROM customers LIMIT 1); END $$",
    "trigger on a masked table": "CREATE TRIGGER t AFTER UPDATE ON customers FOR EACH ROW"
                                 " EXECUTE FUNCTION suppress_redundant_updates_trigger()",
}


@pytest.mark.parametrize("sql", list(BYPASSES.values()), ids=list(BYPASSES))
def test_every_bypass_class_is_refused_and_nothing_leaks(masked: Proxy, sql: str):
    replies = raw_query(masked, "alice", sql)
    no_pii(b"".join(p for _, p in replies))
    errors = [m.decode_error_fields(p) for t, p in replies if t == "E"]
    assert errors and errors[0]["C"] == "42501", replies
    assert errors[0]["M"].startswith(("dbguard refused the statement:", "dbguard denied the statement"))
    assert not [t for t, _ in replies if t == "D"]


def test_copy_to_stdout_is_masked_in_text_and_csv(masked: Proxy, postgres: Postgres):
    postgres.psql("UPDATE customers SET name = 'Ada, \"the\" first	one' WHERE id = 1")
    try:
        cases = {
            "COPY customers (id, email, ssn, name) TO STDOUT":
                "1\t****@example.com\t****\tAda, \"the\" first\\tone\n"
                "2\t****@example.com\t****\tGrace\n",
            "COPY (SELECT id, phone, email FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)":
                "id,phone,email\n1,\"+1-******01\",\"****@example.com\"\n2,\"+1-******02\",\"****@example.com\"\n",
            "COPY (SELECT name, ssn FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv, DELIMITER ';')":
                "\"Ada, \"\"the\"\" first\tone\";\"****\"\nGrace;\"****\"\n",
        }
        with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
            for sql, expected in cases.items():
                with conn.cursor().copy(sql) as copy:
                    got = b"".join(bytes(chunk) for chunk in copy).decode()
                assert sorted(got.splitlines()) == sorted(expected.splitlines()), (sql, got)  # COPY t: no order
        r = subprocess.run(["psql", "-X", masked.dsn("alice"), "-c", "COPY customers TO STDOUT"], capture_output=True)
        assert r.returncode == 0 and b"****@example.com" in r.stdout
        no_pii(r.stdout)
    finally:
        postgres.psql("UPDATE customers SET name = 'Ada' WHERE id = 1")


def test_returning_plain_columns_are_masked(masked: Proxy):
    replies = raw_query(masked, "alice", "UPDATE customers SET name = name WHERE id = 1 RETURNING id, email, ssn")
    assert data_rows(replies) == [[b"1", b"****@example.com", b"****"]]
    replies = raw_query(masked, "alice", "UPDATE customers SET name = name WHERE id = 2 RETURNING *")
    assert data_rows(replies) == [[b"2", b"Grace", b"****@example.com", b"+1-******02", b"****", b"250.50"]]


def test_views_and_columns_without_masked_data_still_work(masked: Proxy):
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        # a view over customers that reads no masked column (PostgreSQL still records a whole-table dependency)
        assert conn.execute("SELECT id, name FROM customer_names WHERE amount > 15 ORDER BY 1").fetchall() == [
            (1, "Ada"), (2, "Grace")]
        assert conn.execute("SELECT id, name FROM customers WHERE id = 1 ORDER BY name").fetchall() == [(1, "Ada")]
        assert conn.execute("SELECT count(*) FROM customers WHERE balance > 0").fetchone() == (2,)
        assert conn.execute("SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id"
                            " WHERE c.name = 'Ada' ORDER BY 1").fetchall() == [(1,), (2,)]


def test_writes_stay_possible_and_the_error_detail_is_masked(masked: Proxy, postgres: Postgres):
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (id, name, phone, ssn) VALUES (3, 'Linus', '+1-555-0100', '1')")
        conn.execute("UPDATE customers SET phone = '+1-555-0199', ssn = '111-22-3333' WHERE id = 3")
        assert postgres.psql("SELECT phone, ssn FROM customers WHERE id = 3").strip() == "+1-555-0199|111-22-3333"
        with pytest.raises(psycopg.errors.NotNullViolation) as exc:  # "Failing row contains (4, null, ...)"
            conn.execute("INSERT INTO customers (id, ssn) VALUES (4, '123-45-6789')")
        detail = exc.value.diag.message_detail or ""
        assert detail.startswith("Failing row contains (…)") and "123-45-6789" not in detail, detail
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as exc:  # values quoted in the message
            conn.execute("INSERT INTO customers (id, name) VALUES ('123-45-6789'::int, 'x')")
        assert str(exc.value).startswith('invalid input syntax for type integer: "…"'), str(exc.value)
        # email is masked and unique: whether a write of it succeeds would say whether the address exists
        for sql in ("INSERT INTO customers (id, name, email) VALUES (4, 'Dup', 'ada@example.com')",
                    "UPDATE customers SET email = 'ada@example.com' WHERE id = 3",
                    "COPY customers (id, name, email) FROM STDIN"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(sql)
            assert "customers.email is masked and must be unique" in str(exc.value), sql
        conn.execute("DELETE FROM customers WHERE id = 3")
    with psycopg.connect(masked.dsn("frida"), autocommit=True) as conn:  # fraud sees e-mail in clear: may write it
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO customers (id, name, email) VALUES (4, 'Dup', 'ada@example.com')")


def test_a_dba_with_masks_cannot_raise_values_from_a_do_block(masked: Proxy):
    sql = "DO $$ BEGIN RAISE NOTICE '%', (SELECT email FROM customers LIMIT 1); END $$"
    replies = raw_query(masked, "bob", sql)  # bob may run DO blocks by policy, but his columns are masked
    no_pii(b"".join(p for _, p in replies))
    assert [m.decode_error_fields(p)["C"] for t, p in replies if t == "E"] == ["42501"]


def test_a_masked_identity_can_still_create_a_function_with_a_dollar_quoted_body(masked: Proxy):
    with psycopg.connect(masked.dsn("bob"), autocommit=True) as conn:  # bob is masked too
        conn.execute("CREATE OR REPLACE FUNCTION one() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")
        conn.execute("DROP FUNCTION one()")


def test_frida_is_not_restricted(masked: Proxy):
    with psycopg.connect(masked.dsn("frida"), autocommit=True) as conn:
        assert conn.execute("SELECT lower(email) FROM customers ORDER BY id").fetchall() \
            == [("ada@example.com",), ("grace@example.com",)]


def test_a_table_created_after_start_is_masked_by_pattern(masked: Proxy, postgres: Postgres):
    postgres.psql("SET ROLE app; CREATE TABLE vendors (id int, tax_id text); "
                  "INSERT INTO vendors VALUES (1, 'DE-99-1234')")
    try:
        assert data_rows(raw_query(masked, "alice", "SELECT tax_id FROM vendors")) == [[b"****"]]
        replies = raw_query(masked, "alice", "SELECT upper(tax_id) FROM vendors")
        assert [m.decode_error_fields(p)["C"] for t, p in replies if t == "E"] == ["42501"]
    finally:
        postgres.psql("DROP TABLE vendors")


def test_hash_needs_a_key_and_lines_up_equal_values(pg: Postgres, tmp_path: pathlib.Path):
    policy = tmp_path / "hash.yaml"
    policy.write_text(EXAMPLE_MASKING.read_text().replace("strategy: email", "strategy: hash"))
    r = subprocess.run([sys.executable, "-m", "dbguard", "proxy", "--listen", "127.0.0.1:0", "--upstream", pg.app_url,
                        "--policy", str(policy), "--tokens", "examples/tokens.yaml"],
                       capture_output=True, text=True, timeout=30, cwd=pathlib.Path(__file__).parents[2])
    assert r.returncode == 2 and "--masking-key" in r.stderr
    key = tmp_path / "mask.key"
    key.write_text("0123456789abcdef-secret")
    proxy = start_proxy(pg, tmp_path, "--policy", str(policy), "--masking-key", str(key))
    try:
        pg.psql("INSERT INTO customers (id, name, email) VALUES (3, 'Ada2', 'ada@example.com')")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            rows = dict(conn.execute("SELECT id, email FROM customers").fetchall())
        assert rows[1] == rows[3] != rows[2] and rows[1].startswith("h:") and len(rows[1]) == 18
    finally:
        proxy.stop()


COMMENTS_POLICY = """apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata: {name: masked-by-comment}
spec:
  masking:
    - fromComments: true          # COMMENT ON COLUMN ... IS '... dbguard:mask=STRATEGY [option=value]'
      except: {groups: [dba]}
"""


def test_columns_can_be_declared_masked_by_their_comment(pg: Postgres, tmp_path: pathlib.Path):
    policy = tmp_path / "comments.yaml"
    policy.write_text(COMMENTS_POLICY)
    pg.psql("SET ROLE app; CREATE TABLE t_scratch (id int, secret text, hint text);"
            "INSERT INTO t_scratch VALUES (1, 'top-secret-1', 'abcdef');"
            "COMMENT ON COLUMN t_scratch.secret IS 'Launch codes. dbguard:mask=redact'")
    metrics_port = free_port()
    proxy = start_proxy(pg, tmp_path, "--policy", str(policy), "--metrics-listen", f"127.0.0.1:{metrics_port}")
    try:
        assert data_rows(raw_query(proxy, "alice", "SELECT id, secret, hint FROM t_scratch")) \
            == [[b"1", b"****", b"abcdef"]]
        assert metrics(metrics_port)["dbguard_masked_rows_total"] == 1
        assert data_rows(raw_query(proxy, "bob", "SELECT secret FROM t_scratch")) == [[b"top-secret-1"]]
        replies = raw_query(proxy, "alice", "SELECT upper(secret) FROM t_scratch")
        assert [m.decode_error_fields(p)["C"] for t, p in replies if t == "E"] == ["42501"]
        # a comment added later, through the proxy, takes effect at once
        raw_query(proxy, "bob", "COMMENT ON COLUMN t_scratch.hint IS 'dbguard:mask=partial keepFirst=2 keepLast=0'")
        assert data_rows(raw_query(proxy, "alice", "SELECT hint FROM t_scratch")) == [[b"ab****"]]
        assert metrics(metrics_port)['dbguard_refusals_total{rule="dbguard:mask-lineage"}'] == 1
    finally:
        proxy.stop()


def test_a_fromcomments_rule_takes_no_columns(tmp_path: pathlib.Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(COMMENTS_POLICY.replace("fromComments: true", "fromComments: true\n      columns: [x.y]"))
    r = subprocess.run([sys.executable, "-m", "dbguard", "check", "--policy", str(bad), "--identity", "alice",
                        "--sql", "SELECT 1"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "fromComments" in r.stderr and "bad.yaml:6:" in r.stderr, r.stderr  # with its line


def _execute(portal: str = "") -> bytes:
    body = portal.encode() + b"\x00" + struct.pack("!i", 0)
    return b"E" + struct.pack("!i", 4 + len(body)) + body


@pytest.mark.parametrize("executes", [["p2", "p1"], ["p2"]], ids=["out of order", "one of two"])
def test_copy_plans_follow_the_portal_not_the_order_of_binds(masked: Proxy, executes: list[str]):
    # found by review: plans were matched by order within the round trip
    raw = Raw(masked.port)
    try:
        raw.login("alice", TOKENS["alice"])
        raw.send(parse("s1", "COPY (SELECT id FROM customers) TO STDOUT")
                 + parse("s2", "COPY customers (id, email, ssn) TO STDOUT")
                 + m.encode_bind(statement="s1", portal="p1") + m.encode_bind(statement="s2", portal="p2")
                 + b"".join(_execute(p) for p in executes) + m.encode_sync())
        replies = raw.until_ready()
    finally:
        raw.close()
    no_pii(b"".join(p for _, p in replies))
    copied = b"".join(p for t, p in replies if t == "d")
    assert b"****@example.com" in copied


def test_a_result_from_uncommitted_ddl_closes_the_session_rather_than_hang(masked: Proxy):
    raw = Raw(masked.port)
    try:
        raw.login("alice", TOKENS["alice"])
        raw.send(m.encode_query("BEGIN; CREATE TABLE t_uncommitted (a int); INSERT INTO t_uncommitted VALUES (1)"))
        raw.until_ready()
        raw.send(m.encode_query("SELECT a FROM t_uncommitted"))
        raw.sock.settimeout(15)
        t, payload = raw.recv_message()
        while t != "E":
            t, payload = raw.recv_message()
        error = m.decode_error_fields(payload)
        assert error["S"] == "FATAL" and "commit the DDL first" in error["M"]
    finally:
        raw.close()


def test_what_a_dba_trigger_raises_never_carries_masked_values(masked: Proxy, postgres: Postgres):
    """Notices and errors a function RAISEs may hold values anywhere: withheld for masked identities,
    passed to identities that see clear text; the connection stays usable."""
    postgres.psql("SET ROLE app;" + TELL)  # a trigger a DBA wrote, not one a masked identity could create
    for name in ("Notice me", "Fail me"):
        replies = raw_query(masked, "alice", f"UPDATE customers SET name = '{name}' WHERE id = 1")
        no_pii(b"".join(p for _, p in replies))
        kinds = [t for t, _ in replies]
        assert ("N" if name == "Notice me" else "E") in kinds, replies
        said = m.decode_error_fields(next(p for t, p in replies if t in "NE"))
        assert said["M"].startswith("dbguard withheld the text of a message a database function raised")
        assert "D" not in said and kinds[-1] == "Z"
    replies = raw_query(masked, "frida", "UPDATE customers SET name = 'Notice me' WHERE id = 1")  # fraud: clear
    said = m.decode_error_fields(next(p for t, p in replies if t == "N"))
    assert said["M"] == "customer 1 has ssn 123-45-6789" and said["D"] == "ada@example.com"
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        conn.execute("UPDATE customers SET name = 'Ada' WHERE id = 1")
    postgres.psql("DROP TRIGGER tell ON customers")
