"""Kubernetes tokens verified by a real kube-apiserver's TokenReview, then through the real proxy."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import threading
import time

import jwt
import psycopg
import pytest

from dbguard.identity import authenticator
from dbguard.identity.tokenreview import TokenReviewer, load_api_client
from tests.fix_kube import KubePlane
from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import start_proxy
from tests.identity.conftest import AUDIENCE, connection_events, create_sa, refused, sa_kubeconfig, sa_token


def forged(kube: KubePlane, token: str, **claims: object) -> str:
    """``token`` re-signed with the API server's own ServiceAccount key after changing claims (e.g. exp):
    a token the API server itself could have issued."""
    header = jwt.get_unverified_header(token)
    payload = {**authenticator.unverified_claims(token), **claims}
    key = (kube.dir / "pki" / "sa.key").read_bytes()
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": header["kid"]})


def deleted(kube: KubePlane, ns: str, name: str) -> None:
    kube.kubectl("-n", ns, "delete", "serviceaccount", name)
    wait_until(lambda: kube.kubectl("-n", ns, "get", "serviceaccount", name, check=False).returncode != 0,
               what="ServiceAccount deleted")


@pytest.fixture
def reviewer(reviewer_kubeconfig: pathlib.Path) -> TokenReviewer:
    r = TokenReviewer(load_api_client(str(reviewer_kubeconfig)), audience=AUDIENCE)
    yield r
    r.close()


# --- the authenticator against the API server ------------------------------------------------------------


async def test_a_serviceaccount_token_for_dbguard_is_its_serviceaccount(kube: KubePlane, kube_ns: str,
                                                                        reviewer: TokenReviewer):
    create_sa(kube, kube_ns, "reports")
    p = await reviewer.authenticate(sa_token(kube, kube_ns, "reports"))
    assert p.user == f"system:serviceaccount:{kube_ns}:reports" and p.source == "tokenreview"
    assert f"system:serviceaccounts:{kube_ns}" in p.groups and "system:serviceaccounts" in p.groups


async def test_tokens_not_meant_for_dbguard_are_rejected(kube: KubePlane, kube_ns: str, reviewer: TokenReviewer):
    create_sa(kube, kube_ns, "app")
    token = sa_token(kube, kube_ns, "app")
    cases = {
        "another audience": (sa_token(kube, kube_ns, "app", audience="vault"), "audience"),
        "the API server's own audience": (kube.kubectl("-n", kube_ns, "create", "token", "app").stdout.strip(),
                                          "invalid bearer token"),
        "an API server user's static token": (kube.tokens["alice"], "invalid bearer token"),
        "expired (signed by the API server's key)": (forged(kube, token, exp=int(time.time()) - 600,
                                                            iat=int(time.time()) - 1200,
                                                            nbf=int(time.time()) - 1200), "expired"),
        "garbage": ("not-a-token-at-all", "invalid bearer token"),
    }
    for case, (bad, reason) in cases.items():
        try:
            principal = await reviewer.authenticate(bad)
        except authenticator.Rejected as exc:
            assert reason in exc.reason, (case, exc.reason)
        else:
            pytest.fail(f"{case}: accepted as {principal.user}")


async def test_the_token_of_a_deleted_serviceaccount_is_rejected(kube: KubePlane, kube_ns: str,
                                                                 reviewer: TokenReviewer):
    create_sa(kube, kube_ns, "gone")
    token = sa_token(kube, kube_ns, "gone")
    deleted(kube, kube_ns, "gone")
    with pytest.raises(authenticator.Rejected, match='serviceaccounts "gone" not found'):
        await reviewer.authenticate(token)


async def test_successes_are_cached_by_token_hash_for_the_ttl_and_shared_by_concurrent_logins(
        kube: KubePlane, kube_ns: str, reviewer_kubeconfig: pathlib.Path):
    create_sa(kube, kube_ns, "app")
    token = sa_token(kube, kube_ns, "app")
    cached = TokenReviewer(load_api_client(str(reviewer_kubeconfig)), audience=AUDIENCE, cache_ttl=60)
    uncached = TokenReviewer(load_api_client(str(reviewer_kubeconfig)), audience=AUDIENCE, cache_ttl=0)
    try:
        users = {p.user for p in await asyncio.gather(*(cached.authenticate(token) for _ in range(5)))}
        assert users == {f"system:serviceaccount:{kube_ns}:app"} and cached.reviews == 1
        assert all(len(k) == 32 and token.encode() not in k for k in cached._cache)  # SHA-256, never the token
        await uncached.authenticate(token)
        await uncached.authenticate(token)
        assert uncached.reviews == 2  # a TTL of 0 caches nothing
        deleted(kube, kube_ns, "app")
        # The documented revocation delay: a cached success outlives the ServiceAccount for up to the TTL.
        assert (await cached.authenticate(token)).user.endswith(":app") and cached.reviews == 1
    finally:
        cached.close()
        uncached.close()


async def test_an_unreachable_api_server_is_unavailable(kube: KubePlane, tmp_path: pathlib.Path):
    config = tmp_path / "kubeconfig"
    config.write_text(kube.kubeconfig.read_text().replace(kube.server, f"https://127.0.0.1:{free_port()}"))
    reviewer = TokenReviewer(load_api_client(str(config)), audience=AUDIENCE)
    try:
        with pytest.raises(authenticator.Unavailable, match="unreachable"):
            await reviewer.authenticate("some-token")
    finally:
        reviewer.close()


async def test_an_api_server_that_does_not_answer_times_out_as_unavailable(kube: KubePlane, tmp_path: pathlib.Path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers (TLS handshake hangs)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    config = tmp_path / "kubeconfig"
    config.write_text(kube.kubeconfig.read_text().replace(kube.server, f"https://127.0.0.1:{silent.getsockname()[1]}"))
    reviewer = TokenReviewer(load_api_client(str(config)), audience=AUDIENCE, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(authenticator.Unavailable, match="within 0.5s"):
            await reviewer.authenticate("some-token")
        assert time.monotonic() - started < 2
    finally:
        reviewer.close()
        silent.close()
        for s in accepted:
            s.close()


async def test_proxy_credentials_without_tokenreview_rbac_are_unavailable_and_say_so(
        kube: KubePlane, kube_ns: str, tmp_path: pathlib.Path):
    create_sa(kube, kube_ns, "unbound-proxy")
    create_sa(kube, kube_ns, "app")
    reviewer = TokenReviewer(load_api_client(str(sa_kubeconfig(kube, tmp_path / "kc", kube_ns, "unbound-proxy"))),
                             audience=AUDIENCE)
    try:
        with pytest.raises(authenticator.Unavailable, match="403 Forbidden.*system:auth-delegator"):
            await reviewer.authenticate(sa_token(kube, kube_ns, "app"))
    finally:
        reviewer.close()


# --- end to end: the real proxy ----------------------------------------------------------------------------


POLICY = """\
apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata: {{name: ns-guard}}
spec:
  enforcementAction: deny
  defaultAction: allow
  rules:
    - name: namespace-read-only
      match:
        operations: [INSERT, UPDATE, DELETE]
        identities: {{groups: ["system:serviceaccounts:{ns}"]}}
      action: deny
      reason: workloads of {ns} only read
