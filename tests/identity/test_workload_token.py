"""Sidecar mode with a projected ServiceAccount token file, verified by a real kube-apiserver."""

from __future__ import annotations

import os
import pathlib
import time

import psycopg
import pytest

from tests.fix_kube import KubePlane
from tests.fix_postgres import Postgres, wait_until
from tests.fix_proxy import Proxy, start_proxy
from tests.identity.conftest import create_sa, refused, sa_token
from tests.identity.test_tokenreview import forged


def write_token(path: pathlib.Path, token: str) -> None:
    """Replace the file atomically, as the kubelet does (new file, then rename)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(token)
    os.replace(tmp, path)


def whoami(proxy: Proxy) -> dict:
    """The identity the proxy gives a new connection (from its connection event)."""
    def logins() -> list[dict]:
        return [e for e in proxy.events() if e["kind"] == "connection" and e["authenticated"]]

    before = len(logins())
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=app user=app sslmode=disable application_name=probe"
    with psycopg.connect(dsn, autocommit=True) as conn:  # no password: sidecar mode asks for none
        conn.execute("SELECT 1")
    return wait_until(lambda: logins()[before:], what="the connection event")[0]["identity"]


def test_the_proxy_is_the_serviceaccount_of_its_token_file_and_follows_rotation(
        pg: Postgres, tmp_path: pathlib.Path, kube: KubePlane, kube_ns: str, reviewer_kubeconfig: pathlib.Path):
    for sa in ("api", "worker"):
        create_sa(kube, kube_ns, sa)
    token_file = tmp_path / "token"
    write_token(token_file, sa_token(kube, kube_ns, "api"))
    proxy = start_proxy(pg, tmp_path, "--workload-token-file", str(token_file), "--kubeconfig",
                        str(reviewer_kubeconfig))
    try:
        identity = whoami(proxy)
        api = f"system:serviceaccount:{kube_ns}:api"
        assert (identity["user"], identity["workload"], identity["source"]) == (api, api, "workload")
        assert f"system:serviceaccounts:{kube_ns}" in identity["groups"]
        assert identity["end_user"] == "probe"  # recorded, never trusted

        write_token(token_file, sa_token(kube, kube_ns, "worker"))  # the kubelet puts another token in place
        assert whoami(proxy)["user"] == f"system:serviceaccount:{kube_ns}:worker"
    finally:
        proxy.stop()


@pytest.mark.parametrize("content", ["not-a-token", None])
def test_a_token_file_that_cannot_be_verified_at_start_stops_the_proxy(
        pg: Postgres, tmp_path: pathlib.Path, reviewer_kubeconfig: pathlib.Path, content: str | None):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(RuntimeError, match="exited with 2") as exc:
        start_proxy(pg, tmp_path, "--workload-token-file", str(token_file), "--kubeconfig", str(reviewer_kubeconfig))
    assert "the workload identity cannot be verified" in str(exc.value)
    assert ("invalid bearer token" if content else "cannot read the workload token file") in str(exc.value)


def test_a_token_that_fails_to_refresh_keeps_the_identity_until_the_old_one_expires(
        pg: Postgres, tmp_path: pathlib.Path, kube: KubePlane, kube_ns: str, reviewer_kubeconfig: pathlib.Path):
    create_sa(kube, kube_ns, "batch")
    now = int(time.time())
    # A token that expires soon, but not before a slow machine has started the proxy and logged in twice.
    short = forged(kube, sa_token(kube, kube_ns, "batch"), iat=now, nbf=now, exp=now + 15)
    token_file = tmp_path / "token"
    write_token(token_file, short)
    proxy = start_proxy(pg, tmp_path, "--workload-token-file", str(token_file), "--kubeconfig",
                        str(reviewer_kubeconfig))
    try:
        batch = f"system:serviceaccount:{kube_ns}:batch"
        assert whoami(proxy)["user"] == batch
        write_token(token_file, "garbage-after-rotation")  # a refresh that cannot be verified
        assert whoami(proxy)["user"] == batch  # the last verified identity holds ...
        assert "cannot be verified" in proxy.log()
        wait_until(lambda: time.time() > now + 15, timeout=20, what="the token's exp")
        sqlstate, message = refused(proxy, "app", "")  # ... until its exp: then new connections are refused
        assert sqlstate == "57P03" and "workload identity expired" in message, message
        failed = [e for e in proxy.events() if e["kind"] == "connection" and not e["authenticated"]]
        assert failed and failed[-1]["sqlstate"] == "57P03"
    finally:
        proxy.stop()
