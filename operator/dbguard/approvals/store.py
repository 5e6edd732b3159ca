"""The ApprovalRequest model the stores share, and the store interface.

A request is the same document in both stores: ``{"metadata": {...}, "spec": {...}, "status":
{...}}`` with the spec of the ApprovalRequest resource (docs/crds.md), so the decision rules in
``decisions`` apply unchanged to the Kubernetes and the local store.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import secrets
import struct
import uuid
from typing import Any, Protocol

import orjson

from dbguard.approvals import decisions


def fingerprint(statement: str, params: tuple[str | None, ...], database: str, user: str) -> str:
    """SHA-256 over the exact text, the parameters, the database and the identity.

    An approval runs this statement, with these parameters, in this database, for this identity:
    change any of them and it is another request.
    """
    doc = orjson.dumps({"statement": statement, "params": list(params), "database": database, "user": user},
                       option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(doc).hexdigest()


_BINARY = {  # type OID -> decoder of the binary format, for the types clients send in binary
    16: lambda b: "true" if b == b"\x01" else "false",
    20: lambda b: str(struct.unpack("!q", b)[0]),
    21: lambda b: str(struct.unpack("!h", b)[0]),
    23: lambda b: str(struct.unpack("!i", b)[0]),
    26: lambda b: str(struct.unpack("!I", b)[0]),
    700: lambda b: repr(struct.unpack("!f", b)[0]),
    701: lambda b: repr(struct.unpack("!d", b)[0]),
    25: lambda b: b.decode("utf-8"),
    1043: lambda b: b.decode("utf-8"),
    2950: lambda b: str(uuid.UUID(bytes=b)),
}


def params_as_text(params: tuple[bytes | None, ...], formats: tuple[int, ...],
                   types: tuple[int, ...] = ()) -> tuple[str | None, ...]:
    """Bind parameters as an approver reads them: text as sent, binary decoded by the Parse type
    where dbguard knows the type, else as \\x hex (the form bytea uses); NULL as None."""
    out: list[str | None] = []
    for i, p in enumerate(params):
        fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
        if p is None:
            out.append(None)
        elif fmt == 1:
            decoder = _BINARY.get(types[i] if i < len(types) else 0)
            try:
                out.append(decoder(p) if decoder is not None else "\\x" + p.hex())
            except (struct.error, ValueError):
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

    @property
    def spec(self) -> dict[str, Any]:
        return self.doc.get("spec") or {}

    def expires_at(self) -> datetime.datetime:
        return decisions.parse_time(self.spec["expiresAt"])


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
