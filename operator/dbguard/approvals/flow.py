"""What a session does with a statement that a require-approval rule holds.

The statement's fingerprint (exact text, parameters, database, identity) finds its request:

- the newest request is Approved and unexpired: claim it (once, across every proxy sharing the
  store) and run the statement; a lost claim counts as already executed;
- it is Pending: use it (a retry never makes a second request);
- it is Denied (and not expired): refuse, naming who denied it and why;
- none, or the newest is Executed, Cancelled or Expired: create a new request.

Then, by the rule's mode: ``reject-and-retry`` answers at once with an error naming the request and
how to approve it (re-sending the identical statement once approved runs it); ``hold`` sends a
NOTICE naming the request and waits, up to the rule's timeout, for a decision, then runs the
statement or refuses it. A client's cancel request ends the wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import re
from collections.abc import Callable
from typing import Any

from dbguard.approvals import estimate, notify
from dbguard.approvals.store import ApprovalStore, NewRequest, Request, fingerprint
from dbguard.audit.events import EventKind
from dbguard.identity.principal import Principal
from dbguard.policy.decision import Decision, PolicyAction
from dbguard.sqlstate import SqlState

log = logging.getLogger(__name__)
POLL_S = 0.25
_ESTIMABLE = frozenset({"UPDATE", "DELETE", "INSERT", "MERGE", "SELECT"})
_ROWS = re.compile(rb"^(?:INSERT \d+|UPDATE|DELETE|MERGE|SELECT|COPY|MOVE|FETCH) ?(\d+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """``request`` names the request either way; ``run`` says the claim succeeded."""

    run: bool
    request: str
    state: str = ""  # approved | pending | denied | cancelled (by the requester) | expired | executed |
    #                  timeout | canceled (the client's cancel request) | gone
    sqlstate: str = ""
    message: str = ""
    hint: str = ""


def approval_decision(decisions: list[Decision]) -> Decision | None:
    """The require-approval decision, when that (and not a denial) is what stops the statement.

    When statements of one message need approvals under different rules (or settings), there is no
    single request whose approvers stand for all of them: None, so the message stays refused and the
    client is told to send the statements separately.
    """
    found = None
    for d in decisions:
        if d.enforced is PolicyAction.DENY:
            return None
        if d.enforced is PolicyAction.REQUIRE_APPROVAL:
            if found is None:
                found = d
            elif (d.policy, d.rule, d.approval) != (found.policy, found.rule, found.approval):
                return None
    return found


def mixed_rules(decisions: list[Decision]) -> bool:
    """Statements of one message need approvals under different rules (and no denial stops them)."""
    held = {(d.policy, d.rule) for d in decisions if d.enforced is PolicyAction.REQUIRE_APPROVAL}
    return len(held) > 1 and not any(d.enforced is PolicyAction.DENY for d in decisions)


def rows_from_tags(tags: list[str]) -> int | None:
    total = None
    for tag in tags:
        m = _ROWS.match(tag.encode())
        if m:
            total = (total or 0) + int(m.group(1))
    return total


class Approvals:
    """One per proxy: the store, and what the sessions share (notifier, estimates, events)."""

    def __init__(self, store: ApprovalStore, *, proxy_id: str, access: str, events: Any, upstream: Any,
                 notifier: notify.Notifier | None = None) -> None:
        self.store = store
        self.proxy_id = proxy_id
        self.access = access
        self.events = events
        self.upstream = upstream
        self.notifier = notifier
        self.created = 0
        self.executed = 0
        self._entries: dict[str, int] = {}  # request -> the ledger entry that recorded its execution
        self._finishing: set[asyncio.Task] = set()

    async def resolve(self, *, decision: Decision, principal: Principal, database: str, statement: str,
                      params: tuple[str | None, ...], operation: str, session_id: str,
                      notice: Callable[[str], None], cancelled: asyncio.Event,
                      closed: Callable[[], bool], formats: tuple[int, ...] = (), types: tuple[int, ...] = (),
                      estimable: bool = False) -> Outcome:
        settings = decision.approval or {}
        mode = settings.get("mode", "reject-and-retry")
        fp = fingerprint(statement, params, database, principal.user, formats, types)
        now = datetime.datetime.now(datetime.UTC)
        existing = []
        for candidate in await self.store.find(fp):
            problem = candidate.problem(fingerprint=fp, user=principal.user, rule=decision.rule, settings=settings)
            if problem:  # written by someone other than a proxy, or for another rule: never run under it
                log.warning("approval request %s ignored: %s", candidate.name, problem)
                self.events.emit(EventKind.APPROVAL, {"event": "ignored", "request": candidate.name,
                                                      "session": session_id, "reason": problem}, flush=True)
                continue
            existing.append(candidate)
        # Any approved request for this statement will do (two sessions may each have asked), newest first.
        for candidate in existing:
            if candidate.trusted_phase(settings, now) == "Approved" and not closed() and not cancelled.is_set():
                outcome = await self._claim(candidate, session_id)
                if outcome is not None:
                    return outcome
        request: Request | None = existing[0] if existing else None
        phase = request.trusted_phase(settings, now) if request is not None else ""
        if phase == "Approved":
            phase = "Executed"  # someone else ran it just now (or the client left or cancelled: new request)
        where = f"{decision.policy}/{decision.rule}" if decision.policy else decision.rule
        if request is not None and phase == "Denied":
            # A denial stands until the request expires: asking again at once is not a new question.
            return self._finished_outcome(request, phase)
        if request is None or phase not in ("Pending",):
            request = await self._create(decision, principal, database, statement, params, operation, fp, mode,
                                         settings, session_id, formats, types, estimable)
        hint = self.store.approve_hint(request.name)
        if mode != "hold":
            return Outcome(run=False, request=request.name, state="pending",
                           sqlstate=str(SqlState.INSUFFICIENT_PRIVILEGE),
                           message=f"dbguard: approval required by rule {where}: {decision.reason}; "
                                   f"approval request {request.name} is pending",
                           hint=f"approve with: {hint} -- then send the identical statement again")
        timeout = float(settings.get("timeoutSeconds") or 300)
        notice(f"dbguard: statement held for approval by rule {where} ({decision.reason}): request "
               f"{request.name}; waiting up to {timeout:g}s; approve with: {hint}")
        return await self._hold(request, timeout, session_id, cancelled, closed, settings)

    async def _claim(self, request: Request, session_id: str) -> Outcome | None:
        if not await self.store.claim(request.name, self.proxy_id):
            return None
        self.executed += 1
        waiter = self.events.emit(EventKind.APPROVAL, {"event": "executing", "request": request.name,
                                                       "session": session_id, "proxy": self.proxy_id,
                                                       "approvals": request.spec.get("approvals", [])},
                                  flush=True, durable=True)
        if waiter is not None:
            # Recorded before it runs; its sequence number goes on the request. If the ledger cannot
            # record it, the statement is refused and the (used) approval says why.
            try:
                self._entries[request.name] = await asyncio.wrap_future(waiter)
            except Exception:
                self.finished(request.name, None, "not executed: the audit ledger could not record it")
                raise
        return Outcome(run=True, request=request.name, state="approved")

    async def _create(self, decision: Decision, principal: Principal, database: str, statement: str,
                      params: tuple[str | None, ...], operation: str, fp: str, mode: str, settings: dict[str, Any],
                      session_id: str, formats: tuple[int, ...], types: tuple[int, ...], estimable: bool) -> Request:
        rows = None
        if estimable and operation in _ESTIMABLE and not any(f == 1 for f in formats):
            rows = await estimate.estimated_rows(self.upstream, statement, params)
        new = NewRequest(
            requester=principal.user, groups=principal.groups, database=database, access=self.access,
            proxy=self.proxy_id, operation=operation, statement=statement, parameters=params, fingerprint=fp,
            rule=decision.rule, policy=decision.policy, reason=decision.reason,
            approver_groups=tuple(settings.get("approverGroups") or ()),
            approver_users=tuple(settings.get("approverUsers") or ()),
            min_approvals=int(settings.get("minApprovals") or 1), mode=mode,
            ttl_seconds=int(settings.get("ttlSeconds") or 3600), estimated_rows=rows, parameter_formats=formats,
            parameter_types=types)
        request = await self.store.create(new)
        self.created += 1
        waiter = self.events.emit(EventKind.APPROVAL, {
            "event": "requested", "request": request.name, "session": session_id, "fingerprint": fp,
            "identity": principal.to_dict(), "database": database, "rule": decision.rule, "policy": decision.policy,
            "mode": mode, "estimated_rows": rows}, flush=True, durable=True)
        if waiter is not None:
            await asyncio.wrap_future(waiter)
        if self.notifier is not None:
            self.notifier.send(notify.created_text(request.name, principal.user, statement, decision.rule,
                                                   decision.reason, self.store.approve_hint(request.name)),
                               request=request.name)
        log.info("approval request %s created for %s (rule %s)", request.name, principal.user, decision.rule)
        return request

    async def _hold(self, request: Request, timeout: float, session_id: str, cancelled: asyncio.Event,
                    closed: Callable[[], bool], settings: dict[str, Any]) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = request.name
        while True:
            if closed():
                return Outcome(run=False, request=name, state="gone", sqlstate="08006", message="the client went away")
            if cancelled.is_set():
                break  # before any claim: a cancelled statement must not use up an approval
            current = await self.store.get(name)
            phase = current.trusted_phase(settings) if current is not None else "Cancelled"
            if phase == "Approved":
                assert current is not None
                outcome = await self._claim(current, session_id)
                if outcome is not None:
                    return outcome
                phase = "Executed"
            if phase != "Pending":
                return self._finished_outcome(current, phase, name)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return Outcome(run=False, request=name, state="timeout", sqlstate=str(SqlState.QUERY_CANCELED),
                               message=f"dbguard: approval request {name} was not decided within {timeout:g}s; "
                                       "the statement did not run (once approved, send it again)")
            try:
                await asyncio.wait_for(cancelled.wait(), min(POLL_S, remaining))
            except TimeoutError:
                continue
            break
        return Outcome(run=False, request=name, state="canceled", sqlstate=str(SqlState.QUERY_CANCELED),
                           message=f"canceling statement due to user request (approval request {name} stays "
                                   "pending)")

    @staticmethod
    def _finished_outcome(request: Request | None, phase: str, name: str = "") -> Outcome:
        name = request.name if request is not None else name
        approvals = (request.spec.get("approvals") or []) if request is not None else []
        deciders = [a for a in approvals if a.get("decision") == phase]
        by = ", ".join(a.get("user", "") for a in (deciders or approvals))
        reason = "; ".join(a["reason"] for a in (deciders or approvals) if a.get("reason"))
        text = {"Denied": f"denied by {by}", "Cancelled": "cancelled", "Expired": "expired",
                "Executed": "already executed by another session"}.get(phase, phase)
        return Outcome(run=False, request=name, state=phase.lower(), sqlstate=str(SqlState.INSUFFICIENT_PRIVILEGE),
                       message=f"dbguard: approval request {name} was {text}" + (f": {reason}" if reason else ""))

    def finished(self, name: str, rows: int | None, error: str | None) -> None:
        """The claimed statement ran (or failed): record it on the request, in the background."""
        entry = self._entries.pop(name, None)

        async def _finish() -> None:
            try:
                await self.store.finish(name, rows=rows, error=error, ledger_entry=entry)
            except Exception:  # noqa: BLE001 - the ledger has it; the request's status is best effort
                log.exception("could not record the execution on approval request %s", name)

        task = asyncio.get_running_loop().create_task(_finish())
        self._finishing.add(task)  # kept (and awaited by drain) so an outcome is not lost at shutdown
        task.add_done_callback(self._finishing.discard)

    async def drain(self) -> None:
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=10)
