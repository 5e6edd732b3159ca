"""Faults under traffic: the server restarted mid-transaction, the policy swapped under load, the
proxy killed with SIGKILL and started again on its ledger, and a SIGTERM drain.

What tests/audit already covers is not repeated here: a ledger that cannot commit
(test_ledger_e2e.py, test_postgres_sink.py) and SIGKILL with writers only (kill_9_mid_writes).
"""

from __future__ import annotations

import collections
import signal
import socket
import sqlite3
import threading
import time

import psycopg
import pytest

from tests.fix_postgres import Postgres, free_port, wait_until
from tests.fix_proxy import EXAMPLE_POLICY, Proxy, start_proxy
from tests.reliability.harness import audit, count_statements, read_events, restart_postgres, scrape
from tests.session.test_policy_reload import ConfigMapDir

READ = "SELECT n FROM soak WHERE id = %s"
WRITE = "UPDATE soak SET n = n + 1 WHERE id = %s"
READ_LOGGED = "SELECT n FROM soak WHERE id = $1"
WRITE_LOGGED = "UPDATE soak SET n = n + $2 WHERE id = $1"  # psycopg sends n + 1 as a literal: normalized


class Traffic:
    """Client threads running statements until told to stop; counts what each saw answered."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.done: collections.Counter[str] = collections.Counter()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def run(self, target, *args) -> None:  # noqa: ANN001
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)

        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"


# -- the server restarted mid-transaction ----------------------------------------------------------

def test_a_server_restart_mid_transaction_gives_clean_errors_and_replays_nothing(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    acked: list[int] = []
    outcomes: dict[str, BaseException | tuple] = {}

    def writer() -> None:  # autocommit inserts, each id once; an ack means the client saw it committed
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            i = 0
            while True:
                i += 1
                conn.execute("INSERT INTO ticks (id, client) VALUES (%s, 1)", [i])
                acked.append(i)

    def sleeper() -> None:  # a statement running on the server when it goes down
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            outcomes["sleeper"] = conn.execute("SELECT pg_sleep(30)").fetchone()

    traffic = Traffic()
    in_tx = psycopg.connect(proxy.dsn("bob"))  # an open transaction with an uncommitted insert
    try:
        in_tx.execute("INSERT INTO ticks (id, client) VALUES (1, 2)")
        traffic.run(writer)
        traffic.run(sleeper)
        wait_until(lambda: len(acked) > 50, timeout=20, what="writes through the proxy")
        wait_until(lambda: big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
                                       " AND state = 'active'").strip() == "1", timeout=10, what="the sleeper")
        restart_postgres(big_pg, "fast")
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            in_tx.execute("INSERT INTO ticks (id, client) VALUES (2, 2)")
        assert time.monotonic() - t0 < 5, "the error must come at once, not after a timeout"
        traffic.join()  # both threads ended with an error, none hangs
    finally:
        in_tx.close()
        proxy_alive = proxy.proc.poll() is None
        proxy.stop()
    assert proxy_alive, "the proxy must outlive its server's restart"
    assert "sleeper" not in outcomes
    assert len(traffic.errors) == 2 and all(isinstance(e, psycopg.OperationalError) for e in traffic.errors), \
        traffic.errors
    rows = big_pg.psql("SELECT client, id, count(*) FROM ticks GROUP BY 1, 2 ORDER BY 1, 2").split()
    counts = {(int(c), int(i)): int(n) for c, i, n in (r.split("|") for r in rows)}
    assert all(n == 1 for n in counts.values()), "a statement ran twice: the proxy replayed it"
    assert not [k for k in counts if k[0] == 2], "the open transaction must be rolled back, not replayed"
    written = sorted(i for c, i in counts if c == 1)
    assert set(acked) <= set(written)
    assert written == list(range(1, len(written) + 1)) and len(written) <= len(acked) + 1  # at most the one in flight
    assert "internal error" not in proxy.log()


def test_the_proxy_serves_new_sessions_once_its_server_is_back(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    try:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            conn.execute("SELECT 1")
            restart_postgres(big_pg, "immediate")  # a crash: no goodbye from the server
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)
    finally:
        proxy.stop()


# -- the policy bundle swapped under load ----------------------------------------------------------

def _policy_with(rule_no: int) -> str:
    rule = (f"    - name: swap-{rule_no}\n      match: {{operations: [DELETE], tables: [never_{rule_no}]}}\n"
            f"      action: deny\n      reason: revision {rule_no}\n")
    return EXAMPLE_POLICY.read_text().replace("  rules:\n", "  rules:\n" + rule, 1)


SWAPS = 5
CLIENTS = 8


def test_policy_swapped_under_load_drops_nothing_and_each_decision_names_a_revision_in_force(
        big_pg: Postgres, tmp_path):
    cm = ConfigMapDir(tmp_path / "policies")
    cm.publish({"policy.yaml": EXAMPLE_POLICY.read_text()})
    proxy = start_proxy(big_pg, tmp_path, "--policy-reload-interval", "0.1", "--log-level", "WARNING",
                        policy=cm.root / "policy.yaml")
    traffic = Traffic()

    def client(no: int) -> None:
        user = ("alice", "bob")[no % 2]
        with psycopg.connect(proxy.dsn(user), autocommit=True) as conn:
            while not traffic.stop.is_set():
                conn.execute(READ, [no + 1])  # extended protocol
                conn.execute(WRITE, [no + 1])
                traffic.done["writes", no] += 1
                conn.execute(f"SELECT count(*) FROM orders WHERE id = {no}", prepare=False)
                traffic.done["statements"] += 3

    try:
        for no in range(CLIENTS):
            traffic.run(client, no)
        wait_until(lambda: traffic.done["statements"] > 200, timeout=20, what="traffic")
        for k in range(1, SWAPS + 1):
            cm.publish({"policy.yaml": _policy_with(k)})
            wait_until(lambda k=k: sum(e.get("event") == "reloaded" for e in read_events(proxy.events_path)) >= k, timeout=15,
                       what=f"reload {k}")
            seen = traffic.done["statements"]
            wait_until(lambda seen=seen: traffic.done["statements"] > seen + 100, timeout=20,
                       what="traffic under the new revision")
        traffic.join()
    finally:
        traffic.stop.set()
        proxy.stop()
    assert not traffic.errors, traffic.errors[:3]
    events = proxy.events()
    policy = [e for e in events if e.get("kind") == "policy"]
    assert [e["event"] for e in policy] == ["loaded"] + ["reloaded"] * SWAPS
    order = [policy[0]["revision"]] + [e["revision"] for e in policy[1:]]
    assert [e["previous"] for e in policy[1:]] == order[:-1] and len(set(order)) == SWAPS + 1
    rank = {rev: i for i, rev in enumerate(order)}
    decisions = [e for e in events if e.get("kind") == "decision"]
    assert len(decisions) == traffic.done["statements"]
    used = collections.Counter()
    last: dict[str, tuple[int, int]] = {}
    for e in sorted(decisions, key=lambda e: (e["session"], e["stmt"])):
        revs = {d["revision"] for d in e["decisions"]}
        assert len(revs) == 1 and revs <= rank.keys(), (e["stmt"], revs)
        r = rank[revs.pop()]
        used[r] += 1
        prev = last.get(e["session"], (0, -1))
        assert r >= prev[0], f"session {e['session']} went back from revision {prev[0]} to {r} at stmt {e['stmt']}"
        last[e["session"]] = (r, e["stmt"])
    assert set(used) == set(range(SWAPS + 1)), used  # traffic ran under every revision
    writes = sum(n for key, n in traffic.done.items() if key[0] == "writes")
    assert int(big_pg.psql("SELECT sum(n) FROM soak").strip()) == writes


# -- SIGKILL, then the same ledger again -----------------------------------------------------------

def test_sigkill_mid_traffic_then_a_restart_on_the_same_ledger_keeps_the_chain_whole(big_pg: Postgres, tmp_path,
                                                                                      keys):
    priv, pub = keys
    db = tmp_path / "ledger.db"
    ledger = ("--ledger", str(db), "--ledger-signing-key", str(priv), "--ledger-chain", "proxy-a",
              "--log-level", "WARNING")
    (tmp_path / "a").mkdir()
    proxy = start_proxy(big_pg, tmp_path / "a", *ledger)
    traffic = Traffic()

    def client(no: int) -> None:
        try:
            with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
                while not traffic.stop.is_set():
                    if no % 2:
                        conn.execute(WRITE, [no])
                        traffic.done["writes"] += 1
                    else:
                        conn.execute(READ, [no])
                        traffic.done["reads"] += 1
        except psycopg.OperationalError:
            pass  # the proxy was killed under it

    for no in range(1, 9):
        traffic.run(client, no)
    wait_until(lambda: traffic.done["writes"] > 300 and traffic.done["reads"] > 300, timeout=30, what="traffic")
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    traffic.join()
    assert not traffic.errors, traffic.errors[:3]
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout + r.stderr
    ran = int(big_pg.psql("SELECT sum(n) FROM soak").strip())
    writes = count_statements(db, lambda s: s == WRITE_LOGGED)
    # a write is committed to the ledger before it reaches the server: every write that ran is there
    assert writes["forwarded"] >= ran >= traffic.done["writes"], (writes, ran, traffic.done)
    reads = count_statements(db, lambda s: s == READ_LOGGED)
    print(f"\nSIGKILL: {traffic.done['reads']} reads answered, {reads['decisions']} in the ledger "
          f"(reads are written within 50 ms; a kill may lose that much); {ran} writes ran, "
          f"{writes['forwarded']} recorded")

    (tmp_path / "b").mkdir()
    again = start_proxy(big_pg, tmp_path / "b", *ledger)  # the same file and chain: the chain continues
    try:
        with psycopg.connect(again.dsn("bob"), autocommit=True) as conn:
            for _ in range(20):
                conn.execute(WRITE, [1])
                conn.execute(READ, [1])
    finally:
        again.stop()
    assert again.proc.returncode == 0
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0 and "in 1 chain(s)" in r.stdout, r.stdout + r.stderr
    assert count_statements(db, lambda s: s == WRITE_LOGGED)["completions"] >= writes["completions"] + 20


# -- SIGTERM drains --------------------------------------------------------------------------------

def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # the probe was in the accept queue as the listener closed: ask again
        return False
    return False


def test_sigterm_takes_no_new_session_and_lets_in_flight_statements_finish(big_pg: Postgres, tmp_path, keys):
    priv, _ = keys
    db = tmp_path / "ledger.db"
    metrics_port = free_port()
    proxy: Proxy = start_proxy(big_pg, tmp_path, "--ledger", str(db), "--ledger-signing-key", str(priv),
                               "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "WARNING")
    results: dict[str, object] = {}
    traffic = Traffic()

    def read() -> None:
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            results["read"] = conn.execute("SELECT 42 FROM pg_sleep(4)").fetchone()

    def write() -> None:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            cur = conn.execute("UPDATE soak SET n = n + 1 FROM pg_sleep(4) WHERE id = 7")
            results["write"] = cur.rowcount

    try:
        idle = psycopg.connect(proxy.dsn("alice"), autocommit=True)  # connected, doing nothing at SIGTERM
        traffic.run(read)
        traffic.run(write)
        wait_until(lambda: big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                       "AND query LIKE '%pg_sleep(4)%' AND usename = 'app'").strip() == "2",
                   timeout=10, what="two statements in flight")
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(proxy.port), timeout=5, what="the listener to close")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("alice"), connect_timeout=3)
        assert scrape(metrics_port)["dbguard_sessions"] == 3  # draining, nobody dropped
        traffic.join()
        assert results == {"read": (42,), "write": 1}, (results, traffic.errors)
        assert time.monotonic() - t0 < 15
        assert idle.execute("SELECT 1").fetchone() == (1,)  # an open session may still finish its work
        idle.close()
        assert proxy.proc.wait(timeout=10) == 0  # the last session gone: the proxy exits at once
    finally:
        proxy.stop()
    write_logged = count_statements(db, lambda s: s.startswith("UPDATE soak SET n = n + $1 FROM pg_sleep"))
    assert write_logged == {"decisions": 1, "forwarded": 1, "completions": 1}
    assert count_statements(db, lambda s: s.startswith("SELECT $1 FROM pg_sleep"))["completions"] == 1


# -- the ledger locked under load --------------------------------------------------------------------

def test_a_locked_ledger_under_load_refuses_only_writes_and_loses_no_answered_statement(big_pg: Postgres, tmp_path,
                                                                                          keys):
    """tests/audit covers one connection; here eight keep going while the ledger file is locked."""
    priv, pub = keys
    db = tmp_path / "ledger.db"
    proxy = start_proxy(big_pg, tmp_path, "--ledger", str(db), "--ledger-signing-key", str(priv),
                        "--log-level", "ERROR")
    traffic = Traffic()

    def reader(no: int) -> None:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            while not traffic.stop.is_set():
                conn.execute(READ, [no])
                traffic.done["reads"] += 1

    def writer(no: int) -> None:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            while not traffic.stop.is_set():
                try:
                    conn.execute(WRITE, [no])
                    traffic.done["writes"] += 1
                except psycopg.Error as exc:
                    assert exc.sqlstate == "58030", exc
                    traffic.done["refused"] += 1

    for no in range(1, 9):
        traffic.run(reader if no % 2 else writer, no)
    try:
        wait_until(lambda: traffic.done["writes"] > 100, timeout=20, what="traffic")
        # between two of the writer's batches: wait for the file as long as it takes (the writer holds
        # it only while it commits)
        blocker = sqlite3.connect(db, timeout=10, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # someone else holds the ledger file
        try:
            wait_until(lambda: traffic.done["refused"] >= 4, timeout=20, what="writes to be refused")
            reads = traffic.done["reads"]
            wait_until(lambda: traffic.done["reads"] > reads + 100, timeout=20,
                       what="reads to keep flowing while the ledger is locked")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        writes = traffic.done["writes"]
        wait_until(lambda: traffic.done["writes"] > writes + 100, timeout=20, what="writes to flow again")
        traffic.join()
    finally:
        traffic.stop.set()
        proxy.stop()
    assert not traffic.errors, traffic.errors[:3]
    assert int(big_pg.psql("SELECT sum(n) FROM soak").strip()) == traffic.done["writes"]  # refused = not run
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout + r.stderr
    # reads answered while the file was locked were held and written once it was free
    assert count_statements(db, lambda s: s == READ_LOGGED)["completions"] == traffic.done["reads"]
    written = count_statements(db, lambda s: s == WRITE_LOGGED)
    assert written == {"decisions": traffic.done["writes"], "forwarded": traffic.done["writes"],
                       "completions": traffic.done["writes"]}, (written, traffic.done)
