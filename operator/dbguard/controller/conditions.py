"""metav1.Condition handling: lastTransitionTime moves only when the status flips."""

from __future__ import annotations

import datetime
from typing import Any


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(existing: list[dict[str, Any]] | None, type_: str, status: bool, reason: str, message: str,
                  generation: int | None) -> list[dict[str, Any]]:
    """The condition list with ``type_`` set (kept in place, others untouched)."""
    value = "True" if status else "False"
    out = [dict(c) for c in (existing or [])]
    for c in out:
        if c.get("type") == type_:
            if c.get("status") != value:
                c["lastTransitionTime"] = now_iso()
            c.update(status=value, reason=reason, message=message[:32000])
            if generation is not None:
                c["observedGeneration"] = generation
            return out
    new = {"type": type_, "status": value, "reason": reason, "message": message[:32000],
           "lastTransitionTime": now_iso()}
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return out


def condition_status(obj: dict[str, Any], type_: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c.get("status", "Unknown")
    return "Unknown"
