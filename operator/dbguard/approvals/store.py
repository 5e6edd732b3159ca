"""The ApprovalRequest model the stores share, and the store interface.

A request is the same document in both stores: ``{"metadata": {...}, "spec": {...}, "status":
{...}}`` with the spec of the ApprovalRequest resource (docs/crds.md), so the decision rules in
``decisions`` apply unchanged to the Kubernetes and the local store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import secrets
import struct
import uuid
from typing import Any, Protocol

import orjson

from dbguard.approvals import decisions


def fingerprint(statement: str, params: tuple[str | None, ...] | list[str | None], database: str, user: str,
                formats: tuple[int, ...] | list[int] = (), types: tuple[int, ...] | list[int] = ()) -> str:
    """SHA-256 over the exact text, the parameters (with their wire formats and declared types),
    the database and the identity.

    An approval runs this statement, with these parameters, in this database, for this identity:
    change any of them and it is another request. Formats and types are part of it because the
    same shown value can mean something else in another format (text '\\x61' vs binary bytes).
    """
    doc = orjson.dumps({"statement": statement, "params": list(params), "database": database, "user": user,
                        "formats": list(formats), "types": list(types)}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(doc).hexdigest()


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """The fingerprint a stored request's own fields give (a forged request's claim does not match)."""
    return fingerprint(spec.get("statement", ""), list(spec.get("parameters") or []), spec.get("database", ""),
                       (spec.get("requester") or {}).get("user", ""), list(spec.get("parameterFormats") or []),
                       list(spec.get("parameterTypes") or []))


_BINARY = {  # type OID -> decoder of the binary format, for the types clients send in binary
    16: lambda b: {b"\x00": "false", b"\x01": "true"}[b],  # boolrecv takes any non-zero byte: others shown as hex
    20: lambda b: str(struct.unpack("!q", b)[0]),
    21: lambda b: str(struct.unpack("!h", b)[0]),
    23: lambda b: str(struct.unpack("!i", b)[0]),
    26: lambda b: str(struct.unpack("!I", b)[0]),
    700: lambda b: _float(struct.unpack("!f", b)[0]),
    701: lambda b: _float(struct.unpack("!d", b)[0]),
    25: lambda b: b.decode("utf-8"),
    1043: lambda b: b.decode("utf-8"),
    2950: lambda b: str(uuid.UUID(bytes=b)),
}


def _float(value: float) -> str:
    if value != value:  # NaN payloads differ in their bits: show the bytes
        raise ValueError("NaN")
    return repr(value)


def expand_formats(formats: tuple[int, ...], count: int) -> tuple[int, ...]:
    """A Bind's format codes, one per parameter (none: all text; one: the same for all)."""
    if len(formats) == 1:
        return formats * count
    return formats or (0,) * count


