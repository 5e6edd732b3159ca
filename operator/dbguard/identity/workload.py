"""Sidecar mode: every local client is the pod's own identity.

Two sources:

* :class:`FixedIdentity` (``--workload-identity USER``): a name given on the command line, for local
  runs and tests; nothing verifies it.
* :class:`WorkloadToken` (``--workload-token-file FILE``): the pod's projected ServiceAccount token
  (audience ``dbguard``), verified with a TokenReview at start - the proxy exits when it cannot be -
  and again whenever the file's content changes (the kubelet rotates it). The identity is the
  review's user (``system:serviceaccount:NS:SA``) and groups.

The file is read when a client connects (it is small, and a change is then seen by the very next
connection). When a changed token cannot be verified, the last verified identity stays in force
until that token's ``exp``; after it, new connections are refused (57P03) with the reason. A token
that failed is tried again after ``retry_after`` seconds, so an unreachable API server does not
cost every connection a timeout.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import pathlib
import time

from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal
from dbguard.identity.tokenreview import TokenReviewer

log = logging.getLogger("dbguard.identity")


class FixedIdentity:
    """``--workload-identity USER``: one identity, taken on trust."""

    def __init__(self, user: str, groups: tuple[str, ...] = ()) -> None:
        self.principal = Principal(user=user, groups=groups, source="workload", workload=user)

    async def current(self) -> Principal:
        return self.principal


def _iso(epoch: float) -> str:
    if math.isinf(epoch):
        return "never"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


class WorkloadToken:
    """``--workload-token-file FILE``: the pod's ServiceAccount, proven by its projected token."""

    def __init__(self, path: str | pathlib.Path, reviewer: TokenReviewer, *, retry_after: float = 10.0) -> None:
        self.path = pathlib.Path(path)
        self.reviewer = reviewer
        self.retry_after = retry_after
        self.principal: Principal | None = None
        self.valid_until = -math.inf  # Unix time: the verified token's exp (inf when it has none)
        self._digest = b""  # SHA-256 of the verified token
        self._failed: tuple[bytes, float] = (b"", -math.inf)  # (digest, monotonic time) of the last failure
        self._last_error = ""

    def _read(self) -> str:
        try:
            token = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise authenticator.Unavailable(f"cannot read the workload token file {self.path}: {exc}") from None
        if not token:
            raise authenticator.Unavailable(f"the workload token file {self.path} is empty")
        return token

    def _accept(self, token: str, digest: bytes, reviewed: Principal) -> None:
        principal = Principal(user=reviewed.user, groups=reviewed.groups, source="workload", workload=reviewed.user)
        exp = authenticator.expiry(token)
        if self.principal != principal:
            log.info("workload identity: %s (groups %s)", principal.user, ", ".join(principal.groups) or "none")
        self.principal = principal
        self.valid_until = exp if exp is not None else math.inf
        self._digest = digest
        self._last_error = ""
        log.info("workload token verified; valid until %s", _iso(self.valid_until))

    def start(self) -> Principal:
        """Verify the token file now (blocking); ConfigError when it cannot be."""
        try:
            token = self._read()
            reviewed = self.reviewer.review(token)
        except authenticator.AuthenticationError as exc:
            raise ConfigError(f"--workload-token-file {self.path}: the workload identity cannot be verified: "
                              f"{exc.reason}") from None
        self._accept(token, hashlib.sha256(token.encode()).digest(), reviewed)
        assert self.principal is not None
        return self.principal

    async def current(self) -> Principal:
        """The identity in force; verifies a changed token first. Unavailable once the last one expired."""
        try:
            token = self._read()
        except authenticator.Unavailable as exc:
            token, self._last_error = "", exc.reason
        digest = hashlib.sha256(token.encode()).digest() if token else b""
        failed_digest, failed_at = self._failed
        retry = digest != failed_digest or time.monotonic() - failed_at >= self.retry_after
        if token and digest != self._digest and retry:
            try:
                reviewed = await self.reviewer.authenticate(token)
            except authenticator.AuthenticationError as exc:
                self._failed = (digest, time.monotonic())
                self._last_error = exc.reason
                log.warning("the workload token file %s changed but cannot be verified (%s); keeping %s until %s",
                            self.path, exc.reason, self.principal.user if self.principal else "-",
                            _iso(self.valid_until))
            else:
                self._accept(token, digest, reviewed)
        if self.principal is None or time.time() >= self.valid_until:
            raise authenticator.Unavailable(
                f"the workload identity expired at {_iso(self.valid_until)} and the token file "
                f"{self.path} could not be verified again: {self._last_error or 'unchanged'}")
        return self.principal

