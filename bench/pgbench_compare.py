#!/usr/bin/env python3
"""pgbench directly against PostgreSQL, through PgBouncer and through dbguard, in one run.

dbguard runs three ways: without a ledger, with the embedded SQLite ledger, and with the
PostgreSQL ledger sink (a separate database on the same server); all with signed checkpoints and
no JSON-lines output, so the difference is the ledger. Prints tps, mean latency, the ratio to
direct, to PgBouncer and to dbguard without a ledger, and dbguard's CPU microseconds per statement
(its process CPU time; the ledger's writer process is shown after a +). Everything listens on
loopback; the run is bounded by --duration per cell.

With --rounds N every workload runs N rounds, each round every path once, one after the other
(odd rounds in reverse order, so that no path always runs first or last): the table shows the
median tps and the median of the per-round ratios, which pair runs made within seconds of each
other (single runs on a shared machine swing by 5-10%), and a line per ledger path lists each
round's ratio. Use an even N.

Usage: python bench/pgbench_compare.py [--duration 15] [--clients 16] [--workloads select] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fix_postgres import APP_PASSWORD, Postgres, free_port, start_postgres, stop_postgres  # noqa: E402
from tests.fix_proxy import EXAMPLE_POLICY, EXAMPLE_TOKENS, wait_until  # noqa: E402

WORKLOADS = [  # name, pgbench args, statements per transaction
    ("select-only simple", ["-S", "-M", "simple"], 1),
    ("select-only prepared", ["-S", "-M", "prepared"], 1),
    ("tpc-b simple", ["-M", "simple"], 7),
]


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writer_cpu_seconds(pid: int) -> float:
    """CPU time of the proxy's ledger writer process (its child), 0 without one."""
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in pathlib.Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            total += cpu_seconds(int(child))
    return total


def pgbench(port: int, user: str, password: str, args: list[str], duration: int, clients: int) -> tuple[float, float, int]:
    env = {**os.environ, "PGPASSWORD": password}
    r = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-c", str(clients),
                        "-j", "2", "-T", str(duration), *args, "app"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench failed: {r.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", r.stdout).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", r.stdout).group(1))
    txns = int(re.search(r"number of transactions actually processed: (\d+)", r.stdout).group(1))
    return tps, lat, txns


def init_pgbench(pg: Postgres, scale: int) -> None:
    """pgbench's tables at this scale in database app, owned by the app role."""
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "app", "app"],
                   env={**os.environ, "PGPASSWORD": APP_PASSWORD}, check=True, capture_output=True)


def start_pgbouncer(pg_port: int, tmp: pathlib.Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (tmp / "userlist.txt").write_text(f'"app" "{APP_PASSWORD}"\n')
    ini = tmp / "pgbouncer.ini"
    ini.write_text(f"[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app\n[pgbouncer]\n"
                   f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
                   f"auth_file = {tmp}/userlist.txt\npool_mode = session\nmax_client_conn = 200\n"
                   f"default_pool_size = 40\nunix_socket_dir =\nlogfile = {tmp}/pgbouncer.log\n")
    cmd = ["pgbouncer", str(ini)]
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        for f in tmp.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0,
               timeout=20, what="pgbouncer")
    return proc, port


