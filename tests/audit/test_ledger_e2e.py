"""The ledger through the real proxy: durable before results, verify, tampering, kill -9, the 2 a.m. question."""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import threading
import time
import urllib.request

import orjson
import psycopg
import pytest

from tests.audit.conftest import audit, ledger_proxy
from tests.fix_postgres import Postgres, free_port, wait_until


def test_who_changed_a_balance_is_answered_and_the_chain_verifies(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.execute("SELECT * FROM customers")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE customers SET balance = 0 WHERE id = 2")
            conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        with psycopg.connect(proxy.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE customers SET balance = balance * 2 WHERE id = 1")
    finally:
        proxy.stop()
    r = audit("search", "--ledger", str(db), "--table", "customers", "--column", "balance", "--op", "UPDATE",
              "--since", "2000-01-01 00:00", "--until", "2100-01-01 00:00")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "balance" in line]
    assert len(lines) == 2, r.stdout
    assert "bob" in lines[0] and "alice" in lines[1]
    assert all("balance-change-needs-approval" in line for line in lines)
    assert "(2 entries)" in r.stdout
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0 and r.stdout.startswith("OK:"), r.stdout + r.stderr
    assert "signed checkpoints verified" in r.stdout


def _populated_ledger(pg: Postgres, tmp_path, priv) -> pathlib.Path:
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            for i in range(20):
                conn.execute("UPDATE orders SET amount = %s WHERE id = 1", [i])
    finally:
        proxy.stop()
    return db


@pytest.mark.parametrize("tamper, kind", [
    ("UPDATE entries SET data = CAST(replace(CAST(data AS TEXT), 'bob', 'eve') AS BLOB) WHERE seq = 7", "altered"),
    ("DELETE FROM entries WHERE seq = 9", "removed"),
    # swap the stored order of entries 5 and 6
    ("UPDATE entries SET id = id + 1000000 WHERE seq IN (5, 6);"
     "UPDATE entries SET id = (SELECT min(id) FROM entries WHERE seq IN (5, 6)) - 1000000 + 1 WHERE seq = 5;"
     "UPDATE entries SET id = id - 1000000 - 1 WHERE seq = 6", "reordered"),
])
def test_tampering_in_sqlite_is_caught_and_named(pg: Postgres, tmp_path, keys, tamper, kind):
    priv, pub = keys
    db = _populated_ledger(pg, tmp_path, priv)
    assert audit("verify", "--ledger", str(db), "--public-key", str(pub)).returncode == 0
    conn = sqlite3.connect(db)
    conn.executescript(tamper)
    conn.commit()
    conn.close()
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 1
    assert "BROKEN chain proxy-a: entry" in r.stdout and kind in r.stdout, r.stdout


def _edited_and_rechained(db: pathlib.Path) -> sqlite3.Connection:
    """What an attacker with write access does: edit entry 3 and re-chain every entry after it."""
    from dbguard.audit import ledger

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT id, seq, data FROM entries ORDER BY id").fetchall()
    prev = ledger.GENESIS
    for id_, seq, data in rows:
        data = bytes(data).replace(b"bob", b"eve") if seq == 3 else bytes(data)
        h = ledger.entry_hash(prev, seq, "proxy-a", data)
        conn.execute("UPDATE entries SET data = ?, prev = ?, hash = ? WHERE id = ?", (data, prev, h, id_))
        prev = h
    return conn


def test_rehashing_the_chain_after_an_edit_is_caught_by_signed_checkpoints(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    db = _populated_ledger(pg, tmp_path, priv)
    conn = _edited_and_rechained(db)
    # ... and points the checkpoints at the new hashes; only the signatures cannot be redone
    conn.execute("UPDATE checkpoints SET hash = (SELECT e.hash FROM entries e"
                 " WHERE e.chain = checkpoints.chain AND e.seq = checkpoints.seq)")
    conn.commit()
    assert audit("verify", "--ledger", str(db)).returncode == 0  # the chain alone looks fine ...
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))  # ... the signatures do not
    assert r.returncode == 1 and "signature does not verify" in r.stdout, r.stdout


