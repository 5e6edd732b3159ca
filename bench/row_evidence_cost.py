#!/usr/bin/env python3
"""What row-level evidence costs: pgbench TPC-B through dbguard with the SQLite ledger, without and
with --row-evidence on pgbench_accounts.abalance, in one run.

Every write then carries a marker (pg_logical_emit_message in its transaction) and the proxy streams
the replication slot and records a rows entry per changed balance. Prints tps, the ratio, the
proxy's CPU per statement, and checks that the ledger holds one rows entry per UPDATE of
pgbench_accounts (every transaction does one). Usage: python bench/row_evidence_cost.py [--duration 15]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgbench_compare import cpu_seconds, init_pgbench, pgbench, start_dbguard  # noqa: E402

from tests.fix_postgres import start_postgres, stop_postgres  # noqa: E402

WATCH = """apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata: {name: bench-rows}
spec:
  audit:
    rows: [public.pgbench_accounts.abalance]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (default 15)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=10)
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-bench-rows-"))
    pg = start_postgres(tmp / "pg")
    procs: list[subprocess.Popen] = []
    try:
        init_pgbench(pg, args.scale)
        pg.psql("ALTER ROLE app REPLICATION", db="postgres")
        pg.psql("ALTER TABLE pgbench_accounts REPLICA IDENTITY FULL")
        (tmp / "watch.yaml").write_text(WATCH)
        print(f"pgbench TPC-B (-M prepared): {args.clients} clients, {args.duration}s per cell, scale {args.scale}; "
              "dbguard with examples/policy.yaml and the SQLite ledger", flush=True)
        header = f"{'path':<24} {'tps':>8} {'lat ms':>7} {'ratio':>6} {'cpu us/stmt':>11} {'rows entries':>12}"
        print(header)
        print("-" * len(header))
        base_tps = 0.0
        for label, extra in (("ledger", []), ("ledger + row evidence", ["--row-evidence", "on"])):
            db = tmp / f"{label.replace(' ', '')}.db"
            guard, port = start_dbguard(pg.port, tmp, ["--ledger", str(db), "--policy", str(tmp / "watch.yaml"),
                                                       *extra], label.replace(" ", ""))
            procs.append(guard)
            cpu0 = cpu_seconds(guard.pid)
            tps, lat, txns = pgbench(port, "bob", "bob-dba-token", ["-M", "prepared"], args.duration, args.clients)
            cpu = (cpu_seconds(guard.pid) - cpu0) / (txns * 7) * 1e6
            guard.terminate()
            guard.wait(timeout=60)
            with sqlite3.connect(db) as conn:
                (rows,) = conn.execute("SELECT count(*) FROM entries WHERE kind = 'rows'").fetchone()
            base_tps = base_tps or tps
            print(f"{label:<24} {tps:>8.0f} {lat:>7.2f} {tps / base_tps:>6.2f} {cpu:>11.1f} {rows:>12}", flush=True)
            # a delta of 0 changes no balance; a transaction open when pgbench stops is rolled back
            if extra and not txns - args.clients - txns * 0.001 <= rows <= txns + args.clients:
                print(f"  !! expected about {txns} rows entries (one per transaction's UPDATE of pgbench_accounts)")
            time.sleep(1)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_postgres(pg)
        if os.environ.get("KEEP_BENCH"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