def start_dbguard(pg_port: int, tmp: pathlib.Path, extra: list[str], name: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "dbguard", "proxy", "--listen", f"127.0.0.1:{port}",
           "--upstream", f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg_port}/app?sslmode=disable",
           "--policy", str(EXAMPLE_POLICY), "--tokens", str(EXAMPLE_TOKENS),
           "--events", "none", "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"))  # noqa: SIM115
    wait_until(lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0,
               timeout=30, what="dbguard")
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (default 15)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--workloads", default="all", choices=("all", "select"),
                    help="all three workloads, or only the two select-only ones")
    ap.add_argument("--no-ledger", action="store_true", help="skip the dbguard-with-ledger rows")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds per workload, every path once per round; medians are shown (default 1)")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-bench-"))
    pg = start_postgres(tmp / "pg")
    procs: list[subprocess.Popen] = []
    try:
        init_pgbench(pg, args.scale)
        (tmp / "bouncer").mkdir()
        bouncer, bouncer_port = start_pgbouncer(pg.port, tmp / "bouncer")
        procs.append(bouncer)
        targets = [("direct", pg.port, "app", APP_PASSWORD, None),
                   ("pgbouncer", bouncer_port, "app", APP_PASSWORD, None)]
        variants = [("dbguard", [])]
        if not args.no_ledger:
            key = tmp / "ledger.key"
            subprocess.run([sys.executable, "-m", "dbguard", "audit", "keygen", "--private-key", str(key),
                            "--public-key", str(tmp / "ledger.pub")], check=True, capture_output=True)
            pg.psql("CREATE DATABASE ledger OWNER app", db="postgres")
            signed = ["--ledger-signing-key", str(key)]
            variants += [("+sqlite", ["--ledger", str(tmp / "ledger.db"), *signed]),
                         ("+pg-sink", ["--ledger", f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/ledger"
                                                   "?sslmode=disable", *signed])]
        for name, extra in variants:
            guard, guard_port = start_dbguard(pg.port, tmp, extra, name)
            procs.append(guard)
            targets.append((name, guard_port, "bob", "bob-dba-token", guard.pid))
        print(f"pgbench: {args.clients} clients, 2 threads, {args.duration}s per cell, scale {args.scale}; "
              f"dbguard with {EXAMPLE_POLICY.relative_to(ROOT)}", flush=True)
        header = (f"{'workload':<22} {'path':<10} {'tps':>9} {'lat ms':>7} {'/direct':>8} {'/pgbouncer':>10} "
                  f"{'/dbguard':>8} {'cpu us/stmt':>11}")
        print(header)
        print("-" * len(header))
        workloads = WORKLOADS if args.workloads == "all" else [w for w in WORKLOADS if "select" in w[0]]
        for name, wargs, stmts in workloads:
            tps_of: dict[str, list[float]] = {label: [] for label, *_ in targets}
            lat_of: dict[str, list[float]] = {label: [] for label, *_ in targets}
            cpu_of: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in targets}
            for round_no in range(args.rounds):
                # Every other round runs the paths in reverse order: a path's place in the round
                # then cancels out (on a shared machine, later runs in a row tended to be slower).
                for label, port, user, password, pid in (targets if round_no % 2 == 0 else targets[::-1]):
                    cpu0 = cpu_seconds(pid) if pid else 0.0
                    writer0 = writer_cpu_seconds(pid) if pid else 0.0
                    tps, lat, txns = pgbench(port, user, password, wargs, args.duration, args.clients)
                    if pid:
                        cpu_of[label].append(((cpu_seconds(pid) - cpu0) / (txns * stmts) * 1e6,
                                              (writer_cpu_seconds(pid) - writer0) / (txns * stmts) * 1e6))
                    tps_of[label].append(tps)
                    lat_of[label].append(lat)
                    time.sleep(1)

            def ratio(label: str, base: str, tps_of: dict[str, list[float]] = tps_of) -> float:
                return statistics.median(a / b for a, b in zip(tps_of[label], tps_of[base], strict=True))

            for label, *_ in targets:
                cpus = cpu_of[label]
                cpu = f"{statistics.median(c for c, _ in cpus):.1f}" if cpus else "nan"
                writer = statistics.median(w for _, w in cpus) if cpus else 0.0
                cpu += f"+{writer:.1f}" if writer else ""
                guard = ratio(label, "dbguard") if "dbguard" in tps_of and label.startswith(("dbguard", "+")) \
                    else float("nan")
                print(f"{name:<22} {label:<10} {statistics.median(tps_of[label]):>9.0f} "
                      f"{statistics.median(lat_of[label]):>7.2f} {ratio(label, 'direct'):>8.2f} "
                      f"{ratio(label, 'pgbouncer') if label != 'direct' else float('nan'):>10.2f} "
                      f"{guard:>8.2f} {cpu:>11}", flush=True)
            if args.rounds > 1:
                for label, *_ in targets:
                    if label.startswith("+"):
                        each = [a / b for a, b in zip(tps_of[label], tps_of["dbguard"], strict=True)]
                        spread = statistics.stdev(each) / len(each) ** 0.5  # the mean's standard error
                        print(f"{'':<22} {label:<10} per round /dbguard: {' '.join(f'{x:.2f}' for x in each)}"
                              f"  (mean {statistics.fmean(each):.3f} ± {spread:.3f})")
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        stop_postgres(pg)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
