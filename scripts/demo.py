#!/usr/bin/env python3
"""`make demo`: a local PostgreSQL, dbguard in front of it with the example policy, real psql traffic.

Shows an ordinary read and write allowed, destructive statements refused with the rule's name,
an UPDATE of a customer balance held for an approval (refused, approved with `dbguard approve`,
run once), a schema change held until approved, and the audit ledger answering
"who changed a customer balance?" with `dbguard audit search`, then proving itself with
`dbguard audit verify`. Everything listens on loopback and is stopped at the end
(pass --keep to leave it running and get the psql command line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbguard.approvals.local import LocalStore  # noqa: E402
from tests.fix_postgres import reset_schema, start_postgres, stop_postgres  # noqa: E402
from tests.fix_proxy import EXAMPLE_MASKING, TOKENS, start_proxy  # noqa: E402

BOLD, DIM, RED, GREEN, RESET = ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[0m") if sys.stdout.isatty() \
    else ("",) * 5


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}")


def run_psql(dsn: str, sql: str, who: str) -> bool:
    print(f"{DIM}{who}${RESET} psql -c {json.dumps(sql)}")
    r = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql], capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip()
    colour = GREEN if r.returncode == 0 else RED
    print("\n".join(f"  {colour}{line}{RESET}" for line in out.splitlines()))
    return r.returncode == 0


def run_audit(args: list[str]) -> subprocess.CompletedProcess:
    print(f"{DIM}${RESET} dbguard audit {' '.join(json.dumps(a) if ' ' in a else a for a in args)}")
    r = subprocess.run([sys.executable, "-m", "dbguard", "audit", *args], capture_output=True, text=True)
    print("\n".join(f"  {line}" for line in (r.stdout + r.stderr).rstrip().splitlines()))
    return r


def run_dbguard(args: list[str], who: str = "") -> subprocess.CompletedProcess:
    print(f"{DIM}{who}${RESET} dbguard {' '.join(json.dumps(a) if ' ' in a else a for a in args)}")
    r = subprocess.run([sys.executable, "-m", "dbguard", *args], capture_output=True, text=True)
    print("\n".join(f"  {line}" for line in (r.stdout + r.stderr).rstrip().splitlines()))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave PostgreSQL and the proxy running")
    args = ap.parse_args()
    base = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-demo-"))
    step("Starting PostgreSQL (Debian packages) with the demo shop schema")
    pg = start_postgres(base / "pg")
    reset_schema(pg)
    print(f"  PostgreSQL on 127.0.0.1:{pg.port}, database app")
    # Row-level evidence reads logical decoding (wal_level=logical, set by start_postgres): the proxy's role
    # may stream a replication slot, and old values of customers are decoded in full.
    pg.psql("ALTER ROLE app REPLICATION", db="postgres")
    pg.psql("ALTER TABLE customers REPLICA IDENTITY FULL")
    step("Starting dbguard proxy with examples/policy.yaml and a signed audit ledger")
    ledger = base / "ledger.db"
    subprocess.run([sys.executable, "-m", "dbguard", "audit", "keygen", "--private-key", str(base / "ledger.key"),
                    "--public-key", str(base / "ledger.pub")], check=True, capture_output=True)
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    store = base / "approvals.db"
    proxy = start_proxy(pg, base, "--policy", str(EXAMPLE_MASKING), "--ledger", str(ledger),
                        "--ledger-signing-key", str(base / "ledger.key"), "--approvals", str(store),
                        "--row-evidence", "on")
    print(f"  dbguard proxy --listen 127.0.0.1:{proxy.port} --upstream postgresql://app@127.0.0.1:{pg.port}/app "
          f"--policy examples/policy.yaml --policy examples/masking.yaml --tokens examples/tokens.yaml --ledger {ledger} "
          f"--ledger-signing-key {base / 'ledger.key'} --approvals {store} --row-evidence on")
    failures = []
    try:
        alice = proxy.dsn("alice")
        step("alice (group developers): ordinary reads and writes are allowed")
        failures += [s for s in ["SELECT id, name, balance FROM customers ORDER BY id",
                                 "INSERT INTO orders (customer_id, amount) VALUES (2, 42.00)",
                                 "UPDATE orders SET status = 'shipped' WHERE id = 1"]
                     if not run_psql(alice, s, "alice")]
        step("Destructive statements are refused, with the rule that refused them")
        for sql in ["DROP TABLE customers",
                    "DELETE FROM orders",
                    "DELETE FROM orders WHERE 1 = 1",
                    "WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone",
                    "SELECT pg_read_file('/etc/passwd')"]:
            if run_psql(alice, sql, "alice"):
                failures.append(sql)
        step("PII is masked before it leaves the database (examples/masking.yaml)")
        sql = "SELECT * FROM customers ORDER BY id"
        for who, expect in (("alice", "****@example.com"), ("sam", "*******6789"), ("frida", "ada@example.com")):
            r = subprocess.run(["psql", "-X", proxy.dsn(who), "-c", sql], capture_output=True, text=True)
            group = {"alice": "developers", "sam": "support-leads", "frida": "fraud: clear text"}[who]
            print(f"{DIM}{who} ({group})${RESET} psql -c {json.dumps(sql)}")
            print("\n".join(f"  {line}" for line in (r.stdout + r.stderr).rstrip().splitlines()))
            if expect not in r.stdout:
                failures.append(f"masking for {who}")
        step("Masked values cannot be pulled out through expressions or probed with predicates")
        for sql in ("SELECT lower(email) FROM customers", "SELECT id FROM customers WHERE ssn LIKE '1%'",
                    "SELECT to_jsonb(c) FROM customers c"):
            if run_psql(alice, sql, "alice"):
                failures.append(sql)
        step("Changing a customer's balance needs an approval (reject-and-retry)")
        update = "UPDATE customers SET balance = balance + 1000 WHERE id = 1"
        if run_psql(alice, update, "alice"):
            failures.append("balance update ran without approval")
        pending = [r for r in LocalStore(store).list_sync() if r.phase() == "Pending"]
        name = pending[0].name if pending else "?"
        run_dbguard(["approvals", "--store", str(store)])
        step("alice cannot approve her own request; bob (dba) can")
        if run_dbguard(["approve", name, "--store", str(store), "--as", "alice", "--group", "developers"],
                       who="alice").returncode == 0:
            failures.append("self-approval")
        if run_dbguard(["approve", name, "--store", str(store), "--as", "bob", "--group", "dba", "--reason", "CHG-42"],
                       who="bob").returncode != 0:
            failures.append("approval")
        step("The identical statement now runs, once")
        if not run_psql(alice, update, "alice"):
            failures.append("approved update")
        if run_psql(alice, update, "alice"):
            failures.append("approval ran twice")
        step("A schema change of orders is held until a DBA approves it (hold)")
        alter = "ALTER TABLE orders ADD COLUMN note text"
        print(f"{DIM}alice${RESET} psql -c {json.dumps(alter)}   {DIM}(waits; bob approves from another terminal){RESET}")
        held = subprocess.Popen(["psql", "-X", "-v", "ON_ERROR_STOP=1", alice, "-c", alter], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        waiting: list = []
        while not waiting and time.monotonic() < deadline:
            time.sleep(0.3)
            waiting = [r for r in LocalStore(store).list_sync()
                       if r.phase() == "Pending" and r.spec["statement"] == alter]
        time.sleep(1)
        if waiting:
            run_dbguard(["approve", waiting[0].name, "--store", str(store), "--as", "bob", "--group", "dba",
                         "--reason", "CHG-43"], who="bob")
        try:
            out, _ = held.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            held.kill()
            out, _ = held.communicate()
        print("\n".join(f"  {GREEN if held.returncode == 0 else RED}{line}{RESET}" for line in out.rstrip().splitlines()))
        if held.returncode != 0 or "ALTER TABLE" not in out:
            failures.append("held statement")
        step("The connection survives a refusal: one psql session, the next statement works")
        script = "DROP TABLE orders;\nSELECT count(*) AS orders_still_there FROM orders;\n"
        print(f"{DIM}alice${RESET} psql <<'SQL'\n{script}SQL")
        r = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=0", alice], input=script, capture_output=True, text=True)
        print("\n".join(f"  {line}" for line in (r.stderr + r.stdout).rstrip().splitlines()))
        if "orders_still_there" not in r.stdout or "ERROR" not in r.stderr:
            failures.append("connection reuse")
        step("Who changed, or tried to change, a customer balance? Asked of the audit ledger")
        until = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M")
        question = ["search", "--ledger", str(ledger), "--table", "customers", "--column", "balance",
                    "--op", "UPDATE", "--since", since, "--until", until]
        time.sleep(0.5)  # row evidence is recorded within --row-evidence-interval of the commit
        r = run_audit(question)
        if r.returncode != 0 or "approval" not in r.stdout:
            failures.append("audit search")
        if "public.customers id=1: balance 100.00 -> 1100.00" not in r.stdout:
            failures.append("row evidence of the approved balance change")
        step("Every write is in the ledger with its outcome (rows affected)")
        run_audit(["search", "--ledger", str(ledger), "--table", "orders", "--op", "UPDATE"])
        step("The ledger is hash-chained and its checkpoints are signed: verify it")
        proxy.stop()  # a clean stop signs the chain's tail
        if run_audit(["verify", "--ledger", str(ledger), "--public-key", str(base / "ledger.pub")]).returncode:
            failures.append("audit verify")
        if args.keep:
            print(f"\n{BOLD}Left running.{RESET} Connect with:\n  psql \"{proxy.dsn('alice')}\"\n"
                  f"Tokens: {', '.join(f'{u}={t}' for u, t in TOKENS.items())}\nStop with Ctrl-C.")
            proxy.proc.wait()
    finally:
        if not args.keep or proxy.proc.poll() is not None:
            proxy.stop()
            stop_postgres(pg)
            shutil.rmtree(base, ignore_errors=True)
    if failures:
        print(f"{RED}demo did not behave as expected: {failures}{RESET}")
        return 1
    print(f"\n{GREEN}demo finished: allowed, denied and approval-required statements behaved as the policy says.{RESET}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
