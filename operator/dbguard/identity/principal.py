"""Who is asking."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated identity: what policies match on and the ledger records."""

    user: str  # e.g. "alice" or "system:serviceaccount:shop:api"
    groups: tuple[str, ...] = ()
    source: str = "static"  # how it was authenticated: static, workload, tokenreview, oidc
    workload: str = ""  # pod / ServiceAccount the proxy serves, in sidecar mode
    end_user: str = ""  # optional claim passed by the app; recorded, never trusted for authorization

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "groups": list(self.groups),
            "source": self.source,
            "workload": self.workload,
            "end_user": self.end_user,
        }
