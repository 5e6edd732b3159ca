#!/usr/bin/env python3
"""A 100,000-row SELECT with 3 masked columns: direct vs dbguard without masking vs dbguard masking.

Every path runs the same query with psycopg (text results, and binary results) a few times; the
table shows the median wall time, rows per second, and the ratios. Goal: masking costs at most
1.5x the unmasked proxy for the same rows. Everything listens on loopback.
Usage: python bench/masking_compare.py [--rows 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from tests.fix_postgres import start_postgres, stop_postgres  # noqa: E402
from tests.fix_proxy import start_proxy  # noqa: E402

MASKING = """apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata: {name: bench-masking}
spec:
  masking:
    - {columns: [public.people.email], strategy: email}
    - {columns: [public.people.phone], strategy: partial, options: {keepFirst: 3, keepLast: 2}}
    - {columns: [public.people.ssn], strategy: redact}
"""
QUERY = "SELECT id, name, email, phone, ssn, city FROM people"


def timed(dsn: str, binary: bool, repeat: int, rows: int) -> float:
    times = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = conn.execute(QUERY, binary=binary).fetchall()
            times.append(time.perf_counter() - t0)
            if len(got) != rows:
                raise SystemExit(f"expected {rows} rows, got {len(got)}")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5, help="runs per cell; the median is reported")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-bench-mask-"))
    pg = start_postgres(tmp / "pg")
    proxies = []
    try:
        pg.psql("SET ROLE app; CREATE TABLE people (id int PRIMARY KEY, name text, email text, phone text, ssn text,"
                f" city text); INSERT INTO people SELECT g, 'name ' || g, 'user' || g || '@example.com',"
                f" '+1-555-' || lpad(g::text, 7, '0'), lpad(g::text, 9, '0'), 'city ' || (g % 100)"
                f" FROM generate_series(1, {args.rows}) g; ANALYZE people")
        policy = tmp / "masking.yaml"
        policy.write_text(MASKING)
        (tmp / "plain").mkdir()
        (tmp / "masked").mkdir()
        plain = start_proxy(pg, tmp / "plain", "--events", "none", "--log-level", "WARNING")
        masked = start_proxy(pg, tmp / "masked", "--policy", str(policy), "--events", "none",
                             "--log-level", "WARNING")
        proxies = [plain, masked]
        with psycopg.connect(masked.dsn("alice")) as conn:  # sanity: masked for real
            row = conn.execute(QUERY + " WHERE id = 1").fetchone()
            assert row[2] == "****@example.com" and row[4] == "****", row
        paths = [("direct", pg.app_dsn), ("dbguard", plain.dsn("alice")), ("dbguard+masking", masked.dsn("alice"))]
        print(f"{args.rows:,} rows x 6 columns (3 masked), psycopg fetchall, median of {args.repeat}", flush=True)
        header = f"{'format':<7} {'path':<16} {'seconds':>8} {'rows/s':>10} {'/direct':>8} {'/dbguard':>9}"
        print(header)
        print("-" * len(header))
        for binary in (False, True):
            base: dict[str, float] = {}
            for label, dsn in paths:
                t = timed(dsn, binary, args.repeat, args.rows)
                base[label] = t
                vs_guard = t / base["dbguard"] if "dbguard" in base else float("nan")
                print(f"{'binary' if binary else 'text':<7} {label:<16} {t:>8.3f} {args.rows / t:>10,.0f} "
                      f"{t / base['direct']:>8.2f} {vs_guard:>9.2f}", flush=True)
        print(f"\nmasking cost: {base['dbguard+masking'] / base['dbguard']:.2f}x the unmasked proxy (goal <= 1.5x)")
        return 0
    finally:
        for p in proxies:
            p.stop()
        stop_postgres(pg)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
