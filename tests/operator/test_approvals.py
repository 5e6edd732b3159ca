"""Approving by patching an ApprovalRequest, as real API server users: the webhook stamps who
decided from the API server's user info, refuses self-approval, outsiders, second decisions and
expired requests; the operator moves the phase and expires requests on time."""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest
import yaml

from tests.fix_operator import Operator
from tests.fix_postgres import wait_until

APPROVER_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: dbguard-test-approver}
rules:
- apiGroups: [dbguard.io]
  resources: [approvalrequests]
  verbs: [get, list, watch, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dbguard-test-approver}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: dbguard-test-approver}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: carol}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: dave}
"""


def request_doc(name: str, *, requester: str = "bob", min_approvals: int = 1, expires_in: float = 3600,
                **extra: object) -> str:
    statement = "UPDATE customers SET balance = balance + $1 WHERE id = $2"
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_in)
    spec = {"requester": {"user": requester, "groups": ["developers"]}, "database": "shop", "operation": "UPDATE",
            "statement": statement, "parameters": ["100.00", "1"],
            "fingerprint": hashlib.sha256(statement.encode()).hexdigest(),
            "rule": {"name": "balance-change-needs-approval", "policy": "shop-guardrails",
                     "reason": "changing a customer balance needs an approval"},
            "approvers": {"groups": ["dba"]}, "minApprovals": min_approvals, "mode": "reject-and-retry",
            "expiresAt": expires.replace(microsecond=0).isoformat().replace("+00:00", "Z"), **extra}
    return yaml.safe_dump({"apiVersion": "dbguard.io/v1alpha1", "kind": "ApprovalRequest",
                           "metadata": {"name": name}, "spec": spec})


@pytest.fixture
def ns(op: Operator, kube_ns: str) -> str:
    op.kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    return kube_ns


def decide(op: Operator, ns: str, name: str, user: str, decision: str, reason: str = "", **more: object):  # noqa: ANN201
    spec = {"decision": decision, **({"reason": reason} if reason else {}), **more}
    return op.kube.kubectl("-n", ns, "patch", "approvalrequest", name, "--type", "merge",
                           "-p", json.dumps({"spec": spec}), user=user, check=False)


def phase(op: Operator, ns: str, name: str) -> str:
    return (op.get("approvalrequest", ns, name).get("status") or {}).get("phase", "")


def wait_phase(op: Operator, ns: str, name: str, expected: str, timeout: float = 30) -> dict:
    wait_until(lambda: phase(op, ns, name) == expected, timeout=timeout, interval=0.3, what=f"phase {expected}")
    return op.get("approvalrequest", ns, name)


def test_an_approver_approves_by_patch_and_the_webhook_stamps_who(op: Operator, ns: str) -> None:
    op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r1"))
    wait_phase(op, ns, "r1", "Pending")
    # The body claims carol approved too: only what the API server authenticated is recorded.
    forged = [{"user": "carol", "groups": ["dba"], "decision": "Approved", "at": "2026-01-01T00:00:00Z"}]
    r = decide(op, ns, "r1", "alice", "Approved", "CHG-42", approvals=forged)
    assert r.returncode == 0, r.stderr
    obj = wait_phase(op, ns, "r1", "Approved")
    entries = obj["spec"]["approvals"]
    assert [(e["user"], e["decision"], e.get("reason")) for e in entries] == [("alice", "Approved", "CHG-42")]
    assert "dba" in entries[0]["groups"]
    assert obj["status"]["decidedBy"] == "alice"
    decided = next(c for c in obj["status"]["conditions"] if c["type"] == "Decided")
    assert decided["status"] == "True" and "CHG-42" in decided["message"]
    table = op.kube.kubectl("-n", ns, "get", "ar", "r1").stdout
    assert "bob" in table and "UPDATE" in table and "Approved" in table
    # Final: nobody changes it afterwards.
    again = decide(op, ns, "r1", "carol", "Denied", "too late")
    assert again.returncode != 0 and ("final" in again.stderr or "already Approved" in again.stderr), again.stderr


@pytest.mark.parametrize(("user", "decision", "message"), [
    ("bob", "Approved", "cannot approve their own request"),
    ("dave", "Approved", "dave is not an approver"),
    ("alice", "Cancelled", "only the requester (bob) can cancel"),
])
def test_who_may_not_decide_is_refused(op: Operator, ns: str, user: str, decision: str, message: str) -> None:
    op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r2"))
    r = decide(op, ns, "r2", user, decision)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not op.get("approvalrequest", ns, "r2")["spec"].get("approvals")


def test_two_distinct_approvers_are_needed_when_the_rule_says_so(op: Operator, ns: str) -> None:
    op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r3", min_approvals=2))
    wait_phase(op, ns, "r3", "Pending")  # the operator has seen it (it writes no phase before)
    assert decide(op, ns, "r3", "alice", "Approved", "CHG-1").returncode == 0
    wait_until(lambda: len(op.get("ar", ns, "r3")["spec"].get("approvals") or []) == 1, timeout=10,
               what="first approval")
    assert phase(op, ns, "r3") == "Pending"
    twice = decide(op, ns, "r3", "alice", "Approved")
    assert twice.returncode != 0 and "already decided" in twice.stderr
    assert decide(op, ns, "r3", "carol", "Approved", "CHG-1 second pair of eyes").returncode == 0
    obj = wait_phase(op, ns, "r3", "Approved")
    assert obj["status"]["decidedBy"] == "alice,carol"
    assert [e["user"] for e in obj["spec"]["approvals"]] == ["alice", "carol"]


def test_the_requester_can_cancel(op: Operator, ns: str) -> None:
    op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r4"))
    assert decide(op, ns, "r4", "bob", "Cancelled", "sent by mistake").returncode == 0
    assert wait_phase(op, ns, "r4", "Cancelled")["status"]["decidedBy"] == "bob"


def test_requests_expire_and_then_cannot_be_decided(op: Operator, ns: str) -> None:
    op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r5", expires_in=3))
    wait_phase(op, ns, "r5", "Expired", timeout=30)
    late = decide(op, ns, "r5", "alice", "Approved")
    assert late.returncode != 0 and ("expired" in late.stderr or "Expired" in late.stderr), late.stderr


def test_a_new_request_cannot_arrive_decided(op: Operator, ns: str) -> None:
    r = op.kube.kubectl("-n", ns, "create", "-f", "-", input=request_doc("r6", decision="Approved"), check=False)
    assert r.returncode != 0 and "cannot carry a decision" in r.stderr
