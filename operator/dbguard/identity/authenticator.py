"""The one interface behind every way a gateway client proves who it is.

A client sends a bearer token as its password (AuthenticationCleartextPassword, over TLS in
production). An :class:`Authenticator` turns the token into a :class:`Principal` or raises:

* :class:`Rejected` - the token is not valid (unknown, expired, wrong audience, bad signature ...).
  The session answers FATAL 28P01, as PostgreSQL does for a wrong password.
* :class:`Unavailable` - the token cannot be verified right now (the Kubernetes API server or the
  OIDC issuer is unreachable, timed out, or refuses the proxy). Fail closed: the session answers
  FATAL 57P03 (``cannot_connect_now``), which drivers and poolers treat as "try again later",
  unlike 28P01 which says the credentials are wrong.

Implementations: :mod:`dbguard.identity.static` (token file), :mod:`dbguard.identity.tokenreview`
(Kubernetes TokenReview), :mod:`dbguard.identity.oidc` (JWT against an issuer's JWKS). Sidecar mode
has no client tokens: :mod:`dbguard.identity.workload` gives every client the pod's own identity.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

from dbguard.errors import DbguardError
from dbguard.identity.principal import Principal
from dbguard.sqlstate import SqlState

SERVICEACCOUNT_PREFIX = "system:serviceaccount:"


class AuthenticationError(DbguardError):
    """A token was not turned into a principal; ``reason`` is written for people (never holds the token)."""

    sqlstate = SqlState.INVALID_PASSWORD

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(AuthenticationError):
    """The token is not valid: 28P01."""


class Unavailable(AuthenticationError):
    """The token cannot be verified now (verifier unreachable, timed out, misconfigured): 57P03, fail closed."""

    sqlstate = SqlState.CANNOT_CONNECT_NOW


class Authenticator(Protocol):
    """Turns a bearer token into the principal it belongs to."""

    source: str  # Principal.source of what it returns: static, tokenreview, oidc

    async def authenticate(self, token: str) -> Principal:
        """The token's principal; raises :class:`Rejected` or :class:`Unavailable`."""
        ...


def login_matches(requested: str, principal: Principal) -> bool:
    """Whether the ``user`` of the startup packet fits the authenticated principal.

    The token alone decides who the client is; the user name is a consistency check so a client
    never believes it is someone else. Accepted: no user, the principal's exact user name, or, for a
    ServiceAccount ``system:serviceaccount:NS:SA``, its short form ``NS:SA``.
    """
    if not requested or requested == principal.user:
        return True
    if principal.user.startswith(SERVICEACCOUNT_PREFIX):
        return requested == principal.user[len(SERVICEACCOUNT_PREFIX):]
    return False


def unverified_claims(token: str) -> dict:
    """The payload of a JWT *without* checking its signature: only for tokens already verified
    by someone else (a TokenReview), e.g. to read ``exp``. Empty when it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT, unverified; None when absent or not a JWT."""
    exp = unverified_claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
