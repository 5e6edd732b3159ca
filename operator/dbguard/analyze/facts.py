"""Statement facts: what one SQL statement does, as the policy sees it.

This is a versioned contract (docs/policy-input.md): the policy input document carries
``StatementFacts.to_dict()`` under ``statement``. Add fields, never change the meaning of one;
bump ``FACTS_SCHEMA_VERSION`` when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

FACTS_SCHEMA_VERSION = 1


class Where(str, enum.Enum):
    """How an UPDATE/DELETE (or MERGE source) is filtered."""

    PRESENT = "present"  # a filter that references the target's columns non-trivially
    ABSENT = "absent"  # no WHERE at all
    TRIVIAL = "trivial"  # WHERE that is always true or column-free (1=1, true, id = id, 1=2 too: judged conservatively)
    NOT_APPLICABLE = "n/a"  # SELECT, INSERT, DDL ...

    def __str__(self) -> str:
        return self.value


class Flag(str, enum.Enum):
    """Notable properties of a statement that policies match on (``match.flags``)."""

    DANGEROUS_FUNCTION = "dangerous_function"  # pg_read_file, lo_export, dblink, pg_terminate_backend ...
    DYNAMIC_SQL = "dynamic_sql"  # DO blocks, CREATE FUNCTION/PROCEDURE bodies: code dbguard cannot see run
    SERVER_FILE_ACCESS = "server_file_access"  # COPY to/from a server file or PROGRAM, lo_import/lo_export
    ROLE_CHANGE = "role_change"  # SET ROLE, SET SESSION AUTHORIZATION, RESET ROLE
    ALTER_SYSTEM = "alter_system"
    LOAD = "load"  # LOAD 'library'
    SETTING_CHANGE = "setting_change"  # SET / RESET / set_config() of any parameter
    UNSAFE_SETTING = "unsafe_setting"  # a setting change dbguard refuses itself (standard_conforming_strings=off ...)
    SELECT_INTO = "select_into"  # SELECT ... INTO creates a table
    CREATE_RULE = "create_rule"
    EXPLAIN_ANALYZE = "explain_analyze"  # EXPLAIN ANALYZE executes the statement
    PREPARE = "prepare"  # SQL-level PREPARE; the body's actions are in ``actions``
    EXECUTE = "execute"  # SQL-level EXECUTE; facts of the prepared body are substituted by the session
    TRANSACTION_CONTROL = "transaction_control"  # BEGIN/COMMIT/ROLLBACK/SAVEPOINT
    NOTIFY = "notify"  # NOTIFY / pg_notify()
    LOCK = "lock"
    CONCURRENTLY = "concurrently"  # CREATE/DROP INDEX CONCURRENTLY, REINDEX CONCURRENTLY

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """One effect of a statement on one object.

    ``operation`` is the SQL verb of the effect (SELECT, INSERT, UPDATE, DELETE, MERGE, TRUNCATE,
    COPY, CREATE, ALTER, DROP, GRANT, REVOKE, COMMENT, VACUUM, ANALYZE, REINDEX, CLUSTER, REFRESH,
    LOCK, CALL ...). Nested effects count: a DELETE inside a CTE, the UPDATE under EXPLAIN ANALYZE,
    the body of PREPARE or CREATE RULE each give their own Action.
    """

    operation: str
    object_type: str = ""  # TABLE, INDEX, VIEW, FUNCTION, SCHEMA, DATABASE, ROLE ... ("" for DML)
    schema: str = ""  # "" when the statement does not qualify the name (search_path decides)
    name: str = ""  # table / object name as PostgreSQL folds it ("" when none)
    columns: tuple[str, ...] = ()  # columns written (UPDATE SET, INSERT list) or read; "*" for all
    where: Where = Where.NOT_APPLICABLE
    nested: bool = False  # True when inside a CTE, EXPLAIN, PREPARE, rule, subquery

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "object_type": self.object_type,
            "schema": self.schema,
            "name": self.name,
            "columns": list(self.columns),
            "where": self.where.value,
            "nested": self.nested,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """A run-time parameter the statement changes (SET, RESET, set_config)."""

    name: str  # lower-cased parameter name
    value: str | None  # literal value as text; None for RESET or when not a literal

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatementFacts:
    """Everything the policy may know about one statement of a (possibly multi-statement) string."""

    text: str  # this statement's text, as sent
    kind: str  # PostgreSQL parse-node name of the top statement: SelectStmt, DeleteStmt, DropStmt ...
    command: str  # the top-level verb, e.g. "DELETE", "DROP", "SET", "EXPLAIN"
    actions: tuple[Action, ...] = ()
    functions: tuple[str, ...] = ()  # every function called, lower-case, schema-qualified when written so
    settings: tuple[Setting, ...] = ()
    flags: tuple[Flag, ...] = ()
    prepared_name: str = ""  # PREPARE name / EXECUTE name / DEALLOCATE name ("" when none)
    fingerprint: str = ""  # libpg_query fingerprint (literal-independent) for grouping in the ledger
    cacheable: bool = False  # True when these facts do not depend on literal values (safe to reuse by normalized text)
    cursor_name: str = ""  # DECLARE / CLOSE name ("" for CLOSE ALL): lets protocol Describe reach SQL cursors

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "command": self.command,
            "actions": [a.to_dict() for a in self.actions],
            "functions": list(self.functions),
            "settings": [s.to_dict() for s in self.settings],
            "flags": [f.value for f in self.flags],
            "prepared_name": self.prepared_name,
            "fingerprint": self.fingerprint,
        }


def is_utf8(encoding: str) -> bool:
    """Whether an encoding name means UTF-8 as PostgreSQL reads it ('UTF8', 'utf-8', "'utf-8'", 'unicode')."""
    return "".join(ch for ch in encoding.lower() if ch.isalnum()) in ("utf8", "unicode")


class AnalysisError(Exception):
    """The statement cannot be judged: it does not parse, or dbguard does not understand it.

    ``sqlstate`` is 42601 for a syntax error and 0A000 for a statement kind dbguard refuses to judge.
    """

    def __init__(self, message: str, *, sqlstate: str, position: int | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.position = position
