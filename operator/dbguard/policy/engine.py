"""The policy engine interface: input document in, Decision out."""

from __future__ import annotations

from typing import Any, Protocol

from dbguard.policy.decision import Decision, EnforcementAction, PolicyAction


class PolicyEvaluationError(Exception):
    """The policy could not be evaluated: the statement must be refused."""


class PolicyEngine(Protocol):
    revision: str

    def evaluate(self, input_doc: dict[str, Any]) -> Decision:
        """Evaluate ``data.dbguard.decision`` for one input; raise PolicyEvaluationError on failure."""
        ...


def decision_from_result(result: Any, revision: str) -> Decision:
    """The Rego decision object -> Decision; anything unexpected is an evaluation error."""
    if not isinstance(result, dict):
        raise PolicyEvaluationError(f"policy returned no decision (got {result!r})")
    try:
        return Decision(action=PolicyAction(result["action"]), enforced=PolicyAction(result["enforced"]),
                        rule=str(result.get("rule") or ""), policy=str(result.get("policy") or ""),
                        reason=str(result.get("reason") or ""),
                        enforcement=EnforcementAction(result.get("enforcement", "deny")), revision=revision,
                        approval=result.get("approval"))
    except (KeyError, ValueError) as exc:
        raise PolicyEvaluationError(f"policy returned a malformed decision: {exc}") from exc
