"""The proxy with a real OPA server as its engine (--engine opa): OPA hung or down fails closed
within --policy-timeout and the connection survives; the proxy recovers when OPA answers again."""

from __future__ import annotations

import itertools
import pathlib
import signal
import subprocess
import time

import psycopg
import pytest

from tests.fix_opa import _healthy
from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import Proxy, start_proxy

POLICY_TIMEOUT = 0.3
MARGIN = 0.7  # scheduling on a busy 2-core machine; still well under a second
_shapes = itertools.count(1)


class Opa:
    """One real ``opa run --server`` on a fixed port, so it can be stopped and started again there."""

    def __init__(self, binary: pathlib.Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.binary), "run", "--server", "--addr", f"127.0.0.1:{self.port}",
                                      "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _healthy(self.url), timeout=30, what="OPA server")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def opa_proxy(big_pg: Postgres, tmp_path, opa: pathlib.Path) -> tuple[Opa, Proxy]:
    server = Opa(opa)
    server.start()
    proxy = start_proxy(big_pg, tmp_path, "--engine", "opa", "--opa-url", server.url,
                        "--policy-timeout", str(POLICY_TIMEOUT))
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.kill()


def new_shape() -> str:
    """A statement the decision cache has not seen: a table name never used before.

    The table does not exist, so an allowed statement comes back from PostgreSQL as 42P01 and a
    refused one from dbguard (57014 past the deadline, 42501 when OPA cannot answer).
    """
    return f"SELECT * FROM opa_probe_{next(_shapes)}"


def outcome(conn: psycopg.Connection, sql: str) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate or "", time.monotonic() - t0
    return "ok", time.monotonic() - t0


ALLOWED = "42P01"  # went through the policy to the server, which has no such table


@pytest.mark.opa
def test_a_hung_opa_fails_closed_within_the_policy_timeout_and_recovers(opa_proxy):
    server, proxy = opa_proxy
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        assert outcome(conn, new_shape())[0] == ALLOWED
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
        server.signal(signal.SIGSTOP)  # hung: accepts connections, answers nothing
        try:
            for _ in range(3):
                state, took = outcome(conn, new_shape())
                assert state == "57014" and took < POLICY_TIMEOUT + MARGIN, (state, took)
            # the connection survives, and decisions made before the outage stay cached
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
        finally:
            server.signal(signal.SIGCONT)
        wait_until(lambda: outcome(conn, new_shape())[0] == ALLOWED, timeout=10, interval=0.2,
                   what="decisions to flow again once OPA answers")
    assert "dbguard:policy-timeout" in proxy.events_path.read_text()


@pytest.mark.opa
def test_an_opa_that_is_down_fails_closed_at_once(opa_proxy):
    server, proxy = opa_proxy
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        assert outcome(conn, new_shape())[0] == ALLOWED
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
        server.kill()  # down: connection refused
        for _ in range(3):
            state, took = outcome(conn, new_shape())
            assert state == "42501" and took < POLICY_TIMEOUT + MARGIN, (state, took)
        # the connection survives, and decisions made before the outage stay cached
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
    refusals = [e for e in proxy.events() if e.get("kind") == "decision" and e.get("rule") == "dbguard:policy-error"]
    assert len(refusals) == 3 and all(e["outcome"] == "refused" for e in refusals)


@pytest.mark.opa
def test_an_opa_that_restarts_empty_gets_the_bundle_again_and_decisions_recover(opa_proxy):
    server, proxy = opa_proxy
    with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
        assert outcome(conn, new_shape())[0] == ALLOWED
        server.kill()
        assert outcome(conn, new_shape())[0] == "42501"
        server.start()  # same address, fresh process: no policies loaded
        last: list[str] = []

        def recovered() -> bool:
            try:
                conn.execute(new_shape())
            except psycopg.Error as exc:
                last[:] = [f"{exc.sqlstate}: {exc}"]
                return exc.sqlstate == ALLOWED
            return False

        try:
            wait_until(recovered, timeout=5, interval=0.2, what="decisions to flow again once OPA is back")
        except TimeoutError as exc:
            raise AssertionError(f"still refused 5 s after OPA came back: {last}") from exc
