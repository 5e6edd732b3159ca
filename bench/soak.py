#!/usr/bin/env python3
"""A bounded soak of one dbguard proxy: 1,000 client connections held for the whole run, traffic
through them, memory sampled over time, a ~1 GB result streamed at the end, and the ledger
checked against what the clients saw.

Starts its own PostgreSQL (max_connections = 1100: the proxy opens one server connection per
client) and one proxy with the SQLite ledger (signed checkpoints) and /metrics, all on loopback.
--workers clients run statements at once, each cycling through its share of the held connections
(so every connection works, and the latency is the proxy's, not a 1,000-deep queue's): a simple
allowed read, and every --write-every'th statement a write (durable in the ledger before it runs).
After a clean SIGTERM the ledger's decision and completion entries are counted against the
statements the clients saw answered: they must be equal.

Prints one table (markdown). The CI never runs this; `--minutes` shortens it (default 10).
Usage: python bench/soak.py [--minutes 10] [--clients 1000] [--workers 32] [--sample 10] [--stream-mb 1000]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import uvloop  # noqa: E402

from tests.fix_postgres import APP_PASSWORD, free_port, reset_schema, stop_postgres, wait_until  # noqa: E402
from tests.fix_proxy import EXAMPLE_POLICY, EXAMPLE_TOKENS, TOKENS  # noqa: E402
from tests.reliability.harness import (  # noqa: E402
    RawClient,
    RssSampler,
    audit,
    count_statements,
    histogram,
    histogram_delta,
    histogram_quantile,
    keygen,
    quantile,
    raise_nofile,
    rss_kib,
    scrape,
    start_big_postgres,
)

READ = "SELECT n FROM soak WHERE id = $1"
WRITE = "UPDATE soak SET n = n + 1 WHERE id = $1"
USERS = ("alice", "bob", "sam", "frida")


def start_proxy(pg_port: int, tmp: pathlib.Path, metrics_port: int, key: pathlib.Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "dbguard", "proxy", "--listen", f"127.0.0.1:{port}",
           "--upstream", f"postgresql://app@127.0.0.1:{pg_port}/app?sslmode=disable",
           "--policy", str(EXAMPLE_POLICY), "--tokens", str(EXAMPLE_TOKENS), "--events", "none",
           "--ledger", str(tmp / "ledger.db"), "--ledger-signing-key", str(key),
           "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "WARNING"]
    env = {**os.environ, "DBGUARD_UPSTREAM_PASSWORD": APP_PASSWORD}  # never in the process list
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "proxy.log", "wb"), env=env)  # noqa: SIM115
    wait_until(lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0,
               timeout=30, what="dbguard")
    return proc, port


class Soak:
    def __init__(self, args: argparse.Namespace, proxy: subprocess.Popen, port: int, metrics_port: int,
                 pg) -> None:  # noqa: ANN001 - tests.fix_postgres.Postgres
        self.args = args
        self.proxy = proxy
        self.port = port
        self.metrics_port = metrics_port
        self.pg = pg
        self.reads = 0
        self.writes = 0
        self.errors: list[str] = []
        self.read_rtt = array.array("d")  # seconds, client-observed, allowed reads
        self.rss: list[tuple[float, int]] = []  # (seconds into the soak, KiB)
        self.lag: list[int] = []  # dbguard_ledger_queue at each RSS sample
        self.row: dict[str, str] = {}

    async def connect_all(self) -> list[asyncpg.Connection]:
        gate = asyncio.Semaphore(50)  # the proxy's listen backlog is 100

        async def one(i: int) -> asyncpg.Connection:
            user = USERS[i % len(USERS)]
            async with gate:
                return await asyncpg.connect(host="127.0.0.1", port=self.port, user=user, password=TOKENS[user],
                                             database="app", ssl=False, timeout=60, statement_cache_size=4)

        return list(await asyncio.gather(*(one(i) for i in range(self.args.clients))))

    async def worker(self, w: int, conns: list[asyncpg.Connection], deadline: float) -> None:
        mine = conns[w::self.args.workers]
        i = 0
        while time.monotonic() < deadline:
            conn = mine[i % len(mine)]
            row = (w * 7919 + i) % self.args.clients + 1
            i += 1
            try:
                if i % self.args.write_every == 0:
                    await conn.execute(WRITE, row)
                    self.writes += 1
                else:
                    t0 = time.perf_counter()
                    await conn.fetchval(READ, row)
                    self.read_rtt.append(time.perf_counter() - t0)
                    self.reads += 1
            except (asyncpg.PostgresError, OSError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    async def sample_rss(self, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.rss.append((time.monotonic() - t0, rss_kib(self.proxy.pid)))
            self.lag.append(int(scrape(self.metrics_port).get("dbguard_ledger_queue", -1)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.sample)

    def stream(self) -> tuple[int, float, int, int]:
        """~--stream-mb of result rows read by a raw client; returns bytes, seconds, RSS before and peak."""
        rows = self.args.stream_mb * 1_000_000 // 1011
        client = RawClient(self.port)
        client.login("bob", TOKENS["bob"])
        before = rss_kib(self.proxy.pid)
        with RssSampler(self.proxy.pid, 0.05) as sampler:
            t0 = time.monotonic()
            client.query(f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})")
            received = client.drain_result()
            took = time.monotonic() - t0
        client.close()
        return received, took, before, sampler.peak

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        rss_start = rss_kib(self.proxy.pid)
        t0 = time.monotonic()
        conns = await self.connect_all()
        connect_s = time.monotonic() - t0
        await asyncio.sleep(1)
        rss_idle = rss_kib(self.proxy.pid)
        server_side = int(self.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip())
        before = scrape(self.metrics_port)
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = loop.create_task(self.sample_rss(t0, stop))
        deadline = t0 + self.args.minutes * 60
        await asyncio.gather(*(self.worker(w, conns, deadline) for w in range(self.args.workers)))
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
        self.rss.append((elapsed, rss_kib(self.proxy.pid)))
        after = scrape(self.metrics_port)
        held_at_end = after["dbguard_sessions"]
        received, took, stream_before, stream_peak = await loop.run_in_executor(None, self.stream)
        await asyncio.gather(*(c.close(timeout=60) for c in conns), return_exceptions=True)

        stmt = histogram_delta(histogram(after, "dbguard_statement_duration_seconds"),
                               histogram(before, "dbguard_statement_duration_seconds"))
        policy = histogram_delta(histogram(after, "dbguard_policy_evaluation_seconds"),
                                 histogram(before, "dbguard_policy_evaluation_seconds"))
        policy_all = histogram(after, "dbguard_policy_evaluation_seconds")
        statements = self.reads + self.writes
        busy_peak = max(kib for _, kib in self.rss)
        mib = 1024
        self.row = {
            "connections held": f"{self.args.clients} for the whole run (server side {server_side}; "
                                f"{held_at_end:.0f} at the end); opened in {connect_s:.1f} s",
            "duration, workers": f"{elapsed:.0f} s, {self.args.workers} statements in flight",
            "statements": f"{statements} ({self.reads} reads, {self.writes} writes), "
                          f"**{statements / elapsed:.0f}/s**; errors {len(self.errors)}",
            "client round trip, allowed read": f"p50 {quantile(list(self.read_rtt), 0.5) * 1e3:.2f} ms, "
                                               f"p99 {quantile(list(self.read_rtt), 0.99) * 1e3:.2f} ms",
            "dbguard_statement_duration_seconds": f"p50 {histogram_quantile(stmt, 0.5) * 1e3:.2f} ms, "
                                                  f"p99 {histogram_quantile(stmt, 0.99) * 1e3:.2f} ms "
                                                  f"({stmt[-1][1]:.0f} statements)",
            "dbguard_policy_evaluation_seconds": (
                f"p50 {histogram_quantile(policy_all, 0.5) * 1e3:.2f} ms, "
                f"p99 {histogram_quantile(policy_all, 0.99) * 1e3:.2f} ms "
                f"({policy_all[-1][1]:.0f} evaluations: cache misses only, {policy[-1][1]:.0f} during the soak)"),
            "proxy RSS": f"{rss_start / mib:.0f} MiB at start, {rss_idle / mib:.0f} MiB with {self.args.clients} "
                         f"idle, {busy_peak / mib:.0f} MiB peak under traffic, "
                         f"{self.rss[-1][1] / mib:.0f} MiB at the end",
            "RSS per connection": f"{(rss_idle - rss_start) / self.args.clients:.1f} KiB idle, "
                                  f"{(busy_peak - rss_start) / self.args.clients:.1f} KiB busy",
            f"RSS every {self.args.sample:g} s (MiB)": " ".join(f"{kib / mib:.0f}" for _, kib in self.rss),
            "ledger queue at those samples (entries)": " ".join(str(n) for n in self.lag),
            f"{received / 1e9:.2f} GB result streamed": f"{received / 1e6 / took:.0f} MB/s, proxy RSS "
                                                         f"+{(stream_peak - stream_before) / mib:.1f} MiB",
        }

    def finish(self, db: pathlib.Path, pub: pathlib.Path) -> None:
        reads = count_statements(db, lambda s: s == READ)
        writes = count_statements(db, lambda s: s.startswith("UPDATE soak SET n = n +"))
        equal = (reads["decisions"] == reads["completions"] == self.reads
                 and writes["decisions"] == writes["completions"] == self.writes)
        self.row["ledger entries vs statements seen"] = (
            f"reads {reads['decisions']} decisions / {reads['completions']} completions vs {self.reads}; "
            f"writes {writes['decisions']} / {writes['completions']} vs {self.writes}: "
            f"**{'equal' if equal else 'NOT EQUAL'}**")
        r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
        self.row["audit verify"] = r.stdout.strip() or r.stderr.strip()
        if self.errors:
            self.row["first errors"] = "; ".join(self.errors[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the traffic phase (default 10)")
    ap.add_argument("--clients", type=int, default=1000, help="connections held for the whole run (default 1000)")
    ap.add_argument("--workers", type=int, default=32, help="statements in flight at once (default 32)")
    ap.add_argument("--write-every", type=int, default=10, help="every Nth statement is a write (default 10)")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    ap.add_argument("--stream-mb", type=int, default=1000, help="size of the streamed result (default 1000 MB)")
    args = ap.parse_args()
    raise_nofile(args.clients * 2 + 256)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-soak-"))
    pg = start_big_postgres(tmp / "pg", max_connections=max(1100, args.clients + 100))
    proxy = None
    try:
        reset_schema(pg)
        pg.psql("SET ROLE app; CREATE TABLE soak (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);"
                f"INSERT INTO soak SELECT g, 0 FROM generate_series(1, {args.clients}) g")
        priv, pub = keygen(tmp)
        metrics_port = free_port()
        proxy, port = start_proxy(pg.port, tmp, metrics_port, priv)
        print(f"soak: {args.clients} connections, {args.workers} workers, {args.minutes:g} min, "
              f"1 write in {args.write_every}, RSS every {args.sample:g} s", flush=True)
        soak = Soak(args, proxy, port, metrics_port, pg)
        uvloop.run(soak.run())
        proxy.send_signal(signal.SIGTERM)  # a clean stop commits what is queued
        rc = proxy.wait(timeout=120)
        if rc != 0:
            print(f"proxy exited with {rc}:\n{(tmp / 'proxy.log').read_text()[-3000:]}")
        soak.finish(tmp / "ledger.db", pub)
        print("\n| measure | value |\n|---|---|")
        for key, value in soak.row.items():
            print(f"| {key} | {value} |")
        return 0 if "NOT EQUAL" not in soak.row["ledger entries vs statements seen"] and not soak.errors else 1
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
        stop_postgres(pg)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