def test_rehashing_the_chain_and_deleting_its_checkpoints_is_caught_with_the_key(pg: Postgres, tmp_path, keys):
    """The attacker cannot sign, so they delete the checkpoints: nothing signed vouches for the chain."""
    priv, pub = keys
    db = _populated_ledger(pg, tmp_path, priv)
    conn = _edited_and_rechained(db)
    conn.execute("DELETE FROM checkpoints")
    conn.commit()
    assert audit("verify", "--ledger", str(db)).returncode == 0  # the chain alone looks fine ...
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))  # ... but the key vouches for none of it
    assert r.returncode == 1 and "BROKEN chain proxy-a: entry 1 unsigned" in r.stdout, r.stdout
    assert "--allow-unsigned" in r.stdout
    # Chains written before the key was set are legitimate: reported, not refused, when asked.
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub), "--allow-unsigned")
    assert r.returncode == 0 and "note: chain proxy-a: entry 1 onwards unsigned" in r.stdout, r.stdout


def test_entries_after_the_last_signed_checkpoint_are_named(pg: Postgres, tmp_path, keys):
    """Entries written after the last checkpoint (a writer killed before it signed) verify as a chain,
    and verify says which ones the key does not cover yet."""
    priv, pub = keys
    db = _populated_ledger(pg, tmp_path, priv)
    conn = sqlite3.connect(db)
    last = conn.execute("SELECT max(seq) FROM entries").fetchone()[0]
    first = conn.execute("SELECT min(seq) FROM checkpoints").fetchone()[0]
    assert first < last
    conn.execute("DELETE FROM checkpoints WHERE seq > ?", (first,))  # a writer killed after its first signature
    conn.commit()
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0 and r.stdout.startswith(f"note: chain proxy-a: entries {first + 1}-{last} follow its "
                                                     "last signed checkpoint"), r.stdout
    assert "OK:" in r.stdout


def kill_9_mid_writes(proxy) -> int:  # noqa: ANN001 - a tests.fix_proxy.Proxy
    """Four clients write until the proxy is killed with SIGKILL; returns how many writes they saw answered."""
    answered: list[int] = []
    stop = threading.Event()

    def writer(offset: int) -> None:
        try:
            with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
                i = offset
                while not stop.is_set():
                    conn.execute("UPDATE orders SET amount = %s WHERE id = 2", [i])
                    answered.append(i)  # the client saw the result
                    i += 4
        except psycopg.Error:
            pass

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(answered) > 200, timeout=30, what="writes through the proxy")
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    stop.set()
    for t in threads:
        t.join(10)
    return len(answered)


