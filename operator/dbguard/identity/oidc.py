"""OIDC ID tokens (JWT), verified against the issuer's published keys (JWKS).

What is trusted: a token signed with RS256 or ES256 by a key in the issuer's JWKS, whose ``iss``
is exactly the configured issuer, whose ``aud`` holds the configured audience, and which is
within ``exp``/``nbf`` (with ``leeway`` seconds of clock skew). ``none``, HS* and every other
algorithm are refused before any key is looked at, so a public key can never serve as an HMAC
secret. The user name is one claim (``sub`` by default; with ``email``, an ``email_verified``
claim, when present, must be true, as Kubernetes requires), optionally prefixed; groups come from
another claim (a list of strings or one string).

Keys: the JWKS URL comes from ``ISSUER/.well-known/openid-configuration`` (whose ``issuer`` must
match) unless given. Keys are fetched on first use, refreshed after ``jwks_max_age``, and fetched
again when a token names an unknown ``kid`` - at most once per ``jwks_min_refresh`` seconds, so
made-up kids cannot turn the proxy against the issuer. Fetches run in a thread with a timeout;
when no keys could ever be fetched, logins fail closed with Unavailable.

Issuer and JWKS URLs must be https, except on loopback (a local test issuer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import jwt

from dbguard.config import OidcSettings
from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal

log = logging.getLogger("dbguard.identity")

ALGORITHMS = ("RS256", "ES256")
_MAX_DOCUMENT = 1024 * 1024  # bytes of a discovery document or JWKS


def check_url(url: str, what: str) -> str:
    """``url`` if it is https, or http to a loopback host; else ConfigError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return url
    raise ConfigError(f"{what} must be an https:// URL (http:// only on loopback), got {url!r}")


def _fetch_json(url: str, timeout: float) -> Any:
    """GET a JSON document (blocking; run in a thread)."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "dbguard"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # the scheme was checked by check_url
        body = resp.read(_MAX_DOCUMENT + 1)
    if len(body) > _MAX_DOCUMENT:
        raise ValueError(f"document larger than {_MAX_DOCUMENT} bytes")
    return json.loads(body)


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    alg: str  # from the JWK (its alg, else its kty/crv), never from a token
    key: Any  # cryptography public key


def _jwk_algorithm(data: dict[str, Any]) -> str | None:
    if isinstance(data.get("alg"), str):
        return data["alg"]
    if data.get("kty") == "RSA":
        return "RS256"
    if data.get("kty") == "EC" and data.get("crv") == "P-256":
        return "ES256"
    return None


def parse_jwks(doc: Any) -> list[SigningKey]:
    """The usable signature keys of a JWKS document (RS256 / ES256 keys; others skipped)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys = []
    for data in doc["keys"]:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        alg = _jwk_algorithm(data)
        if alg not in ALGORITHMS:
            continue
        try:
            jwk = jwt.PyJWK(data, algorithm=alg)
        except jwt.PyJWTError:
            continue  # malformed, or a key type that does not fit its alg
        kid = data.get("kid")
        keys.append(SigningKey(kid=kid if isinstance(kid, str) else None, alg=alg, key=jwk.key))
    return keys


def pick_key(keys: list[SigningKey], kid: str | None, alg: str) -> SigningKey | None:
    """The key a token header names: by ``kid``, of the header's algorithm; without a kid, the only
    key of that algorithm."""
    matching = [k for k in keys if k.alg == alg]
    if kid is not None:
        matching = [k for k in matching if k.kid == kid]
    return matching[0] if len(matching) == 1 or (kid is not None and matching) else None


def principal_from_claims(claims: dict[str, Any], settings: OidcSettings) -> Principal:
    """User and groups from verified claims; Rejected when they are missing or malformed."""
    name = claims.get(settings.username_claim)
    if not isinstance(name, str) or not name:
        raise authenticator.Rejected(f"the token has no {settings.username_claim!r} claim to name the user")
    if settings.username_claim == "email" and claims.get("email_verified", True) is not True:
        raise authenticator.Rejected("the token's email is not verified (email_verified is not true)")
    groups = claims.get(settings.groups_claim, [])
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise authenticator.Rejected(f"the token's {settings.groups_claim!r} claim is not a list of strings")
    return Principal(user=settings.username_prefix + name, groups=tuple(g for g in groups if g), source="oidc")


