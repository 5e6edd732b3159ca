"""From SQL text to a verdict: analyze (cached), resolve SQL-level EXECUTE, built-in guards, policy.

Kept apart from the protocol code so both the simple and the extended protocol, and the tests,
use one path. The synchronous ``judge_fast`` answers from caches; ``judge`` may wait for the
policy engine (bounded by the decider's timeout).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import OrderedDict
from typing import Any

from dbguard import analyze
from dbguard.analyze import facts as F
from dbguard.errors import Refusal
from dbguard.identity.principal import Principal
from dbguard.policy.decision import Decision, PolicyAction
from dbguard.sqlstate import SqlState

MAX_CACHED = 20_000


class FactsCache:
    """Facts by statement text (any facts) and by normalized text (literal-independent facts only)."""

    def __init__(self, size: int = MAX_CACHED) -> None:
        self._exact: OrderedDict[str, tuple[F.StatementFacts, ...]] = OrderedDict()
        self._normalized: OrderedDict[str, tuple[F.StatementFacts, ...]] = OrderedDict()
        self._recorded: OrderedDict[str, str] = OrderedDict()
        self._size = size
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _put(d: OrderedDict, key: str, value: tuple[F.StatementFacts, ...], size: int) -> None:
        d[key] = value
        if len(d) > size:
            d.popitem(last=False)

    def exact(self, sql: str) -> tuple[F.StatementFacts, ...]:
        """For Parse: the text repeats, so the text itself is the key."""
        found = self._exact.get(sql)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        result = analyze.analyze(sql)
        self._put(self._exact, sql, result, self._size)
        return result

    def recorded_text(self, sql: str) -> str:
        """A statement text as the ledger records it (see analyze.pgparse.recorded_text), cached.

        What a client binds as parameters is not recorded either; values reach the ledger only as
        the completion's row counts (and, with masking, never in the clear).
        """
        found = self._recorded.get(sql)
        if found is None:
            found = analyze.recorded_text(sql)
            self._recorded[sql] = found
            if len(self._recorded) > self._size:
                self._recorded.popitem(last=False)
        return found

    def literal_independent(self, sql: str) -> tuple[tuple[F.StatementFacts, ...], str]:
        """For Query: literals differ on every statement, so key by the normalized text.

        Returns the facts and the normalized text (used in events: no literal values, no secrets).
        """
        try:
            key = analyze.cache_key(sql)
        except Exception:  # noqa: BLE001 - normalize fails exactly when parsing fails; analyze() says why
            analyze.analyze(sql)
            raise
        found = self._normalized.get(key)
        if found is not None:
            self.hits += 1
            return found, key
        self.misses += 1
        result = analyze.analyze(sql)
        if result and all(f.cacheable for f in result):
            self._put(self._normalized, key, result, self._size)
        return result, key


@dataclasses.dataclass(slots=True)
class Verdict:
    """What to do with one client message that carries SQL."""

    statements: tuple[F.StatementFacts, ...]  # as analyzed (EXECUTE not yet resolved)
    judged: tuple[F.StatementFacts, ...]  # what the policy judged (EXECUTE resolved to the prepared body)
    decisions: list[Decision]
    refusal: Refusal | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


# Functions a plain SELECT may call and still be a pure read (its ledger entry need not be durable).
_READ_FUNCTIONS = frozenset({"count", "sum", "avg", "min", "max", "now", "lower", "upper", "coalesce", "length",
                             "abs", "round", "date_trunc", "current_date", "version", "current_setting"})
# TransactionStmt: BEGIN/COMMIT/ROLLBACK/SAVEPOINT change no data by themselves; the writes they
# commit were recorded durably before they ran. (They carry the transaction_control flag, which
# alone does not make a statement a write.)
_READ_KINDS = frozenset({"SelectStmt", "VariableShowStmt", "TransactionStmt"})
_READ_FLAGS = ((), (F.Flag.TRANSACTION_CONTROL,))


def read_only(f: F.StatementFacts) -> bool:
    """A statement that only reads: its ledger entry may be written after the fact (non-durable)."""
    return (f.kind in _READ_KINDS and f.flags in _READ_FLAGS and all(a.operation == "SELECT" for a in f.actions)
            and all(fn.rsplit(".", 1)[-1] in _READ_FUNCTIONS for fn in f.functions))


def refusal_for_analysis_error(exc: F.AnalysisError) -> Refusal:
    if exc.sqlstate == SqlState.SYNTAX_ERROR.value:
        return Refusal(sqlstate=SqlState.SYNTAX_ERROR, rule="dbguard:parse-error",
                       message=f"dbguard refused the statement: it does not parse: {exc}")
    return Refusal(sqlstate=SqlState.FEATURE_NOT_SUPPORTED, rule="dbguard:unsupported",
                   message=f"dbguard refused the statement: {exc}")


def builtin_refusal(f: F.StatementFacts) -> Refusal | None:
    """Guards that hold whatever the policy says: they protect the proxy's own reading of SQL."""
    if F.Flag.UNSAFE_SETTING in f.flags:
        names = ", ".join(s.name for s in f.settings) or "a run-time parameter"
        return Refusal(
            sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule="dbguard:unsafe-setting",
            message=f"dbguard refused the statement: changing {names} this way is not allowed through the proxy",
            hint="standard_conforming_strings must stay on and client_encoding UTF8, "
                 "so that dbguard and the server read statements the same way",
        )
    for s in f.settings:
        if s.name in ("client_encoding", "names") and (s.value is None or not F.is_utf8(s.value)):
            if s.value is None and s.name == "client_encoding":
                continue  # RESET client_encoding returns to the connection's UTF8
            return Refusal(
                sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule="dbguard:unsafe-setting",
                message=f"dbguard refused the statement: client_encoding must stay UTF8 (asked: {s.value})",
            )
    return None