"""


def test_serviceaccount_tokens_through_the_proxy(pg: Postgres, tmp_path: pathlib.Path, kube: KubePlane, kube_ns: str,
                                                 reviewer_kubeconfig: pathlib.Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(ns=kube_ns))
    for sa in ("reports", "gone"):
        create_sa(kube, kube_ns, sa)
    token = sa_token(kube, kube_ns, "reports")
    gone = sa_token(kube, kube_ns, "gone")
    deleted(kube, kube_ns, "gone")
    proxy = start_proxy(pg, tmp_path, "--auth", "tokenreview", "--kubeconfig", str(reviewer_kubeconfig),
                        policy=policy)
    try:
        user = f"system:serviceaccount:{kube_ns}:reports"
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=app sslmode=disable"
        for login in (user, f"{kube_ns}:reports"):  # the full name, or the short NS:SA form
            with psycopg.connect(dsn, user=login, password=token, autocommit=True) as conn:
                assert conn.execute("SELECT current_user, count(*) FROM customers").fetchone() == ("app", 2)
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="namespace-read-only"):
                    conn.execute("DELETE FROM orders WHERE id = 1")  # the rule matched the namespace group
        decisions = [e for e in proxy.events() if e["kind"] == "decision"]
        assert {e["identity"]["user"] for e in decisions} == {user}
        assert all(e["identity"]["source"] == "tokenreview" for e in decisions)
        ok = [e for e in connection_events(proxy) if e["authenticated"]]
        assert len(ok) == 2 and f"system:serviceaccounts:{kube_ns}" in ok[0]["identity"]["groups"]

        now = int(time.time())
        for login, password, reason in [
            (user, sa_token(kube, kube_ns, "reports", audience="vault"), "audience"),
            (user, "garbage-token", "invalid bearer token"),
            (user, forged(kube, token, exp=now - 600, iat=now - 1200, nbf=now - 1200), "expired"),
            (f"system:serviceaccount:{kube_ns}:gone", gone, 'serviceaccounts "gone" not found'),
            ("alice", token, f'belongs to "{user}"'),
        ]:
            sqlstate, message = refused(proxy, login, password)
            assert sqlstate == "28P01" and reason in message, message
        failed = [e for e in connection_events(proxy) if not e["authenticated"]]
        assert len(failed) == 5 and all(e["sqlstate"] == "28P01" for e in failed)
        assert token not in proxy.events_path.read_text() and token not in proxy.log()
    finally:
        proxy.stop()


def test_a_proxy_that_cannot_review_tokens_fails_closed_with_57p03(pg: Postgres, tmp_path: pathlib.Path,
                                                                  kube: KubePlane, kube_ns: str):
    create_sa(kube, kube_ns, "unbound-proxy")
    create_sa(kube, kube_ns, "app")
    config = sa_kubeconfig(kube, tmp_path / "kc", kube_ns, "unbound-proxy")
    proxy = start_proxy(pg, tmp_path, "--auth", "tokenreview", "--kubeconfig", str(config))
    try:
        sqlstate, message = refused(proxy, f"{kube_ns}:app", sa_token(kube, kube_ns, "app"))
        assert sqlstate == "57P03" and "cannot verify" in message and "system:auth-delegator" in message, message
        [event] = connection_events(proxy)
        assert event["authenticated"] is False and event["sqlstate"] == "57P03"
    finally:
        proxy.stop()
