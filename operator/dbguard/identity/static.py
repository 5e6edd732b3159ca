"""Static token file: local identities for development, demos and CI.

The file maps bearer tokens (sent as the password) to identities::

    tokens:
      - user: alice
        groups: [developers]
        token: "alice-dev-token"          # clear text, fine for a demo
      - user: bob
        groups: [dba]
        sha256: "5e884898da28..."         # or the SHA-256 hex of the token: keep tokens out of the file

Tokens are compared in constant time; the file never reaches logs.
"""

from __future__ import annotations

import hashlib
import hmac
import pathlib

import yaml

from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal


class StaticTokens:
    """Verifies tokens against a static token file."""

    def __init__(self, entries: list[tuple[bytes, Principal]]) -> None:
        self._entries = entries  # (sha256 digest of the token, principal)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> StaticTokens:
        p = pathlib.Path(path)
        try:
            doc = yaml.safe_load(p.read_text())
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read token file: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
            raise ConfigError(f"{p}: expected a mapping with a 'tokens' list")
        entries: list[tuple[bytes, Principal]] = []
        for i, item in enumerate(doc["tokens"]):
            where = f"{p}: tokens[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: expected a mapping")
            unknown = set(item) - {"user", "groups", "token", "sha256"}
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
            user = item.get("user")
            if not isinstance(user, str) or not user:
                raise ConfigError(f"{where}: 'user' must be a non-empty string")
            groups = item.get("groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
                raise ConfigError(f"{where}: 'groups' must be a list of strings")
            if ("token" in item) == ("sha256" in item):
                raise ConfigError(f"{where}: give exactly one of 'token' or 'sha256'")
            if "token" in item:
                token = item["token"]
                if not isinstance(token, str) or len(token) < 8:
                    raise ConfigError(f"{where}: 'token' must be a string of at least 8 characters")
                digest = hashlib.sha256(token.encode()).digest()
            else:
                try:
                    digest = bytes.fromhex(str(item["sha256"]))
                except ValueError as exc:
                    raise ConfigError(f"{where}: 'sha256' must be 64 hex characters") from exc
                if len(digest) != 32:
                    raise ConfigError(f"{where}: 'sha256' must be 64 hex characters")
            entries.append((digest, Principal(user=user, groups=tuple(groups), source="static")))
        return cls(entries)

    source = "static"

    def lookup(self, token: str) -> Principal | None:
        """The principal the token belongs to, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._entries:  # no early exit: timing must not tell which entry matched
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    async def authenticate(self, token: str) -> Principal:
        """The Authenticator face (dbguard.identity.authenticator): Rejected when the token is unknown."""
        principal = self.lookup(token)
        if principal is None:
            raise authenticator.Rejected("the token is not in the token file")
        return principal