def test_kill_9_mid_traffic_leaves_a_verifying_chain_with_every_answered_write(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    answered = kill_9_mid_writes(proxy)
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout
    conn = sqlite3.connect(db)
    recorded = {bytes(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind = 'decision'")}
    # Statements are recorded with literals normalized away; count them instead.
    writes = sum(1 for d in recorded if b"UPDATE orders SET amount" in d)
    assert writes >= answered, (writes, answered)


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_ledger_that_cannot_commit_refuses_writes_and_keeps_the_connection(pg: Postgres, tmp_path, keys):
    priv, _ = keys
    metrics_port = free_port()
    proxy, db = ledger_proxy(pg, tmp_path, priv, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.execute("UPDATE orders SET status = 'a' WHERE id = 1")
            blocker = sqlite3.connect(db, timeout=10, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # the ledger file is locked by someone else
            try:
                t0 = time.monotonic()
                with pytest.raises(psycopg.Error) as exc:
                    conn.execute("UPDATE orders SET status = 'b' WHERE id = 1")
                assert exc.value.sqlstate == "58030" and "audit ledger cannot record" in str(exc.value)
                assert time.monotonic() - t0 < 10
                seen = metrics(metrics_port)
                assert seen["dbguard_ledger_refused_statements_total"] == 1
                assert seen["dbguard_ledger_commit_failures_total"] >= 1 and seen["dbguard_ledger_up"] == 0
                assert seen['dbguard_refusals_total{rule="dbguard:ledger-unavailable"}'] == 1
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            conn.execute("UPDATE orders SET status = 'c' WHERE id = 1")
        assert pg.psql("SELECT status FROM orders WHERE id = 1").strip() == "c"
        seen = metrics(metrics_port)
        assert seen["dbguard_ledger_up"] == 1 and seen["dbguard_ledger_entries_committed_total"] >= 3
        assert "ledger unavailable" in proxy.log()
    finally:
        proxy.stop()


def test_no_literal_or_parameter_value_reaches_the_ledger(pg: Postgres, tmp_path, keys):
    priv, _ = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    secrets = ["4111-1111-1111-1111", "mallory@example.org", "s3cr3t-param", "7000042"]
    try:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.execute(f"UPDATE orders SET status = '{secrets[0]}' WHERE id = 1")  # literal, extended protocol
            conn.execute("UPDATE orders SET status = %s WHERE id = 1", [secrets[2]])  # parameter
            conn.execute(f"SELECT * FROM customers WHERE email = '{secrets[1]}'", prepare=False)
            with pytest.raises(psycopg.Error):
                conn.execute(f"UPDATE orders SET amount = '{secrets[3]}x'::int WHERE id = 1")  # quoted in the error
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            conn.pgconn.exec_(f"SELECT '{secrets[1]}' AS simple_protocol".encode())
            conn.pgconn.exec_(f"SELECT 1 /* card {secrets[0]} */ -- {secrets[3]}".encode())
            conn.pgconn.exec_(f"PREPARE p1 AS SELECT * FROM orders WHERE status = '{secrets[2]}'".encode())
    finally:
        proxy.stop()
    raw = b"".join(bytes(d) for (d,) in sqlite3.connect(db).execute("SELECT data FROM entries"))
    assert b"orders" in raw and b"simple_protocol" in raw
    for s in secrets:
        assert s.encode() not in raw, s


def test_reads_are_chained_in_blocks_and_search_finds_each_one(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    counts = {"alice": 0, "bob": 0}

    def reader(user: str, n: int) -> None:
        with psycopg.connect(proxy.dsn(user), autocommit=True) as conn:
            for i in range(n):
                conn.execute("SELECT status FROM orders WHERE id = %s", [i % 3 + 1])
                counts[user] += 1

    try:
        threads = [threading.Thread(target=reader, args=("alice", 150)), threading.Thread(target=reader, args=("bob", 90))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        proxy.stop()
    conn = sqlite3.connect(db)
    blocks = conn.execute("SELECT count(*), sum(length(data)) FROM entries WHERE kind = 'reads'").fetchone()
    assert blocks[0] >= 1, "concurrent reads should share block entries"
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout
    for user, n in counts.items():
        r = audit("search", "--ledger", str(db), "--identity", user, "--table", "orders", "--op", "SELECT",
                  "--kind", "decision", "--json", "--limit", "10000")
        found = [orjson.loads(line) for line in r.stdout.splitlines()]
        assert len(found) == n and all(e["identity"]["user"] == user for e in found), (user, len(found), n)
        assert all(e["completion"]["status"] == "ok" for e in found)
    # a read inside a block is as tamper-evident as any entry
    conn.execute("UPDATE entries SET data = CAST(replace(CAST(data AS TEXT), 'SELECT status', 'SELECT secret')"
                 " AS BLOB) WHERE kind = 'reads'")
    conn.commit()
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 1 and "altered" in r.stdout


def test_transaction_control_is_recorded_like_a_read_and_writes_stay_durable(pg: Postgres, tmp_path, keys):
    """BEGIN and COMMIT change no data: their decisions are written with their completions, after
    the fact, as reads are (docs/ledger.md), while the UPDATE between them waits for its commit and
    gets its completion as an entry of its own."""
    priv, _ = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    try:
        with psycopg.connect(proxy.dsn("bob")) as conn:  # psycopg sends BEGIN, then COMMIT on leaving
            conn.execute("UPDATE orders SET status = status WHERE id = 1")
    finally:
        proxy.stop()
    conn = sqlite3.connect(db)
    events = [orjson.loads(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind IN ('decision', "
                                                       "'completion') ORDER BY id")]
    decisions = {e["statement"]: e for e in events if e["kind"] == "decision"}
    assert set(decisions) >= {"BEGIN", "COMMIT", "UPDATE orders SET status = status WHERE id = $1"}, list(decisions)
    for control in ("BEGIN", "COMMIT"):
        assert decisions[control]["completion"]["status"] == "ok"  # written once it ran: not durable first
    update = decisions["UPDATE orders SET status = status WHERE id = $1"]
    assert "completion" not in update  # durable before it ran; its outcome follows on its own
    completions = [e["completion"] for e in events if e["kind"] == "completion"]
    assert [c["stmt"] for c in completions] == [update["stmt"]] and completions[0]["rows"] == 1
