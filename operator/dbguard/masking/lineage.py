"""Can a masked value reach the client unmasked? Decided on the statement's parse tree, before it runs.

The server tells dbguard the origin (table OID, attribute number) of an output column only when
the column is a plain column reference; dbguard masks those on the wire. Everything else is
proven here or refused:

- A masked column may appear only as a plain column of the top-level SELECT's output
  (``SELECT email``, ``c.email``, ``*``, ``c.*``) over plain tables and joins, or of RETURNING. Any other use —
  in an expression, cast, function, aggregate, JSON builder, WHERE, JOIN condition, ORDER BY,
  GROUP BY, DISTINCT ON, set operation, CTE, subquery, or a source of INSERT ... SELECT
  / CREATE TABLE AS — is refused: it would either leak the value or probe it (``WHERE ssn LIKE
  '1%'``).
- A whole-row reference to a table with masked columns (``to_jsonb(c)``, ``row_to_json(c)``) is
  refused.
- Views and materialized views that read masked columns, functions defined outside the system
  catalog (dbguard cannot see what they return), data-exposing builtins (``query_to_xml``) and
  catalog views that hold column values (``pg_stats``) are refused.
- ``COPY ... TO STDOUT`` in text or CSV is masked row by row (dbguard.masking.copy); its query is
  judged like a SELECT; binary COPY of masked columns is refused.

Unqualified names are resolved conservatively: a column name that any table in the statement
masks counts as masked. The checker says why it refuses; it never guesses that something is safe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from pglast import ast, enums

from dbguard.analyze.pgparse import DANGEROUS_FUNCTIONS
from dbguard.analyze.pgparse import all_nodes as _nodes

# Catalog views and tables that show column values (most common values, histograms, extended stats).
VALUE_EXPOSING_CATALOG = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
                                    "pg_statistic_ext_data"})


@dataclasses.dataclass(frozen=True, slots=True)
class Schema:
    """What the checker needs to know about the database, for one identity."""

    masked_columns: Callable[[str | None, str], frozenset[str]]  # (schema or None, table) -> masked column names
    view_reaches_masked: Callable[[str | None, str], bool]  # a view/matview that reads masked columns
    is_user_function: Callable[[str], bool]  # defined outside pg_catalog: its result cannot be traced
    all_columns: Callable[[str | None, str], frozenset[str] | None]  # every column of a table; None if unknown
    # masked columns a unique index or exclusion constraint covers: writing one answers whether a value exists
    unique_masked: Callable[[str | None, str], frozenset[str]] = lambda schema, name: frozenset()


class Refused(Exception):
    """A masked column could reach the client in a form dbguard cannot mask."""


@dataclasses.dataclass(slots=True)
class _Table:
    schema: str | None
    name: str
    alias: str | None
    masked: frozenset[str]
    columns: frozenset[str] | None = None


# Builtins that run SQL text given as a string, or show any table's values.
SQL_TEXT_FUNCTIONS = frozenset({"ts_stat", "ts_rewrite"})
# Statements that would change which columns the name-based masking rules match.
_RENAMES = (ast.RenameStmt, ast.AlterObjectSchemaStmt)
# Statements that change a table's shape, order or ancestry.
_TABLE_CHANGES = (ast.AlterTableStmt, ast.IndexStmt, ast.ClusterStmt, ast.CreateStmt, ast.CreateStatsStmt,
                  ast.AlterDomainStmt, ast.CreateTrigStmt, ast.RuleStmt, ast.CreatePolicyStmt)


def _names(fields: tuple) -> list[str | None]:
    return [f.sval if isinstance(f, ast.String) else None for f in fields]  # None = A_Star


def _plain_outputs(stmt: ast.Node) -> set[int]:
    """ids of the ColumnRefs the server reports with their origin: the top-level SELECT's plain columns."""
    if isinstance(stmt, ast.DeclareCursorStmt | ast.PrepareStmt | ast.ExplainStmt):
        stmt = stmt.query  # FETCH and EXECUTE describe their rows like the query itself
    if isinstance(stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
        # RETURNING reports its plain columns' origin like a SELECT list does
        names = {n.alias.aliasname if n.alias else n.relname for n in _nodes(stmt) if isinstance(n, ast.RangeVar)}
        names |= {n.relname for n in _nodes(stmt) if isinstance(n, ast.RangeVar)}
        returning = stmt.returningClause.exprs if stmt.returningClause is not None else ()
        return {id(t.val) for t in returning or () if isinstance(t.val, ast.ColumnRef)
                and not (len(t.val.fields) == 1 and _names(t.val.fields)[0] in names)}
    if not isinstance(stmt, ast.SelectStmt) or stmt.op != enums.SetOperation.SETOP_NONE:
        return set()
    if stmt.withClause is not None or stmt.valuesLists or stmt.intoClause is not None:
        return set()
    if not all(_plain_from(item) for item in stmt.fromClause or ()):
        return set()
    tables = {name for item in stmt.fromClause or () for name in _from_names(item)}
    # `SELECT c FROM customers c` is a whole row (a record), not a plain column: not plain.
    return {id(t.val) for t in stmt.targetList or () if isinstance(t.val, ast.ColumnRef)
            and not (len(t.val.fields) == 1 and _names(t.val.fields)[0] in tables)}


def _from_names(item: Any) -> Iterator[str]:
    if isinstance(item, ast.RangeVar):
        yield item.alias.aliasname if item.alias else item.relname
    elif isinstance(item, ast.JoinExpr):
        yield from _from_names(item.larg)
        yield from _from_names(item.rarg)


def _plain_from(item: Any) -> bool:
    if isinstance(item, ast.RangeVar):
        return True
    if isinstance(item, ast.JoinExpr):
        return _plain_from(item.larg) and _plain_from(item.rarg)
    return False


def check(stmt: ast.Node, schema: Schema) -> None:
    """Raise ``Refused`` (with the reason) when a masked value could leave unmasked or be probed."""
    if isinstance(stmt, ast.DoStmt):
        raise Refused("a DO block runs code dbguard cannot see into (RAISE, NOTICE, dynamic SQL), and this identity "
                      "has masked columns")
    if isinstance(stmt, _RENAMES):
        raise Refused("renaming or moving tables, columns or schemas changes which columns the masking rules "
                      "match; an identity with masked columns cannot do it")
    nodes = list(_nodes(stmt))
    tables: list[_Table] = []
    for n in nodes:
        # A name that is also a CTE's counts as the table too: a CTE only covers its own scope, and
        # `(WITH customers AS (...) SELECT 1)` must not hide the real customers elsewhere.
        if isinstance(n, ast.RangeVar):
            name = n.relname
            if name in VALUE_EXPOSING_CATALOG:
                raise Refused(f"{name} shows column values, and this identity has masked columns")
            if schema.view_reaches_masked(n.schemaname, name):
                raise Refused(f"{name} is a view over masked columns; query the table itself")
            tables.append(_Table(n.schemaname, name, n.alias.aliasname if n.alias else None,
                                 schema.masked_columns(n.schemaname, name), schema.all_columns(n.schemaname, name)))
    masking = [t for t in tables if t.masked]
    for n in nodes:
        if isinstance(n, ast.FuncCall):
            fname = n.funcname[-1].sval
            if fname in DANGEROUS_FUNCTIONS or fname in SQL_TEXT_FUNCTIONS or "to_xml" in fname:
                raise Refused(f"{fname}() can expose any table's values, and this identity has masked columns")
            if schema.is_user_function(fname):
                raise Refused(f"{fname}() is defined in the database; dbguard cannot see whether it returns "
                              "masked values")
    if not masking:
        return
    if isinstance(stmt, _TABLE_CHANGES):
        # ALTER COLUMN TYPE to a checking domain, CHECK constraints, INHERIT / ATTACH PARTITION,
        # indexes and CLUSTER all turn stored values into errors, orderings or another origin.
        raise Refused(f"{type(stmt).__name__} on {masking[0].name}, which has masked columns, could expose or "
                      "probe them; an identity with masked columns cannot change it")
    if any(isinstance(n, ast.Alias) and n.colnames for n in nodes):
        raise Refused("column aliases in FROM (t(a, b, ...)) rename masked columns where dbguard cannot follow them")
    _check_unique_probe(stmt, schema)
    if isinstance(stmt, ast.CopyStmt):
        # COPY TO: the rows are masked by dbguard.masking.copy; its query is judged like a SELECT
        # (plain columns allowed). COPY FROM is a write; its WHERE filters input, not stored rows.
        if stmt.query is not None and not stmt.is_from:
            check(stmt.query, schema)
        return
    plain = _plain_outputs(stmt)
    _check_output_references(stmt, masking, tables)
    for n in nodes:
        if isinstance(n, ast.ColumnRef):
            _check_column_exists(_names(n.fields), masking)
            if id(n) not in plain:
                _check_ref(_names(n.fields), masking, tables)
        elif isinstance(n, ast.JoinExpr):
            if n.isNatural:
                raise Refused("a NATURAL JOIN with a table that has masked columns compares them")
            for f in n.usingClause or ():
                _check_ref([f.sval], masking, tables)


def _written_columns(stmt: ast.Node) -> Iterator[tuple[ast.RangeVar, set[str] | None]]:
    """(target table, columns written; None = every column) of an INSERT, UPDATE, MERGE or COPY FROM."""
    if isinstance(stmt, ast.InsertStmt):
        yield stmt.relation, {t.name for t in stmt.cols} if stmt.cols else None
    elif isinstance(stmt, ast.UpdateStmt):
        yield stmt.relation, {t.name for t in stmt.targetList or ()}
    elif isinstance(stmt, ast.MergeStmt):
        for clause in stmt.mergeWhenClauses or ():
            if clause.commandType == enums.CmdType.CMD_INSERT:
                yield stmt.relation, {t.name for t in clause.targetList} if clause.targetList else None
            elif clause.commandType == enums.CmdType.CMD_UPDATE:
                yield stmt.relation, {t.name for t in clause.targetList or ()}
    elif isinstance(stmt, ast.CopyStmt) and stmt.is_from and stmt.relation is not None:
        yield stmt.relation, {a.sval for a in stmt.attlist} if stmt.attlist else None


def _check_unique_probe(stmt: ast.Node, schema: Schema) -> None:
    """Writing a masked column that must be unique answers whether a value exists: the write fails
    (or ON CONFLICT takes the other branch) exactly when some row holds it."""
    for n in _nodes(stmt):
        if isinstance(n, ast.InsertStmt | ast.UpdateStmt | ast.MergeStmt | ast.CopyStmt):
            for target, written in _written_columns(n):
                unique = schema.unique_masked(target.schemaname, target.relname)
                hit = unique if written is None else unique & written
                if hit:
                    column = sorted(hit)[0]
                    raise Refused(f"{target.relname}.{column} is masked and must be unique: whether this write "
                                  "succeeds would tell whether the value exists; an identity that sees it masked "
                                  "cannot write it")


def _check_column_exists(names: list[str | None], masking: list[_Table]) -> None:
    """``c.row_to_json`` is not a column: PostgreSQL reads it as ``row_to_json(c)``, the whole row."""
    if len(names) < 2 or names[-1] is None:
        return
    for t in masking:
        if _matches(t, names[-2]) and t.columns is not None and names[-1] not in t.columns:
            raise Refused(f"{names[-2]}.{names[-1]} is not a column of {t.name}; PostgreSQL would read it as "
                          f"{names[-1]}({names[-2]}), over the whole row with its masked columns")


def _check_output_references(stmt: ast.Node, masking: list[_Table], tables: list[_Table]) -> None:
    """ORDER BY 2, GROUP BY 1, DISTINCT ON (2), an output alias, or plain DISTINCT over a masked
    column sorts or groups by it. (Items naming a column directly are checked with every other use.)"""
    if isinstance(stmt, ast.DeclareCursorStmt | ast.PrepareStmt | ast.ExplainStmt):
        stmt = stmt.query
    if not isinstance(stmt, ast.SelectStmt):
        return
    targets = list(stmt.targetList or ())
    aliases = {t.name: t for t in targets if t.name}
    has_star = any(isinstance(t.val, ast.ColumnRef) and _names(t.val.fields)[-1] is None for t in targets)
    referenced: list[Any] = []  # output columns the ordering, grouping or DISTINCT uses
    if stmt.distinctClause and any(d is None for d in stmt.distinctClause):
        referenced += targets  # plain DISTINCT sorts (or hashes) by every output column
    items = [getattr(s, "node", s) for s in stmt.sortClause or ()] + list(_grouping(stmt.groupClause)) + [
        d for d in stmt.distinctClause or () if d is not None]
    for item in items:
        if isinstance(item, ast.A_Const) and isinstance(item.val, ast.Integer):
            if has_star:
                raise Refused("ORDER BY, GROUP BY or DISTINCT ON by position over * may use a masked column")
            index = item.val.ival - 1
            if 0 <= index < len(targets):
                referenced.append(targets[index])
        elif isinstance(item, ast.ColumnRef) and len(item.fields) == 1 and _names(item.fields)[0] in aliases:
            referenced.append(aliases[_names(item.fields)[0]])
    for target in referenced:
        if isinstance(target.val, ast.ColumnRef):
            try:
                _check_ref(_names(target.val.fields), masking, tables)
            except Refused as exc:
                raise Refused(f"ordering, grouping or DISTINCT by an output column that is masked: {exc}") from None


def _grouping(items: Any) -> Iterator[Any]:
    """GROUP BY items, with ROLLUP / CUBE / GROUPING SETS opened up."""
    for item in items or ():
        if isinstance(item, ast.GroupingSet):
            yield from _grouping(item.content)
        else:
            yield item


def _matches(t: _Table, qualifier: str) -> bool:
    return qualifier in (t.alias, t.name) if t.alias is None else qualifier == t.alias


def _check_ref(names: list[str | None], masking: list[_Table], tables: list[_Table]) -> None:
    column = names[-1]
    qualifier = names[-2] if len(names) >= 2 else None
    if qualifier is None:
        if column is None:  # a bare * outside the plain output: every column, masked ones included
            raise Refused(f"* over {masking[0].name}, which has masked columns, is used where it cannot be masked")
        for t in masking:
            if column in t.masked:
                raise Refused(f"{t.name}.{column} is masked and cannot be used in an expression, predicate, "
                              "ordering or grouping")
            if column == (t.alias or t.name):
                raise Refused(f"the whole row of {t.name} includes masked columns")
        return
    candidates = [t for t in masking if _matches(t, qualifier)]
    if not candidates and not any(_matches(t, qualifier) for t in tables):
        candidates = masking  # a CTE, subquery or function alias: it may carry any masked column
    for t in candidates:
        if column is None:
            raise Refused(f"{qualifier}.* includes masked columns of {t.name} where they cannot be masked")
        if column in t.masked:
            raise Refused(f"{t.name}.{column} is masked and cannot be used in an expression, predicate, "
                          "ordering or grouping")
