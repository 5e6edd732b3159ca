"""Statement facts from PostgreSQL's grammar: tables of SQL -> expected facts."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard.analyze import AnalysisError, analyze, cache_key
from dbguard.analyze.facts import Flag


def actions(sql: str) -> set[tuple]:
    return {(a.operation, a.object_type, a.schema, a.name, a.columns, a.where.value, a.nested)
            for f in analyze(sql) for a in f.actions}


def flags(sql: str) -> set[str]:
    return {fl.value for f in analyze(sql) for fl in f.flags}


@pytest.mark.parametrize("sql, expected", [
    # DML
    ("DELETE FROM orders", {("DELETE", "", "", "orders", (), "absent", False)}),
    ("DELETE FROM shop.orders WHERE id = 3", {("DELETE", "", "shop", "orders", (), "present", False)}),
    ("UPDATE customers SET balance = 0, name = 'x' WHERE id = 1",
     {("UPDATE", "", "", "customers", ("balance", "name"), "present", False)}),
    ("INSERT INTO orders (customer_id, amount) VALUES (1, 2)",
     {("INSERT", "", "", "orders", ("customer_id", "amount"), "n/a", False)}),
    ("INSERT INTO orders VALUES (1, 2)", {("INSERT", "", "", "orders", ("*",), "n/a", False)}),
    ("TRUNCATE a, b.c", {("TRUNCATE", "TABLE", "", "a", (), "n/a", False),
                         ("TRUNCATE", "TABLE", "b", "c", (), "n/a", False)}),
    # trivial WHERE, judged without looking at constants
    ("DELETE FROM t WHERE 1 = 1", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE true", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE 1 = 2", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE id = id", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE id = 4 OR true", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE NOT false", {("DELETE", "", "", "t", (), "trivial", False)}),
    ("DELETE FROM t WHERE id = 4 AND 1 = 1", {("DELETE", "", "", "t", (), "present", False)}),
    # quoting, Unicode escapes, comments, dollar quoting
    ('DELETE FROM "Orders"', {("DELETE", "", "", "Orders", (), "absent", False)}),
    ('DELETE FROM U&"\\006Frders"', {("DELETE", "", "", "orders", (), "absent", False)}),
    ("/* hi */ DELETE -- x\n FROM orders", {("DELETE", "", "", "orders", (), "absent", False)}),
    # CTE, EXPLAIN, PREPARE, RULE: nested effects
    ("WITH x AS (DELETE FROM orders RETURNING *) SELECT * FROM x",
     {("DELETE", "", "", "orders", (), "absent", True)}),
    ("EXPLAIN ANALYZE UPDATE t SET a = 1", {("UPDATE", "", "", "t", ("a",), "absent", True)}),
    ("PREPARE p AS DELETE FROM orders", {("DELETE", "", "", "orders", (), "absent", True)}),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM orders",
     {("CREATE", "RULE", "", "t", (), "n/a", False), ("DELETE", "", "", "orders", (), "absent", True)}),
    # DDL
    ("DROP TABLE a.b, c", {("DROP", "TABLE", "a", "b", (), "n/a", False), ("DROP", "TABLE", "", "c", (), "n/a", False)}),
    ("DROP SCHEMA s CASCADE", {("DROP", "SCHEMA", "", "s", (), "n/a", False)}),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", {("CREATE", "INDEX", "", "i", (), "n/a", False)}),
    ("SELECT * INTO newt FROM orders", {("CREATE", "TABLE", "", "newt", (), "n/a", False),
                                        ("SELECT", "", "", "orders", ("*",), "n/a", False)}),
    ("COPY orders TO STDOUT", {("COPY", "TABLE", "", "orders", ("*",), "n/a", False),
                               ("SELECT", "", "", "orders", ("*",), "n/a", False)}),
    # reads, attributed to tables through aliases
    ("SELECT c.email, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id",
     {("SELECT", "", "", "customers", ("email", "id"), "n/a", False),
      ("SELECT", "", "", "orders", ("amount", "customer_id"), "n/a", False)}),
])
def test_actions(sql, expected):
    assert actions(sql) == expected


@pytest.mark.parametrize("sql, expected", [
    # functions
    ("SELECT pg_read_file('/etc/passwd')", {"dangerous_function", "server_file_access"}),
    ("SELECT pg_catalog.pg_terminate_backend(1)", {"dangerous_function"}),
    ("SELECT * FROM dblink('x', 'select 1') AS t(a int)", {"dangerous_function"}),
    ("SELECT lo_export(1, '/tmp/x')", {"dangerous_function", "server_file_access"}),
    ("SELECT query_to_xml('delete from t', true, true, '')", {"dangerous_function"}),
    ("SELECT pg_notify('c', 'x')", {"notify"}),
    # settings
    ("SET standard_conforming_strings = off", {"setting_change", "unsafe_setting"}),
    ("SET standard_conforming_strings = on", {"setting_change"}),
    ("SELECT set_config('standard_conforming_strings', 'off', false)", {"setting_change", "unsafe_setting"}),
    ("SELECT set_config('jit', 'off', false)", {"setting_change"}),  # asyncpg's type introspection
    ("SELECT set_config('jit', $1, false)", {"setting_change"}),  # ... and its restore
    ("SELECT set_config('client_encoding', $1, false)", {"dangerous_function", "setting_change", "unsafe_setting"}),
    ("SELECT set_config('Standard_Conforming_Strings', $1, false)",
     {"dangerous_function", "setting_change", "unsafe_setting"}),
    ("SELECT set_config(current_user, 'x', false)", {"dangerous_function", "setting_change", "unsafe_setting"}),
    ("SET NAMES 'SJIS'", {"setting_change", "unsafe_setting"}),
    ("SET client_encoding = 'utf-8'", {"setting_change"}),
    ("SET ROLE postgres", {"setting_change", "role_change"}),
    ("SET SESSION AUTHORIZATION postgres", {"setting_change", "role_change"}),
    ("ALTER ROLE app SET standard_conforming_strings = off", {"setting_change", "unsafe_setting"}),
    ("ALTER SYSTEM SET work_mem = '1GB'", {"alter_system", "setting_change"}),
    ("LOAD 'auto_explain'", {"load"}),
    # server escape hatches
    ("COPY orders TO '/tmp/x.csv'", {"server_file_access"}),
    ("COPY orders FROM PROGRAM 'curl x'", {"server_file_access"}),
    ("DO $$ BEGIN DELETE FROM orders; END $$", {"dynamic_sql"}),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$", {"dynamic_sql"}),
    ("EXPLAIN ANALYZE SELECT 1", {"explain_analyze"}),
    ("EXPLAIN (ANALYZE false) SELECT 1", set()),
    ("EXPLAIN SELECT 1", set()),
    ("BEGIN", {"transaction_control"}),
    ("LOCK TABLE t", {"lock"}),
    ("SELECT * FROM t FOR UPDATE", {"lock"}),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", {"concurrently"}),
])
def test_flags(sql, expected):
    assert flags(sql) == expected


def test_every_statement_of_a_multi_statement_string_is_analyzed():
    facts = analyze("SELECT 1; DROP TABLE t; UPDATE x SET a = 1")
    assert [f.command for f in facts] == ["SELECT", "DROP", "UPDATE"]
    assert [f.text for f in facts] == ["SELECT 1", "DROP TABLE t", "UPDATE x SET a = 1"]


def test_prepare_execute_and_deallocate_carry_the_name():
    assert analyze("PREPARE q(int) AS SELECT 1")[0].prepared_name == "q"
    execute = analyze("EXECUTE q(1)")[0]
    assert execute.prepared_name == "q" and Flag.EXECUTE in execute.flags
    assert analyze("DEALLOCATE q")[0].prepared_name == "q"
    assert analyze("DEALLOCATE ALL")[0].prepared_name == ""
    nested = analyze("CREATE TABLE x AS EXECUTE q(1)")[0]  # judged on q's body, and named in errors
    assert nested.prepared_name == "q" and Flag.EXECUTE in nested.flags
    assert analyze("EXPLAIN ANALYZE EXECUTE q(1)")[0].prepared_name == "q"


@pytest.mark.parametrize("sql, sqlstate", [
    ("SELEKT 1", "42601"),
    ("SELECT 'unterminated", "42601"),
    ("DELETE FROM", "42601"),
])
def test_unparseable_statements_raise_42601(sql, sqlstate):
    with pytest.raises(AnalysisError) as exc:
        analyze(sql)
    assert exc.value.sqlstate == sqlstate


def test_unknown_statement_kinds_are_refused_not_guessed():
    with pytest.raises(AnalysisError, match="cannot judge statement kind CreateOpFamilyStmt") as exc:
        analyze("SELECT 1; CREATE OPERATOR FAMILY f USING btree")
    assert exc.value.sqlstate == "0A000"


def test_empty_and_comment_only_strings_have_no_statements():
    assert analyze("") == ()
    assert analyze("-- nothing\n/* at all */") == ()


# -- the cache contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "SELECT abalance FROM pgbench_accounts WHERE aid = 98"),
    ("DELETE FROM t WHERE 1 = 1", "DELETE FROM t WHERE 1 = 2"),
    ("UPDATE t SET a = 'x' WHERE id = 3", "UPDATE t SET a = 'yy' WHERE id = 4"),
])
def test_cacheable_facts_do_not_depend_on_literals(a, b):
    fa, fb = analyze(a)[0], analyze(b)[0]
    assert cache_key(a) == cache_key(b)
    assert fa.cacheable and fb.cacheable
    assert fa.to_dict() | {"fingerprint": ""} == fb.to_dict() | {"fingerprint": ""}


@pytest.mark.parametrize("sql", [
    "SET standard_conforming_strings = on",
    "SELECT set_config('x.y', 'z', false)",
    "SET ROLE app",
    "SET client_encoding = 'UTF8'",
])
def test_literal_sensitive_statements_are_not_cacheable(sql):
    assert not analyze(sql)[0].cacheable


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_facts_or_an_analysis_error(text):
    try:
        result = analyze(text)
    except AnalysisError as exc:
        assert exc.sqlstate in ("42601", "0A000")
        return
    assert isinstance(result, tuple)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["SELECT", "DELETE FROM t WHERE", "UPDATE t SET a =", "SELECT 1;", "DROP TABLE", "--", "/*",
                        "$$", "'", "\"", "U&\"", ";", "WITH x AS (", ")", "(", "E'\\'", " ", "1", "a", "*"]).map(str)
       .flatmap(lambda w: st.lists(st.just(w) | st.sampled_from(["x", " ", ";", "'", "1=1"]), max_size=12))
       .map("".join))
def test_sql_like_fragments_never_crash_the_analyzer(text):
    with contextlib.suppress(AnalysisError):
        analyze(text)
