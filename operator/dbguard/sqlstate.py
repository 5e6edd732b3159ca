"""SQLSTATE codes dbguard answers with (PostgreSQL Appendix A)."""

from __future__ import annotations

import enum


class SqlState(str, enum.Enum):
    """A SQLSTATE; ``str(code)`` is the five-character value sent on the wire."""

    INSUFFICIENT_PRIVILEGE = "42501"  # policy denials, approval required, masking lineage
    OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"  # masking catalog unavailable
    SYNTAX_ERROR = "42601"  # the statement does not parse
    FEATURE_NOT_SUPPORTED = "0A000"  # a statement kind or message dbguard does not understand
    QUERY_CANCELED = "57014"  # policy evaluation timed out
    PROTOCOL_VIOLATION = "08P01"  # malformed or unknown wire message
    INVALID_AUTHORIZATION = "28000"  # bad token
    INVALID_PASSWORD = "28P01"
    TOO_MANY_CONNECTIONS = "53300"
    PROGRAM_LIMIT_EXCEEDED = "54000"  # oversized message
    CONNECTION_FAILURE = "08006"  # upstream unreachable
    CANNOT_CONNECT_NOW = "57P03"  # draining
    INVALID_SQL_STATEMENT_NAME = "26000"  # unknown prepared statement
    INVALID_CURSOR_NAME = "34000"  # unknown portal
    DUPLICATE_PREPARED_STATEMENT = "42P05"
    IN_FAILED_TRANSACTION = "25P02"
    IO_ERROR = "58030"  # the audit ledger cannot record
    INTERNAL_ERROR = "XX000"

    def __str__(self) -> str:
        return self.value
