"""1,000 clients through one proxy at once: memory per idle and per busy connection, and not one
statement missing from the ledger afterwards."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import uvloop

from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import TOKENS, start_proxy
from tests.reliability.harness import RssSampler, count_statements, raise_nofile, rss_kib, scrape

CLIENTS = 1000
ROUNDS = 3  # statements per client while all 1,000 are busy: a read, a write, a read, ... per round
READ = "SELECT n FROM soak WHERE id = $1"
WRITE = "UPDATE soak SET n = n + 1 WHERE id = $1"
WRITE_LOGGED = "UPDATE soak SET n = n + $2 WHERE id = $1"  # constants become $n in the ledger
# Bounds the test holds the proxy to (measured here: ~12 KiB idle and ~21 KiB busy per connection).
IDLE_KIB_PER_CONNECTION = 48
BUSY_KIB_PER_CONNECTION = 96


async def _connect_all(port: int, n: int, parallel: int = 50) -> list[asyncpg.Connection]:
    gate = asyncio.Semaphore(parallel)  # the listen backlog is 100: do not SYN-flood it

    async def one(i: int) -> asyncpg.Connection:
        user = ("alice", "bob", "sam", "frida")[i % 4]
        async with gate:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=TOKENS[user],
                                         database="app", ssl=False, timeout=60, statement_cache_size=4)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _busy(conns: list[asyncpg.Connection]) -> tuple[int, int]:
    async def client(i: int, conn: asyncpg.Connection) -> tuple[int, int]:
        reads = writes = 0
        for _ in range(ROUNDS):
            await conn.fetchval(READ, i + 1)
            reads += 1
            await conn.execute(WRITE, i + 1)
            writes += 1
        return reads, writes

    done = await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    return sum(r for r, _ in done), sum(w for _, w in done)


def test_a_thousand_clients_at_once_cost_bounded_memory_and_lose_no_ledger_entry(big_pg: Postgres, tmp_path):
    raise_nofile(8192)
    metrics_port = free_port()
    db = tmp_path / "ledger.db"
    proxy = start_proxy(big_pg, tmp_path, "--ledger", str(db), "--metrics-listen", f"127.0.0.1:{metrics_port}",
                        "--log-level", "WARNING")
    report: dict[str, float] = {}

    async def swarm() -> tuple[int, int]:
        warm = await _connect_all(proxy.port, 4)  # imports and caches the statement path loads lazily
        for i, c in enumerate(warm):
            await c.fetchval(READ, i + 1)
            await c.execute(WRITE, i + 1)
            await c.close()
        await asyncio.sleep(0.3)
        rss0 = rss_kib(proxy.proc.pid)
        t0 = time.monotonic()
        conns = await _connect_all(proxy.port, CLIENTS)
        report["connect_s"] = time.monotonic() - t0
        try:
            assert len(conns) == CLIENTS
            held = int(big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip())
            assert held >= CLIENTS, f"{held} server connections for {CLIENTS} clients"
            assert scrape(metrics_port)["dbguard_sessions"] == CLIENTS
            await asyncio.sleep(0.5)
            rss_idle = rss_kib(proxy.proc.pid)
            with RssSampler(proxy.proc.pid, 0.05) as sampler:
                t0 = time.monotonic()
                reads, writes = await _busy(conns)
                report["busy_s"] = time.monotonic() - t0
            report.update(rss0_mib=rss0 / 1024, idle_kib=(rss_idle - rss0) / CLIENTS,
                          busy_kib=(sampler.peak - rss0) / CLIENTS, busy_peak_mib=sampler.peak / 1024,
                          statements_per_s=(reads + writes) / report["busy_s"])
            return reads, writes
        finally:
            await asyncio.gather(*(c.close(timeout=30) for c in conns), return_exceptions=True)

    try:
        reads, writes = uvloop.run(swarm())
        wait_until(lambda: scrape(metrics_port)["dbguard_sessions"] == 0, timeout=30, what="sessions to close")
        # every server connection the proxy opened is closed with its client
        wait_until(lambda: big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip() == "0",
                   timeout=30, what="the server connections to close")
    finally:
        proxy.proc.send_signal(signal.SIGTERM)  # a clean stop commits what is queued
        assert proxy.proc.wait(timeout=60) == 0, proxy.log()[-3000:]
    print(f"\n1,000-connection load: {report}")
    assert reads == writes == CLIENTS * ROUNDS
    assert report["idle_kib"] < IDLE_KIB_PER_CONNECTION, report
    assert report["busy_kib"] < BUSY_KIB_PER_CONNECTION, report
    assert int(big_pg.psql("SELECT sum(n) FROM soak").strip()) == writes + 4
    seen_reads = count_statements(db, lambda s: s == READ)
    seen_writes = count_statements(db, lambda s: s == WRITE_LOGGED)
    # every statement the clients saw answered is in the ledger once, with its outcome
    assert seen_reads == {"decisions": reads + 4, "forwarded": reads + 4, "completions": reads + 4}
    assert seen_writes == {"decisions": writes + 4, "forwarded": writes + 4, "completions": writes + 4}


RETAIN_CLIENTS = 300
RETAIN_BOUND_KIB = 16  # what a connection may keep after its statements are done (idle costs ~12 KiB)


def test_a_connection_that_has_sent_much_holds_no_more_memory_than_before(big_pg: Postgres, tmp_path):
    raise_nofile(4096)
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING", "--events", "none")
    big = "z" * 8000

    async def go() -> float:
        conns = await _connect_all(proxy.port, RETAIN_CLIENTS)
        try:
            await asyncio.gather(*(c.fetchval("SELECT length($1::text)", "warm") for c in conns))
            await asyncio.sleep(0.3)
            before = rss_kib(proxy.proc.pid)
            for _ in range(10):  # ~80 KB of Bind messages per connection, each parsed and answered
                assert set(await asyncio.gather(*(c.fetchval("SELECT length($1::text)", big) for c in conns))) \
                    == {8000}
            await asyncio.sleep(0.3)
            return (rss_kib(proxy.proc.pid) - before) / RETAIN_CLIENTS
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    try:
        kept = uvloop.run(go())
    finally:
        proxy.stop()
    print(f"\nmemory a connection keeps after sending ~80 KB: {kept:.1f} KiB")
    assert kept < RETAIN_BOUND_KIB, f"each connection kept {kept:.0f} KiB after its statements were answered"