def refusal_for_decision(d: Decision) -> Refusal | None:
    if d.enforced is PolicyAction.ALLOW:
        return None
    where = f"{d.policy}/{d.rule}" if d.policy else d.rule
    if d.rule == "dbguard:policy-timeout":
        return Refusal(sqlstate=SqlState.QUERY_CANCELED, rule=d.rule,
                       message=f"dbguard refused the statement: {d.reason}")
    if d.enforced is PolicyAction.REQUIRE_APPROVAL:
        return Refusal(sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule=d.rule,
                       message=f"dbguard: approval required by rule {where}: {d.reason}",
                       hint="an approver must approve this statement before it can run")
    return Refusal(sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule=d.rule,
                   message=f"dbguard denied the statement by rule {where}: {d.reason}")


class Guard:
    """Per-session judge: holds the session's SQL-level prepared statements."""

    def __init__(self, *, decider: Any, cache: FactsCache, principal: Principal, session: dict[str, Any]) -> None:
        self._decider = decider
        self._cache = cache
        self.principal = principal
        self.session = session  # the policy input's "session" object; change it through update()
        self.sql_prepared: dict[str, tuple[F.StatementFacts, ...]] = {}
        # SQL cursors (DECLARE) are portals too: drivers Describe them by protocol (psycopg server cursors).
        # A name kept after its transaction ended only lets the server answer "does not exist".
        self.sql_cursors: set[str] = set()

    def update(self, **changes: Any) -> None:
        """Keep the session fields the policy sees current (protocol, in_transaction)."""
        for k, v in changes.items():
            if self.session.get(k) != v:
                self.session = {**self.session, **changes}  # a new dict: the decider keys on its identity
                return

    # -- analysis ------------------------------------------------------------------------------

    def resolve(self, statements: tuple[F.StatementFacts, ...]) -> tuple[tuple[F.StatementFacts, ...], Refusal | None]:
        """Replace EXECUTE by the facts of the prepared body judged at PREPARE."""
        if not any(F.Flag.EXECUTE in f.flags for f in statements):
            return statements, None  # the same (cached) tuple: lets callers memoize by identity
        judged: list[F.StatementFacts] = []
        for f in statements:
            if F.Flag.EXECUTE in f.flags:
                body = self.sql_prepared.get(f.prepared_name)
                if body is None:
                    return (), Refusal(
                        sqlstate=SqlState.INVALID_SQL_STATEMENT_NAME, rule="dbguard:unknown-prepared",
                        message=f"dbguard refused EXECUTE: prepared statement {f.prepared_name!r} is unknown "
                                "to dbguard (prepare it through the proxy)",
                    )
                judged.extend(body)
            judged.append(f)
        return tuple(judged), None

    def remember(self, statements: tuple[F.StatementFacts, ...]) -> None:
        """After forwarding: track SQL PREPARE / DEALLOCATE / DISCARD.

        A PREPARE's facts carry its body's actions (nested), so EXECUTE is judged on them again:
        for this identity, now, under the policy revision in force.
        """
        for f in statements:
            if F.Flag.PREPARE in f.flags and f.prepared_name:
                self.sql_prepared[f.prepared_name] = (f,)
            elif f.kind == "DeallocateStmt":
                if f.prepared_name:
                    self.sql_prepared.pop(f.prepared_name, None)
                else:
                    self.sql_prepared.clear()
            elif f.kind == "DiscardStmt":
                self.sql_prepared.clear()
                self.sql_cursors.clear()
            elif f.kind == "DeclareCursorStmt" and f.cursor_name:
                self.sql_cursors.add(f.cursor_name)
            elif f.kind == "ClosePortalStmt":
                if f.cursor_name:
                    self.sql_cursors.discard(f.cursor_name)
                else:
                    self.sql_cursors.clear()

    # -- decisions -----------------------------------------------------------------------------

    def _pre(self, statements: tuple[F.StatementFacts, ...]) -> Verdict:
        judged, refusal = self.resolve(statements)
        verdict = Verdict(statements=statements, judged=judged, decisions=[], refusal=refusal)
        if refusal is None:
            for f in judged:
                verdict.refusal = builtin_refusal(f)
                if verdict.refusal is not None:
                    break
        return verdict

    def _post(self, verdict: Verdict) -> Verdict:
        for d in verdict.decisions:
            if verdict.refusal is None:
                verdict.refusal = refusal_for_decision(d)
            if d.action is not PolicyAction.ALLOW and d.enforced is PolicyAction.ALLOW and d.enforcement.value == "warn":
                verdict.warnings.append(f"dbguard warning: rule {d.policy}/{d.rule} would "
                                        f"{d.action.value} this statement: {d.reason}")
        return verdict

    def judge_fast(self, statements: tuple[F.StatementFacts, ...], now: datetime.datetime) -> Verdict | None:
        """The verdict from caches alone, or None when the policy engine must be asked."""
        verdict = self._pre(statements)
        if verdict.refusal is not None:
            return verdict
        for f in verdict.judged:
            d = self._decider.decide_cached(self.principal, self.session, f, now)
            if d is None:
                return None
            verdict.decisions.append(d)
        return self._post(verdict)

    async def judge(self, statements: tuple[F.StatementFacts, ...], now: datetime.datetime) -> Verdict:
        verdict = self._pre(statements)
        if verdict.refusal is not None:
            return verdict
        for f in verdict.judged:
            verdict.decisions.append(await self._decider.decide(self.principal, self.session, f, now))
        return self._post(verdict)