def params_as_text(params: tuple[bytes | None, ...], formats: tuple[int, ...],
                   types: tuple[int, ...] = ()) -> tuple[str | None, ...]:
    """Bind parameters as an approver reads them: text as sent, binary decoded by the Parse type
    where dbguard knows the type, else as \\x hex (the form bytea uses); NULL as None."""
    out: list[str | None] = []
    for i, (p, fmt) in enumerate(zip(params, expand_formats(formats, len(params)), strict=False)):
        if p is None:
            out.append(None)
        elif fmt == 1:
            decoder = _BINARY.get(types[i] if i < len(types) else 0)
            try:
                out.append(decoder(p) if decoder is not None else "\\x" + p.hex())
            except (struct.error, ValueError, KeyError, UnicodeDecodeError):
                out.append("\\x" + p.hex())
        else:
            out.append(p.decode("utf-8", "replace"))
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NewRequest:
    requester: str
    groups: tuple[str, ...]
    database: str
    access: str
    proxy: str
    operation: str
    statement: str
    parameters: tuple[str | None, ...]
    fingerprint: str
    rule: str
    policy: str
    reason: str
    approver_groups: tuple[str, ...]
    approver_users: tuple[str, ...]
    min_approvals: int
    mode: str
    ttl_seconds: int
    estimated_rows: int | None = None
    parameter_formats: tuple[int, ...] = ()
    parameter_types: tuple[int, ...] = ()

    def name(self) -> str:
        prefix = (self.access or "dbguard")[:40].rstrip("-")
        return f"{prefix}-{self.fingerprint[:8]}-{secrets.token_hex(3)}"

    def to_spec(self, now: datetime.datetime) -> dict[str, Any]:
        expires = now + datetime.timedelta(seconds=self.ttl_seconds)
        spec: dict[str, Any] = {
            "requester": {"user": self.requester, "groups": list(self.groups)},
            "database": self.database, "proxy": self.proxy, "operation": self.operation,
            "statement": self.statement, "parameters": list(self.parameters), "fingerprint": self.fingerprint,
            "rule": {"name": self.rule, "policy": self.policy, "reason": self.reason},
            "approvers": {"groups": list(self.approver_groups), "users": list(self.approver_users)},
            "minApprovals": self.min_approvals, "mode": self.mode,
            "expiresAt": expires.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
        if self.parameter_formats:
            spec["parameterFormats"] = list(self.parameter_formats)
        if self.parameter_types:
            spec["parameterTypes"] = list(self.parameter_types)
        if self.access:
            spec["access"] = self.access
        if self.estimated_rows is not None:
            spec["estimatedRows"] = self.estimated_rows
        return spec


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A stored request and the phase its approvals give it now."""

    name: str
    doc: dict[str, Any]

    def phase(self, now: datetime.datetime | None = None) -> str:
        # Computed from the stamped approvals, never taken from status (which the requester's
        # ServiceAccount could write); only Executed is read from status: it is our own claim.
        status = self.doc.get("status") or {}
        if status.get("phase") == "Executed" or (status.get("execution") or {}).get("at"):
            return "Executed"
        view = {"spec": self.doc.get("spec") or {}, "status": {}}
        return decisions.phase_of(view, now or datetime.datetime.now(datetime.UTC))[0]

    def problem(self, *, fingerprint: str, user: str, rule: str, settings: dict[str, Any]) -> str:
        """Why this stored request cannot stand for the statement at hand ('' when it can).

        Whoever may create requests (a workload's ServiceAccount) could write any spec: the proxy
        believes only what it can check against the statement, the identity and the rule in force.
        """
        spec = self.spec
        if spec.get("fingerprint") != fingerprint or spec_fingerprint(spec) != fingerprint:
            return "its fingerprint does not match its own statement, parameters, database and requester"
        if (spec.get("requester") or {}).get("user") != user:
            return "it was made for another requester"
        if (spec.get("rule") or {}).get("name") != rule:
            return "it names another rule"
        approvers = spec.get("approvers") or {}
        if (sorted(approvers.get("groups") or []) != sorted(settings.get("approverGroups") or [])
                or sorted(approvers.get("users") or []) != sorted(settings.get("approverUsers") or [])):
            return "its approvers are not the rule's"
        if int(spec.get("minApprovals") or 1) < int(settings.get("minApprovals") or 1):
            return "it asks for fewer approvals than the rule"
        created = (self.doc.get("metadata") or {}).get("creationTimestamp")
        ttl = int(settings.get("ttlSeconds") or 3600)
        try:
            if created is None or (decisions.parse_time(spec["expiresAt"]) - decisions.parse_time(created)
                                   > datetime.timedelta(seconds=ttl + 120)):
                return "it expires later than the rule allows"
        except (KeyError, ValueError):
            return "its times do not parse"
        return ""

    def trusted_phase(self, settings: dict[str, Any], now: datetime.datetime | None = None) -> str:
        """The phase from the approvals of people the *rule* names as approvers (never the requester)."""
        status = self.doc.get("status") or {}
        if status.get("phase") == "Executed" or (status.get("execution") or {}).get("at"):
            return "Executed"
        spec = self.spec
        requester = (spec.get("requester") or {}).get("user", "")
        groups = set(settings.get("approverGroups") or [])
        users = set(settings.get("approverUsers") or [])
        entries = [a for a in spec.get("approvals") or []
                   if (a.get("decision") == "Cancelled" and a.get("user") == requester)
                   or (a.get("user") != requester and (a.get("user") in users or groups & set(a.get("groups") or [])))]
        view = {"spec": {**spec, "approvals": entries}, "status": {}}
        return decisions.phase_of(view, now or datetime.datetime.now(datetime.UTC))[0]

    @property
    def spec(self) -> dict[str, Any]:
        return self.doc.get("spec") or {}



def with_outcome(execution: dict[str, Any], *, rows: int | None, error: str | None,
                 ledger_entry: int | None) -> dict[str, Any]:
    """A request's ``status.execution`` with the outcome of its run added."""
    out = dict(execution)
    if rows is not None:
        out["rowsAffected"] = rows
    if error:
        out["error"] = error[:1024]
    if ledger_entry is not None:
        out["ledgerEntry"] = ledger_entry
    return out


class ThreadedStore:
    """The async interface over a store's blocking calls (SQLite, the Kubernetes client), in threads."""

    def find_sync(self, fingerprint: str) -> list[Request]:
        raise NotImplementedError

    def create_sync(self, new: NewRequest) -> Request:
        raise NotImplementedError

    def get_sync(self, name: str) -> Request | None:
        raise NotImplementedError

    def claim_sync(self, name: str, proxy: str) -> bool:
        raise NotImplementedError

    def finish_sync(self, name: str, *, rows: int | None, error: str | None, ledger_entry: int | None) -> None:
        raise NotImplementedError

    async def find(self, fingerprint: str) -> list[Request]:
        return await asyncio.to_thread(self.find_sync, fingerprint)

    async def create(self, new: NewRequest) -> Request:
        return await asyncio.to_thread(self.create_sync, new)

    async def get(self, name: str) -> Request | None:
        return await asyncio.to_thread(self.get_sync, name)

    async def claim(self, name: str, proxy: str) -> bool:
        return await asyncio.to_thread(self.claim_sync, name, proxy)

    async def finish(self, name: str, *, rows: int | None, error: str | None, ledger_entry: int | None) -> None:
        await asyncio.to_thread(self.finish_sync, name, rows=rows, error=error, ledger_entry=ledger_entry)


class ApprovalStore(Protocol):
    kind: str  # "kubernetes" or "local": how approvers decide (the hint the client gets)

    async def find(self, fingerprint: str) -> list[Request]:
        """Requests with this fingerprint, newest first."""

    async def create(self, new: NewRequest) -> Request: ...

    async def get(self, name: str) -> Request | None: ...

    async def claim(self, name: str, proxy: str) -> bool:
        """Mark an Approved request Executed; True for exactly one caller, ever."""

    async def finish(self, name: str, *, rows: int | None, error: str | None, ledger_entry: int | None) -> None:
        """Record the outcome of the execution this proxy claimed."""

    def approve_hint(self, name: str, namespace: str = "") -> str: ...
