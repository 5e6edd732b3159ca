"""SQL text -> StatementFacts, with PostgreSQL's own parser (libpg_query through pglast).

Every statement kind the analyzer understands is listed in ``_COMMANDS``; anything else is refused
(``AnalysisError`` 0A000) rather than guessed. Within a statement, a generic walk visits every
node, so a write, a function call or a table hidden anywhere (CTE, subquery, EXPLAIN, PREPARE,
rule action) is found whatever expression it sits in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pglast
from pglast import ast, enums
from pglast import parser as pgparser
from pglast.stream import RawStream

from dbguard.analyze.facts import Action, AnalysisError, Flag, Setting, StatementFacts, Where, is_utf8

# Functions that read or write server files, run SQL text, reach other servers, or act on other
# sessions and the server itself. Matched on the unqualified name.
DANGEROUS_FUNCTIONS = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir",
    "pg_ls_replslotdir", "lo_import", "lo_export", "lo_from_bytea", "lo_put", "lo_unlink",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_create_logical_replication_slot", "pg_create_physical_replication_slot", "pg_drop_replication_slot",
    "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes", "pg_logical_slot_get_binary_changes",
    "pg_replication_slot_advance", "pg_switch_wal", "pg_file_write", "pg_file_unlink", "pg_file_rename",
    "pg_file_sync", "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema", "cursor_to_xml",
    "cursor_to_xmlschema", "table_to_xml", "table_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xml_and_xmlschema",
    "pg_advisory_lock", "pg_backup_start", "pg_backup_stop", "pg_create_restore_point",
    "pg_import_system_collations", "pg_sleep_for", "pg_sleep_until", "ts_stat", "ts_rewrite",
    # WAL and logical decoding: a message in the WAL could pose as dbguard's row-evidence marker
    "pg_logical_emit_message", "pg_logical_slot_peek_binary_changes", "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot", "pg_replication_origin_create", "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_setup", "pg_replication_origin_advance",
})
FILE_FUNCTIONS = frozenset({"lo_import", "lo_export", "pg_read_file", "pg_read_binary_file", "pg_file_write"})

# Statement node -> command verb. Not in this table: not understood, refused.
_COMMANDS: dict[str, str] = {
    "SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE", "TruncateStmt": "TRUNCATE", "CopyStmt": "COPY", "ExplainStmt": "EXPLAIN",
    "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE",
    "TransactionStmt": "TRANSACTION", "VariableSetStmt": "SET", "VariableShowStmt": "SHOW",
    "DiscardStmt": "DISCARD", "DeclareCursorStmt": "DECLARE", "FetchStmt": "FETCH", "ClosePortalStmt": "CLOSE",
    "LockStmt": "LOCK", "NotifyStmt": "NOTIFY", "ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN",
    "DoStmt": "DO", "CallStmt": "CALL", "LoadStmt": "LOAD", "AlterSystemStmt": "ALTER SYSTEM",
    "VacuumStmt": "VACUUM", "ClusterStmt": "CLUSTER", "ReindexStmt": "REINDEX", "CheckPointStmt": "CHECKPOINT",
    "RefreshMatViewStmt": "REFRESH", "CommentStmt": "COMMENT", "SecLabelStmt": "SECURITY LABEL",
    "GrantStmt": "GRANT", "GrantRoleStmt": "GRANT", "AlterDefaultPrivilegesStmt": "ALTER",
    "CreateStmt": "CREATE", "CreateTableAsStmt": "CREATE", "ViewStmt": "CREATE", "IndexStmt": "CREATE",
    "CreateSchemaStmt": "CREATE", "CreateSeqStmt": "CREATE", "CreatedbStmt": "CREATE", "CreateRoleStmt": "CREATE",
    "CreateFunctionStmt": "CREATE", "CreateTrigStmt": "CREATE", "CreateEventTrigStmt": "CREATE",
    "CreateExtensionStmt": "CREATE", "CreateDomainStmt": "CREATE", "CompositeTypeStmt": "CREATE",
    "CreateEnumStmt": "CREATE", "CreateRangeStmt": "CREATE", "DefineStmt": "CREATE", "CreatePolicyStmt": "CREATE",
    "CreateStatsStmt": "CREATE", "CreateCastStmt": "CREATE", "CreateConversionStmt": "CREATE",
    "CreateForeignTableStmt": "CREATE", "CreateFdwStmt": "CREATE", "CreateForeignServerStmt": "CREATE",
    "CreateUserMappingStmt": "CREATE", "CreatePublicationStmt": "CREATE", "CreateSubscriptionStmt": "CREATE",
    "CreateTableSpaceStmt": "CREATE", "CreateOpClassStmt": "CREATE", "CreatePLangStmt": "CREATE",
    "RuleStmt": "CREATE", "CreateTransformStmt": "CREATE", "CreateAmStmt": "CREATE",
    "AlterTableStmt": "ALTER", "AlterSeqStmt": "ALTER", "AlterRoleStmt": "ALTER", "AlterRoleSetStmt": "ALTER",
    "AlterDatabaseStmt": "ALTER", "AlterDatabaseSetStmt": "ALTER", "AlterDomainStmt": "ALTER",
    "AlterEnumStmt": "ALTER", "AlterFunctionStmt": "ALTER", "AlterObjectSchemaStmt": "ALTER",
    "AlterOwnerStmt": "ALTER", "AlterPolicyStmt": "ALTER", "AlterExtensionStmt": "ALTER", "RenameStmt": "ALTER",
    "AlterPublicationStmt": "ALTER", "AlterSubscriptionStmt": "ALTER", "AlterTableSpaceOptionsStmt": "ALTER",
    "AlterStatsStmt": "ALTER", "AlterEventTrigStmt": "ALTER", "AlterTypeStmt": "ALTER",
    "AlterCollationStmt": "ALTER", "AlterDatabaseRefreshCollStmt": "ALTER", "AlterForeignServerStmt": "ALTER",
    "AlterFdwStmt": "ALTER", "AlterUserMappingStmt": "ALTER", "AlterOperatorStmt": "ALTER",
    "AlterTSConfigurationStmt": "ALTER", "AlterTSDictionaryStmt": "ALTER", "AlterExtensionContentsStmt": "ALTER",
    "AlterTableMoveAllStmt": "ALTER", "AlterObjectDependsStmt": "ALTER",
    "DropStmt": "DROP", "DropdbStmt": "DROP", "DropRoleStmt": "DROP", "DropOwnedStmt": "DROP",
    "DropTableSpaceStmt": "DROP", "DropUserMappingStmt": "DROP", "DropSubscriptionStmt": "DROP",
    "ReassignOwnedStmt": "REASSIGN OWNED", "ConstraintsSetStmt": "SET", "ImportForeignSchemaStmt": "IMPORT",
}

# The object type each CREATE/ALTER/DROP node acts on, where the node itself does not say.
_OBJECT_TYPES: dict[str, str] = {
    "CreateStmt": "TABLE", "IndexStmt": "INDEX", "ViewStmt": "VIEW", "CreateSchemaStmt": "SCHEMA",
    "CreateSeqStmt": "SEQUENCE", "CreatedbStmt": "DATABASE", "CreateRoleStmt": "ROLE",
    "CreateTrigStmt": "TRIGGER", "CreateEventTrigStmt": "EVENT TRIGGER", "CreateExtensionStmt": "EXTENSION",
    "CreateDomainStmt": "DOMAIN", "CompositeTypeStmt": "TYPE", "CreateEnumStmt": "TYPE", "CreateRangeStmt": "TYPE",
    "CreatePolicyStmt": "POLICY", "CreateStatsStmt": "STATISTICS", "CreateForeignTableStmt": "FOREIGN TABLE",
    "CreatePublicationStmt": "PUBLICATION", "CreateSubscriptionStmt": "SUBSCRIPTION", "RuleStmt": "RULE",
    "CreateTableSpaceStmt": "TABLESPACE", "AlterSeqStmt": "SEQUENCE", "AlterRoleStmt": "ROLE",
    "AlterRoleSetStmt": "ROLE", "AlterDatabaseStmt": "DATABASE", "AlterDatabaseSetStmt": "DATABASE",
    "DropdbStmt": "DATABASE", "DropRoleStmt": "ROLE", "DropTableSpaceStmt": "TABLESPACE",
    "AlterPolicyStmt": "POLICY", "AlterExtensionStmt": "EXTENSION", "AlterDomainStmt": "DOMAIN",
    "AlterEnumStmt": "TYPE", "AlterFunctionStmt": "FUNCTION",
}

_DML = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_TRUE_WORDS = frozenset({"on", "true", "1", "yes", "y", "t", "tr", "tru", "o"})
# Settings whose values change how the server reads SQL text compared with dbguard's parser.
_READ_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding"})


def recorded_text(sql: str) -> str:
    """The statement as the audit ledger keeps it: no constant values and no comments.

    libpg_query's normalization replaces the constants of plannable statements with ``$n``; the
    constants it leaves (in PREPARE bodies, utility options such as COPY's NULL string) are
    replaced with ``'…'`` here, and deparsing drops comments. Identifiers are kept.
    """
    try:
        tree = pglast.parse_sql(pgparser.normalize(sql))
        for node in all_nodes(tree):
            if isinstance(node, ast.A_Const) and not node.isnull:
                node.val = ast.String(sval="…")
            elif isinstance(node, ast.DefElem) and isinstance(node.arg, ast.String) and node.defname in (
                    "null", "default", "delimiter", "quote", "escape"):
                node.arg = ast.String(sval="…")
        return RawStream()(tree)
    except Exception:  # noqa: BLE001 - never record what could not be cleaned
        return "<statement text withheld: dbguard could not remove its constants>"


def all_nodes(value: Any) -> Iterator[ast.Node]:
    """Every node below ``value`` (a node, or a tuple/list of them), depth first, itself included."""
    if isinstance(value, tuple | list):
        for item in value:
            yield from all_nodes(item)
    elif isinstance(value, ast.Node):
        yield value
        for child in _children(value):
            yield from all_nodes(child)


def cache_key(sql: str) -> str:
    """The statement text with every constant replaced by ``$n`` (libpg_query's normalization)."""
    return pgparser.normalize(sql)


@dataclasses.dataclass
class _Collector:
    """What one statement's walk finds."""

    actions: list[Action] = dataclasses.field(default_factory=list)
    functions: list[str] = dataclasses.field(default_factory=list)
    settings: list[Setting] = dataclasses.field(default_factory=list)
    flags: set[Flag] = dataclasses.field(default_factory=set)
    ctes: set[str] = dataclasses.field(default_factory=set)
    objects: set[int] = dataclasses.field(default_factory=set)  # ids of RangeVars acted on, not read
    literal_sensitive: bool = False
    executed: str = ""  # the prepared statement an EXECUTE (possibly nested: CREATE TABLE AS EXECUTE) runs

    def act(self, **kw: Any) -> None:
        action = Action(**kw)
        if action not in self.actions:
            self.actions.append(action)


def analyze(sql: str) -> tuple[StatementFacts, ...]:
    """Facts of every statement in ``sql``; raises AnalysisError when it cannot be judged."""
    try:
        raw_statements = pglast.parse_sql(sql)
    except pgparser.ParseError as exc:
        pos = exc.location if isinstance(getattr(exc, "location", None), int) else None
        raise AnalysisError(f"{exc.args[0] if exc.args else exc}", sqlstate="42601", position=pos) from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure means: cannot judge
        raise AnalysisError(f"cannot parse statement: {exc}", sqlstate="42601") from exc
    encoded = sql.encode("utf-8")  # libpg_query reports byte offsets
    facts: list[StatementFacts] = []
    try:
        for raw in raw_statements:
            start = raw.stmt_location or 0
            end = start + raw.stmt_len if raw.stmt_len else len(encoded)
            text = encoded[start:end].decode("utf-8", "replace").strip()
            facts.append(_statement_facts(raw.stmt, text))
    except RecursionError as exc:
        # The walk recurses with the tree; PostgreSQL nests deeper than Python's stack allows.
        raise AnalysisError("the statement is nested too deeply for dbguard to judge", sqlstate="54001") from exc
    return tuple(facts)


def _statement_facts(stmt: ast.Node, text: str) -> StatementFacts:
    kind = type(stmt).__name__
    command = _COMMANDS.get(kind)
    if command is None:
        raise AnalysisError(f"dbguard cannot judge statement kind {kind}", sqlstate="0A000")
    c = _Collector()
    _visit_statement(stmt, c, nested=False)
    prepared_name = ""
    if kind == "PrepareStmt":
        prepared_name = stmt.name or ""
    elif Flag.EXECUTE in c.flags:
        prepared_name = c.executed  # EXECUTE p, also inside CREATE TABLE AS / EXPLAIN
    elif kind == "DeallocateStmt":
        prepared_name = "" if getattr(stmt, "isall", False) else (stmt.name or "")
    cursor_name = (stmt.portalname or "") if kind in ("DeclareCursorStmt", "ClosePortalStmt") else ""
    try:
        fingerprint = pgparser.fingerprint(text) if text else ""
    except Exception:  # noqa: BLE001 - a fingerprint is informative, never decisive
        fingerprint = ""
    cacheable = (kind in ("SelectStmt", *_DML) and not c.literal_sensitive and not c.settings
                 and not c.flags & {Flag.SETTING_CHANGE, Flag.UNSAFE_SETTING, Flag.ROLE_CHANGE}) or _literal_free(text)
    return StatementFacts(
        text=text, kind=kind, command=command, actions=tuple(c.actions), functions=tuple(dict.fromkeys(c.functions)),
        settings=tuple(c.settings), flags=tuple(sorted(c.flags, key=lambda f: f.value)),
        prepared_name=prepared_name, fingerprint=fingerprint, cacheable=cacheable, cursor_name=cursor_name,
    )


def _literal_free(text: str) -> bool:
    """A statement without a single constant: its normalized text is itself, so any facts may be reused."""
    try:
        return bool(text) and pgparser.normalize(text) == text
    except Exception:  # noqa: BLE001
        return False


# -- the walk -------------------------------------------------------------------------------------


def _children(node: ast.Node) -> Iterator[Any]:
    for name in node:
        value = getattr(node, name)
        if isinstance(value, ast.Node | tuple | list):
            yield value


def _walk(value: Any, c: _Collector, nested: bool) -> None:
    """Visit every node below ``value``; statements found inside are nested effects."""
    if isinstance(value, tuple | list):
        for item in value:
            _walk(item, c, nested)
        return
    if not isinstance(value, ast.Node):
        return
    name = type(value).__name__
    if name in _COMMANDS:
        _visit_statement(value, c, nested=True)
        return
    if name == "FuncCall":
        _visit_funccall(value, c)
    elif name == "RangeVar":
        if id(value) not in c.objects and not (value.schemaname is None and value.relname in c.ctes):
            c.act(operation="SELECT", schema=value.schemaname or "", name=value.relname, nested=nested)
    elif name == "CommonTableExpr":
        c.ctes.add(value.ctename)
    for child in _children(value):
        _walk(child, c, nested)


def _rangevar(rv: Any, c: _Collector | None = None) -> tuple[str, str]:
    """Schema and name of a RangeVar; with ``c``, also mark it as the object acted on (not a read)."""
    if rv is None:
        return "", ""
    if c is not None:
        c.objects.add(id(rv))
    return rv.schemaname or "", rv.relname


def _qualified(names: Any) -> tuple[str, str]:
    parts = [n.sval for n in names if isinstance(n, ast.String)] if isinstance(names, tuple | list) else []
    if not parts:
        return "", ""
    return (".".join(parts[:-1]), parts[-1])


def _visit_statement(stmt: ast.Node, c: _Collector, *, nested: bool) -> None:
    kind = type(stmt).__name__
    handler = _HANDLERS.get(kind)
    if handler is not None:
        handler(stmt, c, nested)
    else:
        _visit_ddl(stmt, c, nested)


def _visit_select(stmt: Any, c: _Collector, nested: bool) -> None:
    if stmt.withClause is not None:
        for cte in stmt.withClause.ctes or ():
            c.ctes.add(cte.ctename)
    if stmt.intoClause is not None:
        c.flags.add(Flag.SELECT_INTO)
        schema, name = _rangevar(stmt.intoClause.rel, c)
        c.act(operation="CREATE", object_type="TABLE", schema=schema, name=name, nested=nested)
    if stmt.lockingClause:
        c.flags.add(Flag.LOCK)
    for child in _children(stmt):
        _walk(child, c, nested)
    _attribute_columns(stmt, c, nested)


def _attribute_columns(stmt: Any, c: _Collector, nested: bool) -> None:
    """Columns read, attributed to tables where the statement makes that possible."""
    tables: dict[str, tuple[str, str]] = {}
    for item in stmt.fromClause or ():
        for rv in _rangevars_in_from(item):
            tables[rv.alias.aliasname if rv.alias else rv.relname] = _rangevar(rv)
    if not tables:
        return
    cols: dict[tuple[str, str], list[str]] = {}
    joins = [item.quals for item in stmt.fromClause or () if isinstance(item, ast.JoinExpr)]
    for ref in _column_refs(stmt.targetList, stmt.whereClause, stmt.groupClause, stmt.havingClause,
                            stmt.sortClause, joins):
        fields = ref.fields
        if isinstance(fields[-1], ast.A_Star):
            col = "*"
            qual = [f.sval for f in fields[:-1] if isinstance(f, ast.String)]
        else:
            col = fields[-1].sval if isinstance(fields[-1], ast.String) else ""
            qual = [f.sval for f in fields[:-1] if isinstance(f, ast.String)]
        if qual:
            target = tables.get(qual[-1])
            if target is not None:
                cols.setdefault(target, []).append(col)
        elif len(tables) == 1 or col == "*":
            for target in tables.values():
                cols.setdefault(target, []).append(col)
    for (schema, name), columns in cols.items():
        plain = Action(operation="SELECT", schema=schema, name=name, nested=nested)
        if plain in c.actions:
            c.actions[c.actions.index(plain)] = dataclasses.replace(plain, columns=tuple(sorted(set(columns))))


def _rangevars_in_from(item: Any) -> Iterator[Any]:
    if isinstance(item, ast.RangeVar):
        yield item
    elif isinstance(item, ast.JoinExpr):
        yield from _rangevars_in_from(item.larg)
        yield from _rangevars_in_from(item.rarg)


def _column_refs(*values: Any) -> Iterator[Any]:
    """ColumnRefs of this query level (not inside subqueries)."""
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, tuple | list):
            stack.extend(v)
        elif isinstance(v, ast.ColumnRef):
            yield v
        elif isinstance(v, ast.Node) and not isinstance(v, ast.SelectStmt | ast.SubLink):
            stack.extend(_children(v))


def _where(expr: Any) -> Where:
    if expr is None:
        return Where.ABSENT
    if isinstance(expr, ast.CurrentOfExpr):
        return Where.PRESENT
    return Where.TRIVIAL if _trivially_true(expr) else Where.PRESENT


def _has_column(expr: Any) -> bool:
    stack = [expr]
    while stack:
        v = stack.pop()
        if isinstance(v, tuple | list):
            stack.extend(v)
        elif isinstance(v, ast.ColumnRef):
            return True
        elif isinstance(v, ast.Node):
            stack.extend(_children(v))
    return False


def _trivially_true(expr: Any) -> bool:
    """True when the filter keeps every row, judged without looking at constants' values."""
    if not _has_column(expr):
        return True  # 1 = 1, true, 'a' = 'a', and also 1 = 2: constants never make a filter
    if isinstance(expr, ast.BoolExpr):
        op = expr.boolop
        if op == enums.BoolExprType.OR_EXPR:
            return any(_trivially_true(a) for a in expr.args)
        if op == enums.BoolExprType.AND_EXPR:
            return all(_trivially_true(a) for a in expr.args)
        return False
    if isinstance(expr, ast.A_Expr) and expr.kind == enums.A_Expr_Kind.AEXPR_OP:
        op = [n.sval for n in expr.name if isinstance(n, ast.String)]
        if op in (["="], [">="], ["<="]) and isinstance(expr.lexpr, ast.ColumnRef) and isinstance(expr.rexpr, ast.ColumnRef):
            return _colname(expr.lexpr) == _colname(expr.rexpr)  # id = id
    if isinstance(expr, ast.NullTest) and expr.nulltesttype == enums.NullTestType.IS_NOT_NULL:
        return False
    return False


def _colname(ref: Any) -> tuple[str, ...]:
    return tuple(f.sval if isinstance(f, ast.String) else "*" for f in ref.fields)


def _target_columns(targets: Any) -> tuple[str, ...]:
    cols = []
    for t in targets or ():
        if isinstance(t, ast.ResTarget) and t.name:
            cols.append(t.name)
        elif isinstance(t, ast.MultiAssignRef):
            continue
    return tuple(dict.fromkeys(cols))


def _visit_dml(stmt: Any, c: _Collector, nested: bool) -> None:
    kind = type(stmt).__name__
    schema, name = _rangevar(stmt.relation)
    with_clause = getattr(stmt, "withClause", None)
    if with_clause is not None:
        for cte in with_clause.ctes or ():
            c.ctes.add(cte.ctename)
    if kind == "InsertStmt":
        c.act(operation="INSERT", schema=schema, name=name, columns=_target_columns(stmt.cols) or ("*",), nested=nested)
        if stmt.onConflictClause is not None and stmt.onConflictClause.targetList:
            c.act(operation="UPDATE", schema=schema, name=name,
                  columns=_target_columns(stmt.onConflictClause.targetList),
                  where=_where(stmt.onConflictClause.whereClause) if stmt.onConflictClause.whereClause else Where.PRESENT,
                  nested=nested)
        skip = {"relation"}
    elif kind == "UpdateStmt":
        c.act(operation="UPDATE", schema=schema, name=name, columns=_target_columns(stmt.targetList),
              where=_where(stmt.whereClause), nested=nested)
        skip = {"relation"}
    elif kind == "DeleteStmt":
        c.act(operation="DELETE", schema=schema, name=name, where=_where(stmt.whereClause), nested=nested)
        skip = {"relation"}
    else:  # MergeStmt: every WHEN clause is an effect on the target
        ops = set()
        for when in stmt.mergeWhenClauses or ():
            cmd = enums.CmdType(when.commandType)
            ops.add({enums.CmdType.CMD_UPDATE: "UPDATE", enums.CmdType.CMD_DELETE: "DELETE",
                     enums.CmdType.CMD_INSERT: "INSERT"}.get(cmd, "MERGE"))
        c.act(operation="MERGE", schema=schema, name=name, where=Where.PRESENT, nested=nested)
        for op in sorted(ops):
            c.act(operation=op, schema=schema, name=name, where=Where.PRESENT, nested=nested)
        skip = {"relation"}
    for attr in stmt:
        if attr not in skip:
            _walk(getattr(stmt, attr), c, nested)


def _visit_explain(stmt: Any, c: _Collector, nested: bool) -> None:
    analyze_opt = False
    for opt in stmt.options or ():
        if opt.defname == "analyze":
            text = _const_text(opt.arg) if opt.arg is not None else "true"
            analyze_opt = text is None or text.lower() in _TRUE_WORDS  # a non-literal value: assume it runs
    if analyze_opt:
        c.flags.add(Flag.EXPLAIN_ANALYZE)
    _visit_statement(stmt.query, c, nested=True)


def _visit_prepare(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.PREPARE)
    _visit_statement(stmt.query, c, nested=True)


def _visit_execute(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.EXECUTE)
    c.executed = stmt.name or ""
    _walk(stmt.params, c, nested)


def _visit_copy(stmt: Any, c: _Collector, nested: bool) -> None:
    schema, name = _rangevar(stmt.relation)
    cols = tuple(s.sval for s in stmt.attlist or () if isinstance(s, ast.String))
    if stmt.relation is not None:
        c.act(operation="COPY", object_type="TABLE", schema=schema, name=name, columns=cols or ("*",), nested=nested)
        c.act(operation="INSERT" if stmt.is_from else "SELECT", schema=schema, name=name, columns=cols or ("*",),
              nested=nested)
    if stmt.query is not None:
        c.act(operation="COPY", nested=nested)
        _visit_statement(stmt.query, c, nested=True)
    if stmt.filename is not None or stmt.is_program:
        c.flags.add(Flag.SERVER_FILE_ACCESS)
    _walk(stmt.whereClause, c, nested)


def _visit_truncate(stmt: Any, c: _Collector, nested: bool) -> None:
    for rv in stmt.relations or ():
        schema, name = _rangevar(rv, c)
        c.act(operation="TRUNCATE", object_type="TABLE", schema=schema, name=name, nested=nested)


def _visit_set(stmt: Any, c: _Collector, nested: bool) -> None:
    kind = enums.VariableSetKind(stmt.kind)
    name = (stmt.name or "").lower()
    c.flags.add(Flag.SETTING_CHANGE)
    if kind == enums.VariableSetKind.VAR_RESET_ALL:
        c.settings.append(Setting(name="all", value=None))
        return
    if kind == enums.VariableSetKind.VAR_SET_MULTI:  # SET TRANSACTION / SESSION CHARACTERISTICS
        c.settings.append(Setting(name=name or "transaction", value=None))
        return
    value: str | None = None
    if kind == enums.VariableSetKind.VAR_SET_VALUE:
        values = [_const_text(a) for a in stmt.args or ()]
        value = None if any(v is None for v in values) else ", ".join(values)
        if value is None:
            c.flags.add(Flag.UNSAFE_SETTING)  # not a literal: cannot prove what it becomes
    c.settings.append(Setting(name=name, value=value))
    _judge_setting(name, value, kind == enums.VariableSetKind.VAR_SET_VALUE, c)


# Settings that change how the proxy and the server read statements, or who runs them.
_GUARDED_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding", "role", "session_authorization"})


def _judge_setting(name: str, value: str | None, is_value: bool, c: _Collector) -> None:
    if name in ("role", "session_authorization"):
        c.flags.add(Flag.ROLE_CHANGE)
    if name == "standard_conforming_strings" and is_value and (value or "").lower() not in _TRUE_WORDS:
        c.flags.add(Flag.UNSAFE_SETTING)
    if name == "client_encoding" and is_value and not is_utf8(value or ""):
        c.flags.add(Flag.UNSAFE_SETTING)


def _const_text(node: Any) -> str | None:
    if isinstance(node, ast.A_Const):
        val = node.val
        if val is None:
            return None
        for attr in ("sval", "ival", "fval", "boolval", "bsval"):
            if hasattr(val, attr):
                v = getattr(val, attr)
                return str(v).lower() if isinstance(v, bool) else str(v)
        return None
    if isinstance(node, ast.String):
        return node.sval
    if isinstance(node, ast.Integer):
        return str(node.ival)
    if isinstance(node, ast.Float):
        return str(node.fval)
    if isinstance(node, ast.Boolean):
        return "true" if node.boolval else "false"
    if isinstance(node, ast.TypeCast):
        return _const_text(node.arg)
    return None


def _visit_funccall(fc: Any, c: _Collector) -> None:
    parts = [n.sval.lower() for n in fc.funcname if isinstance(n, ast.String)]
    full = ".".join(parts)
    base = parts[-1] if parts else ""
    c.functions.append(full)
    if base in DANGEROUS_FUNCTIONS or base.startswith("dblink"):  # dblink, dblink_exec, dblink_connect ...
        c.flags.add(Flag.DANGEROUS_FUNCTION)
    if base in FILE_FUNCTIONS:
        c.flags.add(Flag.SERVER_FILE_ACCESS)
    if base == "pg_notify":
        c.flags.add(Flag.NOTIFY)
    if base == "set_config":
        c.literal_sensitive = True
        c.flags.add(Flag.SETTING_CHANGE)
        args = list(fc.args or ())
        name = _const_text(args[0]) if args else None
        value = _const_text(args[1]) if len(args) > 1 else None
        if name is None or (value is None and name.lower() in _GUARDED_SETTINGS):
            # Which setting is known only at run time, or a setting the proxy guards gets a value known only
            # at run time: dangerous, and refused by the proxy whatever the policy says.
            c.flags.add(Flag.UNSAFE_SETTING)
            c.flags.add(Flag.DANGEROUS_FUNCTION)
            c.settings.append(Setting(name=(name or "?").lower(), value=value))
        else:
            # A named setting is a SET like any other (drivers use it: asyncpg saves and restores jit
            # with set_config('jit', $1, false)); value None means "known at run time".
            c.settings.append(Setting(name=name.lower(), value=value))
            _judge_setting(name.lower(), value, value is not None, c)


def _visit_rule(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.CREATE_RULE)
    schema, name = _rangevar(stmt.relation, c)
    c.act(operation="CREATE", object_type="RULE", schema=schema, name=name, nested=nested)
    _walk(stmt.whereClause, c, True)
    for action in stmt.actions or ():
        _visit_statement(action, c, nested=True)


def _visit_transaction(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.TRANSACTION_CONTROL)


def _visit_alter_system(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.ALTER_SYSTEM)
    c.act(operation="ALTER", object_type="SYSTEM", nested=nested)
    setstmt = stmt.setstmt
    if setstmt is not None:
        _visit_set(setstmt, c, nested)


def _visit_dynamic(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.DYNAMIC_SQL)
    if type(stmt).__name__ == "CreateFunctionStmt":
        schema, name = _qualified(stmt.funcname)
        c.act(operation="CREATE", object_type="PROCEDURE" if stmt.is_procedure else "FUNCTION",
              schema=schema, name=name, nested=nested)
    elif type(stmt).__name__ != "DoStmt":
        _visit_ddl(stmt, c, nested)


def _visit_simple(flag: Flag | None) -> Any:
    def visit(stmt: Any, c: _Collector, nested: bool) -> None:
        if flag is not None:
            c.flags.add(flag)
        for child in _children(stmt):
            _walk(child, c, nested)
    return visit


def _visit_call(stmt: Any, c: _Collector, nested: bool) -> None:
    schema, name = _qualified(stmt.funccall.funcname) if stmt.funccall is not None else ("", "")
    c.act(operation="CALL", object_type="PROCEDURE", schema=schema, name=name, nested=nested)
    _walk(stmt.funccall, c, nested)


def _visit_lock(stmt: Any, c: _Collector, nested: bool) -> None:
    c.flags.add(Flag.LOCK)
    for rv in stmt.relations or ():
        schema, name = _rangevar(rv, c)
        c.act(operation="LOCK", object_type="TABLE", schema=schema, name=name, nested=nested)


def _visit_drop(stmt: Any, c: _Collector, nested: bool) -> None:
    object_type = _object_type_name(stmt.removeType)
    if stmt.concurrent:
        c.flags.add(Flag.CONCURRENTLY)
    for obj in stmt.objects or ():
        if isinstance(obj, tuple | list):
            schema, name = _qualified(obj)
        elif isinstance(obj, ast.ObjectWithArgs):
            schema, name = _qualified(obj.objname)
        elif isinstance(obj, ast.String):
            schema, name = "", obj.sval
        elif isinstance(obj, ast.TypeName):
            schema, name = _qualified(obj.names)
        else:
            schema, name = "", ""
        c.act(operation="DROP", object_type=object_type, schema=schema, name=name, nested=nested)


def _object_type_name(value: Any) -> str:
    try:
        return enums.ObjectType(value).name.removeprefix("OBJECT_").replace("_", " ")
    except ValueError:
        return "UNKNOWN"


def _visit_ddl(stmt: Any, c: _Collector, nested: bool) -> None:
    """CREATE / ALTER / DROP / GRANT / maintenance: one action on the object named."""
    kind = type(stmt).__name__
    operation = _COMMANDS[kind]
    object_type = _OBJECT_TYPES.get(kind, "")
    schema = name = ""
    for attr in ("relation", "view", "into"):
        rv = getattr(stmt, attr, None) if attr in stmt else None
        if attr == "into" and rv is not None:
            rv = rv.rel
        if isinstance(rv, ast.RangeVar):
            schema, name = _rangevar(rv, c)
            break
    if "objtype" in stmt and not object_type:
        object_type = _object_type_name(stmt.objtype)
    if kind == "IndexStmt":
        name = stmt.idxname or ""
        if stmt.concurrent:
            c.flags.add(Flag.CONCURRENTLY)
        tschema, tname = _rangevar(stmt.relation, c)
        c.act(operation=operation, object_type="INDEX", schema=tschema, name=name or tname, nested=nested)
    elif kind == "ReindexStmt":
        for p in stmt.params or ():
            if p.defname == "concurrently":
                c.flags.add(Flag.CONCURRENTLY)
        c.act(operation=operation, object_type=_reindex_kind(stmt), schema=schema, name=name or (stmt.name or ""),
              nested=nested)
    elif kind == "GrantStmt":
        c.act(operation="GRANT" if stmt.is_grant else "REVOKE", object_type=_object_type_name(stmt.objtype),
              nested=nested)
        for obj in stmt.objects or ():
            if isinstance(obj, ast.RangeVar):
                s, n = _rangevar(obj, c)
                c.act(operation="GRANT" if stmt.is_grant else "REVOKE", object_type=_object_type_name(stmt.objtype),
                      schema=s, name=n, nested=nested)
    elif kind == "GrantRoleStmt":
        c.act(operation="GRANT" if stmt.is_grant else "REVOKE", object_type="ROLE", nested=nested)
    elif kind == "VacuumStmt":
        op = "VACUUM" if stmt.is_vacuumcmd else "ANALYZE"
        rels = [r.relation for r in stmt.rels or () if getattr(r, "relation", None) is not None]
        for rv in rels or [None]:
            s, n = _rangevar(rv, c)
            c.act(operation=op, object_type="TABLE", schema=s, name=n, nested=nested)
    elif kind in ("CreatedbStmt", "DropdbStmt", "AlterDatabaseStmt", "AlterDatabaseSetStmt"):
        c.act(operation=operation, object_type="DATABASE", name=getattr(stmt, "dbname", "") or "", nested=nested)
    elif kind == "CreateSchemaStmt":
        c.act(operation=operation, object_type="SCHEMA", name=stmt.schemaname or "", nested=nested)
    else:
        if operation in ("ALTER", "CREATE") and kind.startswith("AlterTable"):
            object_type = object_type or "TABLE"
        c.act(operation=operation, object_type=object_type, schema=schema, name=name, nested=nested)
    for child in _children(stmt):
        if isinstance(child, ast.RangeVar):
            continue  # the object acted on, not a read
        _walk(child, c, nested)


def _reindex_kind(stmt: Any) -> str:
    try:
        return enums.ReindexObjectType(stmt.kind).name.removeprefix("REINDEX_OBJECT_")
    except ValueError:
        return ""


_HANDLERS = {
    "SelectStmt": _visit_select,
    "InsertStmt": _visit_dml, "UpdateStmt": _visit_dml, "DeleteStmt": _visit_dml, "MergeStmt": _visit_dml,
    "ExplainStmt": _visit_explain, "PrepareStmt": _visit_prepare, "ExecuteStmt": _visit_execute,
    "CopyStmt": _visit_copy, "TruncateStmt": _visit_truncate, "VariableSetStmt": _visit_set,
    "RuleStmt": _visit_rule, "TransactionStmt": _visit_transaction, "AlterSystemStmt": _visit_alter_system,
    "DoStmt": _visit_dynamic, "CreateFunctionStmt": _visit_dynamic, "CreateTrigStmt": _visit_dynamic,
    "CreateEventTrigStmt": _visit_dynamic, "LockStmt": _visit_lock, "DropStmt": _visit_drop,
    "LoadStmt": _visit_simple(Flag.LOAD), "NotifyStmt": _visit_simple(Flag.NOTIFY),
    "DeallocateStmt": _visit_simple(None), "VariableShowStmt": _visit_simple(None),
    "DiscardStmt": _visit_simple(None), "ListenStmt": _visit_simple(None), "UnlistenStmt": _visit_simple(None),
    "FetchStmt": _visit_simple(None), "ClosePortalStmt": _visit_simple(None), "CheckPointStmt": _visit_simple(None),
    "DeclareCursorStmt": _visit_simple(None), "CallStmt": _visit_call,
}
