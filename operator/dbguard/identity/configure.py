"""IdentitySettings -> what the proxy asks about each client: an Authenticator (gateway mode,
the password is a token) or a workload identity (sidecar mode, every client is the pod)."""

from __future__ import annotations

import dataclasses

from dbguard.config import IdentitySettings
from dbguard.errors import ConfigError
from dbguard.identity.authenticator import Authenticator
from dbguard.identity.workload import FixedIdentity, WorkloadToken

MODES = ("token", "workload", "tokenreview", "oidc", "workload-token")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Exactly one of the two is set."""

    authenticator: Authenticator | None = None
    workload: FixedIdentity | WorkloadToken | None = None


def from_settings(s: IdentitySettings) -> Identity:
    """Build (and for a workload token, verify now) the identity source; ConfigError when it cannot be."""
    if s.mode == "token":
        from dbguard.identity.static import StaticTokens

        return Identity(authenticator=StaticTokens.load(s.tokens_file))
    if s.mode == "workload":
        if not s.workload_user:
            raise ConfigError("--workload-identity needs a user name")
        return Identity(workload=FixedIdentity(s.workload_user, s.workload_groups))
    if s.mode == "oidc":
        from dbguard.identity.oidc import OidcAuthenticator

        return Identity(authenticator=OidcAuthenticator(s.oidc))
    if s.mode in ("tokenreview", "workload-token"):
        from dbguard.identity import tokenreview

        if not s.token_audience:
            raise ConfigError("--token-audience must not be empty")
        reviewer = tokenreview.TokenReviewer(tokenreview.load_api_client(s.kubeconfig), audience=s.token_audience,
                                             timeout=s.review_timeout, cache_ttl=s.review_cache_ttl,
                                             cache_size=s.review_cache_size)
        if s.mode == "tokenreview":
            return Identity(authenticator=reviewer)
        workload = WorkloadToken(s.workload_token_file, reviewer)
        workload.start()
        return Identity(workload=workload)
    raise ConfigError(f"unknown identity mode {s.mode!r} (one of {', '.join(MODES)})")