class OidcAuthenticator:
    """Authenticator for OIDC ID tokens (``--auth oidc``)."""

    source = "oidc"

    def __init__(self, settings: OidcSettings) -> None:
        if not settings.issuer:
            raise ConfigError("--auth oidc needs --oidc-issuer URL")
        if not settings.audience:
            raise ConfigError("--auth oidc needs --oidc-audience AUD (the client ID tokens are issued for)")
        check_url(settings.issuer, "--oidc-issuer")
        if settings.jwks_url:
            check_url(settings.jwks_url, "--oidc-jwks-url")
        self.settings = settings
        self._jwks_url = settings.jwks_url
        self._keys: list[SigningKey] = []
        self._fetched_at = -float("inf")  # monotonic time of the last successful fetch
        self._attempted_at = -float("inf")  # ... of the last attempt, successful or not
        self._last_error = ""
        self._fetching: asyncio.Task[None] | None = None
        self.fetches = 0

    # -- keys ----------------------------------------------------------------------------------

    def _fetch_keys_blocking(self) -> list[SigningKey]:
        s = self.settings
        if not self._jwks_url:
            url = s.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = _fetch_json(url, s.fetch_timeout)
            if not isinstance(doc, dict) or doc.get("issuer") != s.issuer:
                raise ValueError(f"the discovery document at {url} names issuer "
                                 f"{doc.get('issuer') if isinstance(doc, dict) else None!r}, not {s.issuer!r}")
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError(f"the discovery document at {url} has no jwks_uri")
            try:
                self._jwks_url = check_url(jwks_uri, "jwks_uri")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        keys = parse_jwks(_fetch_json(self._jwks_url, s.fetch_timeout))
        if not keys:
            raise ValueError(f"the JWKS at {self._jwks_url} has no RS256 or ES256 signing key")
        return keys

    async def _refresh(self) -> None:
        """Fetch the keys once (concurrent callers share the fetch); keep the old ones on failure."""
        if self._fetching is None:
            self._fetching = asyncio.get_running_loop().create_task(self._do_refresh())
            self._fetching.add_done_callback(lambda _t: setattr(self, "_fetching", None))
        await asyncio.shield(self._fetching)

    async def _do_refresh(self) -> None:
        self._attempted_at = time.monotonic()
        self.fetches += 1
        try:
            keys = await asyncio.wait_for(asyncio.to_thread(self._fetch_keys_blocking),
                                          self.settings.fetch_timeout + 1)
        except (OSError, ValueError, TimeoutError, urllib.error.URLError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"[:300]
            if not self.settings.jwks_url:
                self._jwks_url = ""  # discover again next time
            log.warning("OIDC keys of %s could not be fetched: %s", self.settings.issuer, self._last_error)
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        self._last_error = ""
        log.info("OIDC keys of %s fetched: %s", self.settings.issuer,
                 ", ".join(f"{k.kid or '-'}/{k.alg}" for k in keys))

    async def _key_for(self, kid: str | None, alg: str) -> SigningKey:
        s = self.settings
        if self._fetching is not None:  # a fetch is under way: wait for its keys
            await asyncio.shield(self._fetching)
        now = time.monotonic()
        may_fetch = now - self._attempted_at >= s.jwks_min_refresh
        if may_fetch and (not self._keys or now - self._fetched_at >= s.jwks_max_age):
            await self._refresh()
            may_fetch = False
        if not self._keys:
            raise authenticator.Unavailable(f"the OIDC issuer's keys could not be fetched "
                                            f"({self._last_error or 'fetched too recently to retry'})")
        key = pick_key(self._keys, kid, alg)
        if key is None and may_fetch:  # perhaps the issuer rotated its keys
            await self._refresh()
            key = pick_key(self._keys, kid, alg)
        if key is None:
            which = f"kid {kid!r}" if kid is not None else "no kid, and not exactly one key"
            raise authenticator.Rejected(f"the token's signing key ({which}, {alg}) is not in the issuer's JWKS")
        return key

    # -- tokens --------------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise authenticator.Rejected("the password is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise authenticator.Rejected(f"the token's algorithm {alg!r} is not accepted (only RS256, ES256)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise authenticator.Rejected("the token's kid is not a string")
        key = await self._key_for(kid, alg)
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.alg], audience=s.audience, issuer=s.issuer,
                                leeway=s.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise authenticator.Rejected(f"the OIDC token is not valid: {exc}") from None
        return principal_from_claims(claims, s)
