"""Connection caps: per proxy (--max-connections) and per identity (--max-connections-per-identity).

Past a cap the login fails with SQLSTATE 53300 (as PostgreSQL's own "too many clients"), the
connections already held are untouched, and a freed slot can be taken again.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
import uvloop

from tests.fix_postgres import Postgres, free_port
from tests.fix_proxy import TOKENS, start_proxy
from tests.reliability.harness import raise_nofile, scrape


def _login_error(proxy, user: str) -> asyncpg.PostgresError:  # noqa: ANN001 - a tests.fix_proxy.Proxy
    """The error of a login that must fail (asyncpg reports a FATAL's SQLSTATE; libpq does not)."""
    async def attempt() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=TOKENS[user],
                                     database="app", ssl=False, timeout=5)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as exc:
        asyncio.run(attempt())
    return exc.value


def test_the_proxy_cap_refuses_one_more_client_with_53300_and_frees_the_slot(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--max-connections", "5")
    held = [psycopg.connect(proxy.dsn(("alice", "bob")[i % 2]), autocommit=True) for i in range(5)]
    try:
        err = _login_error(proxy, "sam")
        assert err.sqlstate == "53300" and "too many" in str(err), str(err)
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in held)  # the five are untouched
        held.pop().close()
        with psycopg.connect(proxy.dsn("sam"), autocommit=True) as conn:  # the freed slot
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in held:
            c.close()
        proxy.stop()


def test_the_identity_cap_limits_one_identity_and_not_the_others(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--max-connections-per-identity", "2")
    alice = [psycopg.connect(proxy.dsn("alice"), autocommit=True) for _ in range(2)]
    try:
        err = _login_error(proxy, "alice")
        assert err.sqlstate == "53300" and "too many" in str(err) and "alice" in str(err), str(err)
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as bob, \
                psycopg.connect(proxy.dsn("bob"), autocommit=True) as bob2:
            assert bob.execute("SELECT 1").fetchone() == bob2.execute("SELECT 1").fetchone() == (1,)
        alice.pop().close()
        alice.append(psycopg.connect(proxy.dsn("alice"), autocommit=True))  # her slot is free again
        assert alice[-1].execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in alice:
            c.close()
        proxy.stop()


async def _swarm(port: int, users: list[str]) -> tuple[list[asyncpg.Connection], list[BaseException]]:
    gate = asyncio.Semaphore(50)

    async def one(user: str) -> asyncpg.Connection:
        async with gate:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=TOKENS[user],
                                         database="app", ssl=False, timeout=30)

    results = await asyncio.gather(*(one(u) for u in users), return_exceptions=True)
    return ([r for r in results if isinstance(r, asyncpg.Connection)],
            [r for r in results if not isinstance(r, asyncpg.Connection)])


def test_caps_hold_exactly_when_hundreds_log_in_at_once(big_pg: Postgres, tmp_path):
    raise_nofile(4096)
    metrics_port = free_port()
    proxy = start_proxy(big_pg, tmp_path, "--max-connections", "300", "--max-connections-per-identity", "100",
                        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "WARNING")

    async def go() -> None:
        # 150 alice (50 too many for her), then 200 bob/sam/frida (50 too many for the proxy)
        conns, errors = await _swarm(proxy.port, ["alice"] * 150)
        try:
            assert len(conns) == 100 and len(errors) == 50
            assert all(getattr(e, "sqlstate", "") == "53300" and "alice" in str(e) for e in errors), errors[:3]
            more, errors = await _swarm(proxy.port, ["bob", "sam", "frida"] * 83 + ["bob"])  # <= 100 each
            conns += more
            assert len(conns) == 300 and len(errors) == 50, (len(conns), errors[:3])
            assert all(getattr(e, "sqlstate", "") == "53300" for e in errors), errors[:3]
            server_side = int(big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip())
            assert server_side <= 300 + 2  # refused clients never cost a server connection
            assert scrape(metrics_port)["dbguard_sessions"] == 300
            assert all(r == 1 for r in await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns)))
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    try:
        uvloop.run(go())
        seen = scrape(metrics_port)
        assert seen['dbguard_refusals_total{rule="dbguard:too-many-connections"}'] == 100
    finally:
        proxy.stop()
