"""Identity test helpers: a real loopback OIDC issuer, ServiceAccount tokens from the real API server."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import http.server
import json
import pathlib
import threading
import time
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fix_kube import KubePlane
from tests.fix_proxy import Proxy

AUDIENCE = "dbguard"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(header: dict[str, Any], claims: dict[str, Any], sign=None) -> str:  # noqa: ANN001 - bytes -> bytes
    """A JWT put together by hand (for algorithms PyJWT will not produce: none, HS256 with a PEM secret)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = sign(signing_input.encode()) if sign is not None else b""
    return signing_input + "." + b64url(signature)


def hs256_with(secret: bytes):  # noqa: ANN201
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


@dataclasses.dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rogue: rsa.RSAPrivateKey  # never published


@pytest.fixture(scope="session")
def oidc_keys() -> Keys:
    return Keys(rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec=ec.generate_private_key(ec.SECP256R1()),
                rogue=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    jwk = algo.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


class Issuer:
    """An OIDC issuer on loopback: discovery document + JWKS over a real HTTP server."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.jwks: list[dict[str, Any]] = [public_jwk(keys.rsa, "rsa-1"), public_jwk(keys.ec, "ec-1")]
        self.hits: dict[str, int] = {}
        self.delay = 0.0  # seconds each answer takes (a slow issuer)
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                time.sleep(issuer.delay)
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/keys",
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
                elif self.path == "/keys":
                    body = {"keys": issuer.jwks}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "nbf": now - 5, "exp": now + 300,
                  "groups": ["developers"]}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, key: str = "rsa", kid: str | None = "", headers: dict | None = None, **claims: Any) -> str:
        """A token signed by one of the keys ("rsa", "ec", "rogue"), kid defaulting to its published one."""
        private = {"rsa": self.keys.rsa, "ec": self.keys.ec, "rogue": self.keys.rogue}[key]
        alg = "ES256" if key == "ec" else "RS256"
        if kid == "":
            kid = {"rsa": "rsa-1", "ec": "ec-1", "rogue": "rogue-1"}[key]
        hdr = {"kid": kid} if kid is not None else {}
        hdr.update(headers or {})
        return jwt.encode(self.claims(**claims), private, algorithm=alg, headers=hdr)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer(oidc_keys: Keys) -> Issuer:
    it = Issuer(oidc_keys)
    yield it
    it.stop()


# -- Kubernetes --------------------------------------------------------------------------------------


def create_sa(kube: KubePlane, ns: str, name: str) -> None:
    kube.kubectl("-n", ns, "create", "serviceaccount", name)


def sa_token(kube: KubePlane, ns: str, name: str, audience: str = AUDIENCE) -> str:
    return kube.kubectl("-n", ns, "create", "token", name, "--audience", audience).stdout.strip()


def sa_kubeconfig(kube: KubePlane, path: pathlib.Path, ns: str, name: str) -> pathlib.Path:
    """A kubeconfig that acts as ServiceAccount NS/NAME (a token for the API server's own audience)."""
    token = kube.kubectl("-n", ns, "create", "token", name).stdout.strip()
    path.write_text(
        f"apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {kube.server}\n"
        f"    certificate-authority: {kube.ca_file}\nusers:\n- name: sa\n  user:\n    token: {token}\n"
        f"contexts:\n- name: test\n  context:\n    cluster: test\n    user: sa\ncurrent-context: test\n")
    return path


@pytest.fixture(scope="session")
def reviewer_kubeconfig(kube: KubePlane, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Credentials of the proxy itself: a ServiceAccount bound to system:auth-delegator, as docs/identity.md says."""
    ns = kube.namespace("dbguard-system")
    create_sa(kube, ns, "proxy")
    kube.kubectl("create", "clusterrolebinding", f"{ns}-proxy-auth-delegator", "--clusterrole=system:auth-delegator",
                 f"--serviceaccount={ns}:proxy")
    return sa_kubeconfig(kube, tmp_path_factory.mktemp("proxy-sa") / "kubeconfig", ns, "proxy")


# -- connecting through the proxy ----------------------------------------------------------------------


async def _refusal(proxy: Proxy, user: str, password: str) -> tuple[str, str]:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=password,
                                     database="app", ssl=False, timeout=15)
    except asyncpg.PostgresError as exc:
        return exc.sqlstate, str(exc)
    await conn.close()
    raise AssertionError(f"{user} was let in")


def refused(proxy: Proxy, user: str, password: str) -> tuple[str, str]:
    """(SQLSTATE, message) of a login the proxy refuses (asyncpg reports the SQLSTATE of a FATAL)."""
    import asyncio

    return asyncio.run(_refusal(proxy, user, password))


def connection_events(proxy: Proxy) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e["kind"] == "connection"]
