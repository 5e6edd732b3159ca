"""The proxy's masking: per-identity masks, the catalog, and the cached lineage verdict per statement."""

from __future__ import annotations

import time
from collections import OrderedDict

import pglast

from dbguard.analyze.pgparse import all_nodes
from dbguard.identity.principal import Principal
from dbguard.masking import lineage
from dbguard.masking.catalog import Catalog, IdentityMasks
from dbguard.masking.copy import CopyPlan, plan_copy
from dbguard.masking.rules import MaskPolicy, MaskSet

MAX_CACHED = 20_000


class MaskGuard:
    """Shared by all sessions of one proxy."""

    def __init__(self, policy: MaskPolicy, catalog: Catalog, hash_key: bytes) -> None:
        self.policy = policy
        self.catalog = catalog
        self.hash_key = hash_key
        self._verdicts: OrderedDict[tuple[str, int], tuple[str | None, tuple[CopyPlan, ...]]] = OrderedDict()

    def for_principal(self, principal: Principal) -> MaskSet | None:
        """The identity's masks, or None when it sees every column in clear."""
        masks = self.policy.for_groups(principal.groups)
        return masks if masks else None

    async def check(self, masks: MaskSet, sql: str) -> tuple[IdentityMasks, str | None, tuple[CopyPlan, ...]]:
        """The identity's resolved masks; if the statement could leak or probe a masked value, why;
        and a plan for each COPY TO in it, in order."""
        snap = await self.catalog.current()
        resolved = self.catalog.resolve(masks, snap)
        key = (sql, id(resolved))
        if key in self._verdicts:
            return resolved, *self._verdicts[key]
        try:
            statements = pglast.parse_sql(sql)
        except pglast.parser.ParseError as exc:  # the analyzer parsed it; be safe rather than crash
            return resolved, f"dbguard could not parse the statement to check it: {exc}", ()
        if time.monotonic() - snap.taken > 0.2 and self._names_unknown_relation(statements, resolved):
            await self.catalog.refresh()  # created since the snapshot, perhaps outside dbguard
            resolved = self.catalog.resolve(masks, self.catalog.snapshot)  # type: ignore[arg-type]
            key = (sql, id(resolved))
        schema = lineage.Schema(resolved.masked_columns, resolved.view_reaches_masked, resolved.is_user_function,
                                resolved.all_columns, resolved.unique_masked)
        reason = None
        plans: list[CopyPlan] = []
        try:
            for raw in statements:
                lineage.check(raw.stmt, schema)
                if isinstance(raw.stmt, pglast.ast.CopyStmt):
                    plan = plan_copy(raw.stmt, resolved, self.hash_key)
                    if plan is not None:
                        plans.append(plan)
        except lineage.Refused as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - an unforeseen tree shape: refuse, never pass
            reason = f"dbguard could not check the statement ({type(exc).__name__}); it is refused"
        self._verdicts[key] = (reason, tuple(plans))
        if len(self._verdicts) > MAX_CACHED:
            self._verdicts.popitem(last=False)
        return resolved, reason, tuple(plans)

    @staticmethod
    def _names_unknown_relation(statements: tuple, resolved: IdentityMasks) -> bool:
        nodes = list(all_nodes(statements))
        ctes = {c.ctename for n in nodes if isinstance(n, pglast.ast.WithClause) for c in n.ctes or ()}
        return any(isinstance(n, pglast.ast.RangeVar) and not (n.schemaname is None and n.relname in ctes)
                   and not resolved.knows(n.schemaname, n.relname) for n in nodes)
