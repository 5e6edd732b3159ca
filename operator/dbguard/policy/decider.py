"""Decisions with a cache and a deadline.

A decision depends on the policy revision, the identity, the statement facts and what of the
session the policy can see, and on the clock only when the bundle has time windows. Evaluation
runs in a worker thread bounded by the timeout: past it, or on any evaluation error, the
statement is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson

from dbguard.analyze.facts import StatementFacts
from dbguard.identity.principal import Principal
from dbguard.metrics import POLICY_BUCKETS, Buckets
from dbguard.policy.compile import CompiledBundle
from dbguard.policy.decision import Decision, EnforcementAction, PolicyAction
from dbguard.policy.engine import PolicyEngine, PolicyEvaluationError
from dbguard.policy.input import SESSION_FIELDS, build_input

CACHE_SIZE = 10_000
log = logging.getLogger(__name__)


def refusal_decision(rule: str, reason: str, revision: str) -> Decision:
    return Decision(action=PolicyAction.DENY, enforced=PolicyAction.DENY, rule=rule, policy="",
                    reason=reason, enforcement=EnforcementAction.DENY, revision=revision)


class Decider:
    def __init__(self, bundle: CompiledBundle, engine: PolicyEngine, *, timeout_s: float = 0.2,
                 cache_size: int = CACHE_SIZE) -> None:
        self.bundle = bundle
        self.engine = engine
        self.timeout_s = timeout_s
        self._cache: OrderedDict[tuple, Decision] = OrderedDict()
        # Facts objects that the analyzer cache hands out again and again: their key, by identity.
        self._facts_keys: dict[int, tuple[StatementFacts, bytes]] = {}
        # Session dicts are replaced, never mutated (Guard.update), so their key can be kept by identity too.
        self._session_keys: dict[int, tuple[dict[str, Any], tuple]] = {}
        self._cache_size = cache_size
        self._inflight: dict[tuple, asyncio.Future[Decision]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbguard-policy")
        self.hits = 0
        self.misses = 0
        self.latency = Buckets(POLICY_BUCKETS)
        self.generation = 0  # bumped by replace(): an evaluation started before a reload is not cached

    def replace(self, bundle: CompiledBundle, engine: PolicyEngine) -> None:
        """Hot reload: every session shares this decider, so the next statement of each uses the new bundle."""
        self.bundle = bundle
        self.engine = engine
        self.generation += 1
        self._cache.clear()
        self._inflight.clear()

    @property
    def revision(self) -> str:
        return self.bundle.revision

    def _facts_key(self, facts: StatementFacts) -> bytes:
        known = self._facts_keys.get(id(facts))
        if known is not None and known[0] is facts:
            return known[1]
        key = orjson.dumps(facts.to_dict(), option=orjson.OPT_SORT_KEYS)
        if len(self._facts_keys) > 4 * self._cache_size:
            self._facts_keys.clear()
        self._facts_keys[id(facts)] = (facts, key)
        return key

    def _session_key(self, session: dict[str, Any]) -> tuple:
        known = self._session_keys.get(id(session))
        if known is not None and known[0] is session:
            return known[1]
        key = tuple(session.get(k) for k in SESSION_FIELDS)
        if len(self._session_keys) > 4 * self._cache_size:
            self._session_keys.clear()
        self._session_keys[id(session)] = (session, key)
        return key

    def _key(self, principal: Principal, session: dict[str, Any], facts: StatementFacts,
             now: datetime.datetime) -> tuple:
        minute = now.replace(second=0, microsecond=0) if self.bundle.uses_time else None
        return (principal.user, principal.groups, self._session_key(session), self._facts_key(facts), minute)

    def decide_cached(self, principal: Principal, session: dict[str, Any], facts: StatementFacts,
                      now: datetime.datetime) -> Decision | None:
        found = self._cache.get(self._key(principal, session, facts, now))
        if found is not None:
            self.hits += 1
        return found

    def evaluate(self, principal: Principal, session: dict[str, Any], facts: StatementFacts,
                 now: datetime.datetime) -> Decision:
        """Synchronous evaluation (offline checks): no deadline, errors become refusals."""
        try:
            return self.engine.evaluate(build_input(principal, session, facts, now, self.bundle.timezones))
        except PolicyEvaluationError as exc:
            return refusal_decision("dbguard:policy-error", f"the policy could not be evaluated: {exc}", self.revision)

    async def decide(self, principal: Principal, session: dict[str, Any], facts: StatementFacts,
                     now: datetime.datetime) -> Decision:
        key = self._key(principal, session, facts, now)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        # One evaluation per key at a time: a burst of clients sending the same new statement
        # shares it instead of queueing behind each other past the deadline.
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            decision = await self._evaluate(principal, session, facts, now, key)
            future.set_result(decision)
            return decision
        finally:
            if self._inflight.get(key) is future:  # a reload may have replaced it
                del self._inflight[key]
            if not future.done():
                future.cancel()

    async def _evaluate(self, principal: Principal, session: dict[str, Any], facts: StatementFacts,
                        now: datetime.datetime, key: tuple) -> Decision:
        doc = build_input(principal, session, facts, now, self.bundle.timezones)
        loop = asyncio.get_running_loop()
        generation = self.generation
        started = time.monotonic()
        try:
            decision = await asyncio.wait_for(loop.run_in_executor(self._pool, self.engine.evaluate, doc),
                                              self.timeout_s)
        except TimeoutError:
            self.latency.observe(time.monotonic() - started)
            return refusal_decision("dbguard:policy-timeout",
                                    f"the policy was not evaluated within {self.timeout_s * 1000:.0f} ms",
                                    self.revision)
        except PolicyEvaluationError as exc:
            return refusal_decision("dbguard:policy-error", f"the policy could not be evaluated: {exc}",
                                    self.revision)
        except Exception as exc:  # noqa: BLE001 - an engine bug must refuse this statement, not cancel waiters
            log.exception("policy engine failed")
            return refusal_decision("dbguard:policy-error",
                                    f"the policy could not be evaluated ({type(exc).__name__})", self.revision)
        self.latency.observe(time.monotonic() - started)
        if generation != self.generation:  # the policy was reloaded meanwhile: decide again under the new one
            return await self._evaluate(principal, session, facts, now, key)
        self._cache[key] = decision
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return decision
