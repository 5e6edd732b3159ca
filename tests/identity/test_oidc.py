"""OIDC ID tokens against a real loopback issuer (discovery + JWKS over HTTP), then through the real proxy."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization

from dbguard.config import OidcSettings
from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.oidc import OidcAuthenticator
from tests.fix_postgres import Postgres
from tests.fix_proxy import start_proxy
from tests.identity.conftest import (
    AUDIENCE,
    Issuer,
    connection_events,
    hs256_with,
    public_jwk,
    raw_jwt,
    refused,
)


def oidc(issuer: Issuer, **overrides) -> OidcAuthenticator:
    return OidcAuthenticator(OidcSettings(issuer=issuer.url, audience=AUDIENCE, **overrides))


# --- what is accepted ----------------------------------------------------------------------------------


async def test_rs256_and_es256_tokens_from_the_issuer_authenticate_with_their_groups(issuer: Issuer):
    auth = oidc(issuer)
    p = await auth.authenticate(issuer.token(key="rsa", groups=["dba", "oncall"]))
    assert (p.user, p.groups, p.source) == ("alice", ("dba", "oncall"), "oidc")
    p = await auth.authenticate(issuer.token(key="ec", sub="bob", groups="support"))  # one group as a string
    assert (p.user, p.groups) == ("bob", ("support",))
    assert issuer.hits == {"/.well-known/openid-configuration": 1, "/keys": 1}  # keys fetched once, then cached


async def test_username_claim_prefix_and_groups_claim_are_configurable(issuer: Issuer):
    auth = oidc(issuer, username_claim="email", username_prefix="oidc:", groups_claim="roles")
    p = await auth.authenticate(issuer.token(email="ada@example.com", email_verified=True, roles=["dba"]))
    assert (p.user, p.groups) == ("oidc:ada@example.com", ("dba",))
    with pytest.raises(authenticator.Rejected, match="email is not verified"):
        await auth.authenticate(issuer.token(email="ada@example.com", email_verified=False))
    with pytest.raises(authenticator.Rejected, match="no 'email' claim"):
        await auth.authenticate(issuer.token())


async def test_a_single_published_key_serves_tokens_without_a_kid(issuer: Issuer):
    p = await oidc(issuer).authenticate(issuer.token(key="ec", kid=None))  # one ES256 key is published
    assert p.user == "alice"


async def test_explicit_jwks_url_skips_discovery(issuer: Issuer):
    p = await oidc(issuer, jwks_url=issuer.url + "/keys").authenticate(issuer.token())
    assert p.user == "alice"
    assert "/.well-known/openid-configuration" not in issuer.hits


# --- what is refused -----------------------------------------------------------------------------------


def _cases(issuer: Issuer) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    pem = issuer.keys.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = issuer.claims()
    return {
        "wrong audience": (issuer.token(aud="someone-else"), "Audience doesn't match"),
        "audience list without ours": (issuer.token(aud=["a", "b"]), "Audience doesn't match"),
        "wrong issuer": (issuer.token(iss="https://evil.example"), "Invalid issuer"),
        "expired past the leeway": (issuer.token(exp=now - 120), "expired"),
        "not yet valid": (issuer.token(nbf=now + 600), "not yet valid"),
        "no exp": (issuer.token(exp=None), "exp"),
        "alg none": (raw_jwt({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims), "'none' is not accepted"),
        "HS256 with the public key as secret": (
            raw_jwt({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims, hs256_with(pem)), "'HS256' is not accepted"),
        "unknown kid": (issuer.token(key="rogue"), "kid 'rogue-1'"),
        "a published kid, signed by another key": (issuer.token(key="rogue", kid="rsa-1"), "Signature verification"),
        "RS256 header naming the EC key": (issuer.token(key="rsa", kid="ec-1"), "not in the issuer's JWKS"),
        "not a JWT": ("alice-dev-token", "not a JWT"),
        "groups not strings": (issuer.token(groups=[1, 2]), "not a list of strings"),
    }


CASES = ["wrong audience", "audience list without ours", "wrong issuer", "expired past the leeway", "not yet valid",
         "no exp", "alg none", "HS256 with the public key as secret", "unknown kid",
         "a published kid, signed by another key", "RS256 header naming the EC key", "not a JWT", "groups not strings"]


@pytest.mark.parametrize("case", CASES)
async def test_bad_tokens_are_rejected_with_the_reason(issuer: Issuer, case: str):
    token, reason = _cases(issuer)[case]
    with pytest.raises(authenticator.Rejected, match=reason):
        await oidc(issuer).authenticate(token)


async def test_expiry_within_the_leeway_is_accepted(issuer: Issuer):
    p = await oidc(issuer, leeway=30).authenticate(issuer.token(exp=int(time.time()) - 10))
    assert p.user == "alice"


# --- keys: rotation, rate limit, unavailability ---------------------------------------------------------


async def test_a_rotated_key_is_fetched_on_its_first_token(issuer: Issuer):
    auth = oidc(issuer, jwks_min_refresh=0)
    await auth.authenticate(issuer.token())
    issuer.jwks.append(public_jwk(issuer.keys.rogue, "rogue-1"))  # the issuer publishes a new key
    p = await auth.authenticate(issuer.token(key="rogue", sub="carol"))
    assert p.user == "carol"
    assert issuer.hits["/keys"] == 2


async def test_logins_arriving_during_the_first_fetch_wait_for_it(issuer: Issuer):
    auth = oidc(issuer)
    issuer.delay = 0.2
    first = asyncio.create_task(auth.authenticate(issuer.token(sub="u0")))
    while not issuer.hits:  # the fetch is under way
        await asyncio.sleep(0.01)
    principals = await asyncio.gather(first, *(auth.authenticate(issuer.token(sub=f"u{i}")) for i in range(1, 5)))
    assert [p.user for p in principals] == [f"u{i}" for i in range(5)]
    assert issuer.hits == {"/.well-known/openid-configuration": 1, "/keys": 1}


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(issuer: Issuer):
    auth = oidc(issuer, jwks_min_refresh=60)
    await auth.authenticate(issuer.token())
    for i in range(5):
        with pytest.raises(authenticator.Rejected):
            await auth.authenticate(issuer.token(key="rogue", kid=f"made-up-{i}"))
    assert issuer.hits["/keys"] == 1  # the first fetch was just now: made-up kids cause none


async def test_an_unreachable_issuer_is_unavailable_not_rejected(issuer: Issuer):
    token = issuer.token()
    issuer.stop()
    with pytest.raises(authenticator.Unavailable, match="could not be fetched"):
        await oidc(issuer, fetch_timeout=2).authenticate(token)


async def test_a_discovery_document_for_another_issuer_is_not_trusted(issuer: Issuer):
    auth = OidcAuthenticator(OidcSettings(issuer=issuer.url + "/", audience=AUDIENCE))  # trailing slash: not equal
    with pytest.raises(authenticator.Unavailable, match="names issuer"):
        await auth.authenticate(issuer.token(iss=issuer.url + "/"))


@pytest.mark.parametrize("settings, error", [
    (OidcSettings(issuer="http://idp.example.com", audience="a"), "https://"),
    (OidcSettings(issuer="https://idp.example.com", audience=""), "--oidc-audience"),
    (OidcSettings(issuer="", audience="a"), "--oidc-issuer"),
    (OidcSettings(issuer="https://idp.example.com", audience="a", jwks_url="ftp://x/keys"), "--oidc-jwks-url"),
])
def test_bad_oidc_settings_are_config_errors(settings: OidcSettings, error: str):
    with pytest.raises(ConfigError, match=error):
        OidcAuthenticator(settings)


# --- end to end: the real proxy ---------------------------------------------------------------------------


def test_oidc_tokens_through_the_proxy_identity_groups_and_refusals(pg: Postgres, tmp_path, issuer: Issuer):
    proxy = start_proxy(pg, tmp_path, "--auth", "oidc", "--oidc-issuer", issuer.url, "--oidc-audience", AUDIENCE)
    try:
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=app sslmode=disable"
        with psycopg.connect(dsn, user="alice", password=issuer.token(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2,)
            conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 5)")
        # the policy's deny rule on the group ai-agents (agents-read-only) applies to the token's groups
        agent = issuer.token(key="ec", sub="copilot", groups=["ai-agents"])
        with psycopg.connect(dsn, user="copilot", password=agent, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agents-read-only"):
                conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 6)")
        decisions = [e for e in proxy.events() if e["kind"] == "decision"]
        assert {(e["identity"]["user"], e["identity"]["source"]) for e in decisions} == {
            ("alice", "oidc"), ("copilot", "oidc")}
        assert pg.psql("SELECT count(*) FROM orders WHERE amount = 6").strip() == "0"

        now = int(time.time())
        for password, reason in [(issuer.token(aud="other"), "Audience"), (issuer.token(exp=now - 300), "expired"),
                                 (raw_jwt({"alg": "none"}, issuer.claims()), "'none'"),
                                 (issuer.token(key="rogue"), "JWKS")]:
            sqlstate, message = refused(proxy, "alice", password)
            assert (sqlstate, reason in message) == ("28P01", True), message
        sqlstate, message = refused(proxy, "bob", issuer.token())  # alice's token, bob's name
        assert sqlstate == "28P01" and 'belongs to "alice"' in message
        failed = [e for e in connection_events(proxy) if e["authenticated"] is False]
        assert len(failed) == 5 and all(e["sqlstate"] == "28P01" and e["reason"] for e in failed)
    finally:
        proxy.stop()
