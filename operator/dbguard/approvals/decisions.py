"""ApprovalRequest decisions: who decided (stamped from the API server), who may, and the phase.

The decider writes ``spec.decision`` (and ``spec.reason``) with ``kubectl patch``. The mutating
webhook turns that into an entry of ``spec.approvals`` with the user and groups the API server
authenticated — never anything from the request body — and the validating webhook refuses what
must not happen. The phase follows from the entries:

- any ``Denied`` -> Denied; the requester's ``Cancelled`` -> Cancelled;
- ``minApprovals`` distinct approvers' ``Approved`` -> Approved;
- past ``expiresAt`` while not decided -> Expired; Executed is written by the proxy that ran it.
"""

from __future__ import annotations

import datetime
from typing import Any

FINAL_PHASES = frozenset({"Denied", "Expired", "Cancelled", "Executed"})
DECISIONS = ("Approved", "Denied", "Cancelled")


class Refused(ValueError):
    """The API request is refused; the message goes back to kubectl."""


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _iso(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def stamp(old: dict[str, Any] | None, new: dict[str, Any], userinfo: dict[str, Any],
          now: datetime.datetime) -> dict[str, Any] | None:
    """The spec to store (or None to keep the body's): a decision in the body becomes a stamped entry.

    A decision attempt is an update that sets ``spec.decision`` while the stored request has
    none. The stored ``spec.decision`` (final by schema) appears only once the decision is
    complete: a denial, the requester's cancellation, or the last of ``minApprovals`` distinct
    approvals. Until then each approval is only an entry, so the next approver patches the very
    same ``{"spec":{"decision":"Approved"}}``, and updates that decide nothing (labels, kopf's
    annotations) never add an entry.
    """
    if old is None:
        return None  # creation: the validating webhook refuses decisions and approvals in a new request
    new_spec = new.get("spec") or {}
    old_spec = old.get("spec") or {}
    approvals = list(old_spec.get("approvals") or [])
    spec = dict(new_spec)
    spec["approvals"] = approvals  # entries come only from here, never from the body
    decision = new_spec.get("decision")
    if old_spec.get("decision") or not decision:
        return spec
    entry = {"user": userinfo.get("username", ""), "groups": list(userinfo.get("groups") or []),
             "decision": decision, "at": _iso(now)}
    if new_spec.get("reason"):
        entry["reason"] = str(new_spec["reason"])[:1024]
    spec["approvals"] = [*approvals, entry]
    approved = {a.get("user") for a in spec["approvals"] if a.get("decision") == "Approved"}
    complete = decision != "Approved" or len(approved) >= int(old_spec.get("minApprovals", 1))
    if not complete:
        spec.pop("decision", None)
        spec.pop("reason", None)
    return spec


def check(old: dict[str, Any] | None, new: dict[str, Any], userinfo: dict[str, Any], now: datetime.datetime) -> None:
    """Raise Refused for what no one may do; pass otherwise (sees the request after stamp())."""
    spec = new.get("spec") or {}
    if old is None:
        if spec.get("decision") or spec.get("approvals"):
            raise Refused("a new ApprovalRequest cannot carry a decision or approvals; approvers add them with "
                          "kubectl patch")
        return
    old_spec = old.get("spec") or {}
    before = old_spec.get("approvals") or []
    after = spec.get("approvals") or []
    if after[:len(before)] != before:
        raise Refused("approvals can only be added by the webhook, never changed")
    added = after[len(before):]
    if not added:
        return
    if len(added) != 1:
        raise Refused("one decision per request")
    entry = added[0]
    user, groups, decision = entry.get("user", ""), set(entry.get("groups") or []), entry.get("decision")
    if user != userinfo.get("username"):
        raise Refused("an approval entry must name the user the API server authenticated")
    phase = (old.get("status") or {}).get("phase", "Pending")
    if phase in FINAL_PHASES or phase == "Approved":
        raise Refused(f"this request is already {phase}; a decision is final")
    expires = old_spec.get("expiresAt")
    if expires and parse_time(expires) <= now:
        raise Refused(f"this request expired at {expires}; the statement must be sent again for a new request")
    requester = (old_spec.get("requester") or {}).get("user", "")
    if decision == "Cancelled":
        if user != requester:
            raise Refused(f"only the requester ({requester}) can cancel this request")
        return
    if decision not in DECISIONS:
        raise Refused(f"unknown decision {decision!r}; use one of {list(DECISIONS)}")
    if user == requester:
        raise Refused(f"{user} sent this statement and cannot {'approve' if decision == 'Approved' else 'deny'} "
                      "their own request")
    if any(a.get("user") == user for a in before):
        raise Refused(f"{user} has already decided on this request")
    approvers = old_spec.get("approvers") or {}
    if user not in (approvers.get("users") or []) and not groups & set(approvers.get("groups") or []):
        raise Refused(f"{user} is not an approver of this request (approvers: groups "
                      f"{approvers.get('groups') or []}, users {approvers.get('users') or []})")


def phase_of(obj: dict[str, Any], now: datetime.datetime) -> tuple[str, str, str]:
    """(phase, decided by, reason) from the approvals, the minimum and the clock."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if (status.get("execution") or {}).get("at"):
        return "Executed", status.get("decidedBy", ""), ""  # a proxy claimed it: nothing else can follow
    current = status.get("phase", "Pending")
    if current in FINAL_PHASES:
        return current, (obj.get("status") or {}).get("decidedBy", ""), ""
    approvals = spec.get("approvals") or []
    for a in approvals:
        if a.get("decision") == "Denied":
            return "Denied", a.get("user", ""), a.get("reason", "")
        if a.get("decision") == "Cancelled":
            return "Cancelled", a.get("user", ""), a.get("reason", "")
    expires = spec.get("expiresAt")
    if expires and parse_time(expires) <= now:
        return "Expired", "", ""  # approved or not: an approval runs only before it expires
    approvers = [a.get("user", "") for a in approvals if a.get("decision") == "Approved"]
    distinct = list(dict.fromkeys(approvers))
    if len(distinct) >= int(spec.get("minApprovals", 1)):
        return "Approved", ",".join(distinct), "; ".join(a.get("reason", "") for a in approvals if a.get("reason"))
    return "Pending", "", ""
