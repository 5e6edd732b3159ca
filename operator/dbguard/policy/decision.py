"""Decision values: what the policy says about one statement."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class PolicyAction(str, enum.Enum):
    """What a rule asks for."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require-approval"

    def __str__(self) -> str:
        return self.value


class EnforcementAction(str, enum.Enum):
    """How a policy's non-allow decisions are enforced (as in Gatekeeper)."""

    DENY = "deny"  # enforce: refuse / hold for approval
    DRYRUN = "dryrun"  # record what would have happened, let it run
    WARN = "warn"  # let it run and send the client a NoticeResponse warning

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome for one statement.

    ``action`` is what the rule said; ``enforced`` is what the proxy does after
    ``enforcement`` is applied (dryrun/warn turn deny and require-approval into allow).
    """

    action: PolicyAction
    enforced: PolicyAction
    rule: str  # name of the rule that decided ("" for the policy's default)
    policy: str  # name of the GuardrailPolicy the rule belongs to
    reason: str
    enforcement: EnforcementAction = EnforcementAction.DENY
    revision: str = ""  # policy bundle revision the decision was made with
    approval: dict[str, Any] | None = None  # approval settings of the rule (approvers, ttl, mode ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "enforced": self.enforced.value,
            "rule": self.rule,
            "policy": self.policy,
            "reason": self.reason,
            "enforcement": self.enforcement.value,
            "revision": self.revision,
            "approval": self.approval,
        }
