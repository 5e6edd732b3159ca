"""The ledger's writer process: killed under traffic, orphaned by a killed proxy, and one per chain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback

import orjson
import psycopg
import pytest

from dbguard.audit import ledger, read_records, search, sqlite_sink
from dbguard.audit import ledger_wire as wire
from dbguard.audit.events import Done, ReadShape
from dbguard.audit.ledger_process import LedgerProcess, LedgerStartError
from dbguard.audit.writer import READ_LINGER
from tests.audit.conftest import audit, ledger_proxy
from tests.audit.test_ledger_e2e import metrics
from tests.fix_postgres import Postgres, free_port, wait_until
from tests.reliability.harness import ledger_events
from tests.unit.test_ledger_writer import _reads as reads_of_three_shapes


def writer_pid(proxy_pid: int) -> int:
    """The proxy's ledger writer: its child running dbguard.audit.ledger_process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == proxy_pid and b"dbguard.audit.ledger_process" in cmdline:
            return int(entry)
    raise AssertionError(f"proxy {proxy_pid} has no ledger writer process")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_writer_refuses_writes_until_a_new_one_continues_the_chain(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    port = free_port()
    proxy, db = ledger_proxy(pg, tmp_path, priv, "--metrics-listen", f"127.0.0.1:{port}")
    answered: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
            i = offset
            while not stop.is_set():
                try:
                    conn.execute("UPDATE orders SET amount = %s WHERE id = 2", [i])
                    answered.append(i)
                except psycopg.Error as exc:  # the connection stays usable
                    refused.append(exc.sqlstate or "")
                conn.execute("SELECT amount FROM orders WHERE id = 2")
                i += 4

    try:
        first = writer_pid(proxy.proc.pid)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(answered) > 100, timeout=30, what="writes through the proxy")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: metrics(port).get("dbguard_ledger_writer_restarts_total", 0) == 1, timeout=30,
                   what="a new writer")
        before = len(answered)
        wait_until(lambda: len(answered) > before + 100, timeout=30, what="writes after the new writer started")
        stop.set()
        for t in threads:
            t.join(10)
        assert writer_pid(proxy.proc.pid) != first
        assert set(refused) <= {"58030"}, refused  # refused only as unrecordable, never passed unrecorded
        assert "the ledger writer process exited" in proxy.log()
        seen = metrics(port)
        assert seen["dbguard_ledger_up"] == 1
    finally:
        stop.set()
        proxy.stop()
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout
    conn = sqlite3.connect(db)
    writes = conn.execute("SELECT count(*) FROM entries WHERE kind = 'decision' AND CAST(data AS TEXT) LIKE "
                          "'%UPDATE orders SET amount%'").fetchone()[0]
    assert writes >= len(answered), (writes, len(answered))


def test_a_killed_proxy_leaves_no_writer_behind_and_what_it_sent_is_committed(pg: Postgres, tmp_path, keys):
    priv, pub = keys
    proxy, db = ledger_proxy(pg, tmp_path, priv)
    child = writer_pid(proxy.proc.pid)
    with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
        for _ in range(300):
            conn.execute("SELECT id FROM orders WHERE id = 1")
        conn.execute("UPDATE orders SET status = 'x' WHERE id = 1")  # durable: everything before it went too
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    wait_until(lambda: not alive(child), timeout=15, what="the orphaned writer to finish")
    r = audit("verify", "--ledger", str(db), "--public-key", str(pub))
    assert r.returncode == 0, r.stdout
    r = audit("search", "--ledger", str(db), "--table", "orders", "--op", "SELECT", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"SELECT id FROM orders WHERE id = $1"') >= 300


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_one_writer_per_chain(tmp_path, store, request):
    target = str(tmp_path / "l.db") if store == "sqlite" else request.getfixturevalue("ledger_db")
    config = {"store": store, "target": target, "chain": "proxy-a", "key": None}
    first = LedgerProcess(config, name="first")
    try:
        t0 = time.monotonic()
        with pytest.raises(LedgerStartError, match="chain 'proxy-a'.* is being written by another process"):
            LedgerProcess(dict(config, lock_wait=1.0), name="second")
        assert time.monotonic() - t0 < 15
        other = LedgerProcess(dict(config, chain="proxy-b"), name="other chain")  # other chains are free
        other.close()
        first.append(b'{"time":"2026-11-24T02:00:00.000000+00:00","kind":"decision"}', durable=True).result(10)
    finally:
        first.close()
    second = LedgerProcess(dict(config, lock_wait=1.0), name="second")  # the first is done: the chain continues
    try:
        assert second.append(b'{"time":"2026-11-24T02:00:01.000000+00:00","kind":"decision"}',
                             durable=True).result(10) == 2
    finally:
        second.close()


def test_the_writer_process_stores_reads_as_the_decision_events_they_were(tmp_path):
    """Reads of three shapes over a minute boundary, some with whole completions (errors, not
    executed), one appended whole: the blocks the writer process builds expand to exactly them."""
    path = str(tmp_path / "l.db")
    writer = LedgerProcess({"store": "sqlite", "target": path, "chain": "c1", "key": None}, name="t")

    async def on_a_loop() -> list[dict]:  # as in the proxy: reads wait for their batch's flush
        sent = [event for event, _ in reads_of_three_shapes(writer)]
        await asyncio.sleep(READ_LINGER * 4)
        return sent

    expected = asyncio.run(on_a_loop())
    writer.close()
    conn = sqlite3.connect(path)
    got = []
    for kind, data in conn.execute("SELECT kind, data FROM entries ORDER BY id"):
        got += search.block_reads(orjson.loads(data)) if kind == "reads" else [orjson.loads(data)]
    assert got == expected
    assert [list(e) for e in got] == [list(e) for e in expected]  # the same keys in the same order
    blocks = [orjson.loads(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind = 'reads'")]
    # The batch across 02:14:00 went read by read into blocks of rows, the one after the read
    # appended whole stayed packed as the proxy sent it (errors and not-executed reads included).
    assert any("reads" in b for b in blocks) and any("packed" in b for b in blocks)
    assert ledger.verify(sqlite_sink.read_rows(conn)).ok
    assert writer.committed == len(expected)


def entry(i: int, pad: int = 0) -> bytes:
    return b'{"time":"2026-11-24T02:00:00.000000+00:00","kind":"decision","i":%d,"pad":"%s"}' % (i, b"x" * pad)


def test_close_under_a_backlog_of_acknowledgements_does_not_stall(tmp_path):
    """The proxy closes its ledger from an executor thread while writes are still unacknowledged:
    the acknowledgements must keep flowing while close() hands the backlog over, or the writer
    blocks on its full pipe back, stops reading, and close() gives up with the backlog unwritten."""
    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
    pid = ledger._proc.pid

    async def main() -> list[object]:
        os.kill(pid, signal.SIGSTOP)  # a slow commit: the backlog builds up in the proxy
        resume = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))  # not on the loop: close() may hold it up
        try:
            futures = [ledger.append(entry(i), durable=True) for i in range(2000)]
            for i in range(40000):
                ledger.append(entry(i, 500))
            resume.start()
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, ledger.close)
            assert time.monotonic() - t0 < 8, "close() stalled"
        finally:
            resume.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, int) for r in results), {type(r) for r in results}
    assert ledger._proc.poll() == 0  # close() waited for the writer to finish
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 42000


def test_a_writer_restart_closes_no_descriptor_of_the_proxy(tmp_path):
    """The dead writer's pipe is closed once: a descriptor the proxy opens meanwhile (a client's
    socket, an upstream connection) under the same number must stay open."""
    ledger = LedgerProcess({"store": "sqlite", "target": str(tmp_path / "l.db"), "chain": "c", "key": None},
                           name="l")
    opened: list[int] = []
    stop = threading.Event()

    def open_files() -> None:  # the proxy accepting connections while the writer restarts
        while not stop.is_set():
            opened.append(os.open(os.devnull, os.O_RDONLY))
            time.sleep(0.002)

    opener = threading.Thread(target=open_files)
    opener.start()
    try:
        os.kill(ledger._proc.pid, signal.SIGKILL)
        wait_until(lambda: ledger.restarts == 1 and not ledger.last_failed, timeout=30, what="a new writer")
        time.sleep(0.3)
    finally:
        stop.set()
        opener.join()
    try:
        # a number handed out twice: one of ours was closed behind our back
        assert len(set(opened)) == len(opened), sorted(fd for fd in set(opened) if opened.count(fd) > 1)
        assert ledger.append(entry(1), durable=True).result(10) == 1
    finally:
        ledger.close()
        for fd in set(opened):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_a_writer_whose_proxy_is_gone_commits_all_the_pipe_held(tmp_path):
    """The proxy killed with a full pipe: the writer's first report back fails, and it must still
    read (and commit) everything the proxy sent before it died."""
    db = tmp_path / "l.db"
    proc = subprocess.Popen([sys.executable, "-m", "dbguard.audit.ledger_process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        proc.stdin.write(wire.frame(wire.CONFIG, orjson.dumps({"store": "sqlite", "target": str(db), "chain": "c"})))
        proc.stdin.flush()
        assert list(wire.FrameReader().feed(proc.stdout.read(wire.HEADER.size))) == [(wire.READY, b"")]
        proc.stdout.close()  # the proxy is gone: nobody reads the writer's reports
        for i in range(5000):
            proc.stdin.write(wire.entry(0, False, entry(i, 500)))
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 5000


@pytest.mark.parametrize("garbage", [b"\0" * (1 << 20), b"hello\n", wire.frame(wire.CONFIG, b"[]"),
                                     wire.frame(wire.CONFIG, b"{not json")])
def test_a_writer_started_by_hand_with_garbage_says_so_and_exits(garbage):
    """Its first frame must be the configuration: zero bytes (well-formed empty frames) must not be
    kept in memory until one comes, and nonsense is an error message, not a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "dbguard.audit.ledger_process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with contextlib.suppress(BrokenPipeError):  # it may stop reading at the first bad frame
            for _ in range(20 if garbage[0] == 0 else 1):
                proc.stdin.write(garbage)
                proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2, err
    assert out == b""
    assert b"Traceback" not in err and b"not a dbguard proxy" in err, err


def test_two_ledgers_in_one_process_each_learn_a_shape(tmp_path):
    """A shape's ``sent`` names the writer process that knows it: another ledger's writer (of the
    same generation count) does not, and must be told before a read names it."""
    shape = ReadShape(b'"session":"s"', b'"statement":"SELECT 1"')
    first, second = (LedgerProcess({"store": "sqlite", "target": str(tmp_path / f"{name}.db"), "chain": name,
                                    "key": None}, name=name) for name in ("a", "b"))
    try:
        for ledger in (first, second):
            ledger.append_read(Done(1, b'{"stmt":1,"status":"ok"}', (datetime.datetime.now(datetime.UTC), shape)))
    finally:
        first.close()
        second.close()
    assert (first.dropped, second.dropped) == (0, 0)
    for name in ("a", "b"):
        assert sqlite3.connect(tmp_path / f"{name}.db").execute("SELECT count(*) FROM entries").fetchone()[0] == 1


def test_reads_appended_while_close_packs_them_are_stored_or_counted_never_lost(tmp_path):
    """The session's loop appends reads without a lock while close() packs them on another thread
    (the proxy closes the ledger from an executor), and may go on appending after the last frame:
    every read is either in the chain or counted as dropped."""
    ledger = LedgerProcess({"store": "sqlite", "target": str(tmp_path / "l.db"), "chain": "c", "key": None},
                           name="l")
    shape = ReadShape(b'"session":"s"', b'"statement":"SELECT 1"')
    when = datetime.datetime.now(datetime.UTC)
    appended = 0
    started = threading.Event()

    def reads() -> None:
        nonlocal appended
        for i in range(30000):
            ledger.append_read(Done(i, b'{"stmt":1,"status":"ok"}', (when, shape)))
            appended += 1
            if i == 2000:
                started.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many hand-overs between the two threads
    try:
        appender = threading.Thread(target=reads)
        appender.start()
        assert started.wait(10)
        ledger.close()
        appender.join(30)
    finally:
        sys.setswitchinterval(switch)
    assert appended == 30000
    stored = sum(1 for event in ledger_events(tmp_path / "l.db") if event.get("kind") == "decision")
    assert stored > 0 and stored + ledger.dropped == appended, (stored, ledger.dropped)


def _writer_fed(db, frames: list[bytes], *, with_config: bool = False) -> tuple[int, bytes]:
    """A writer process started by hand and fed ``frames`` once it is ready (or in one write with
    its configuration): (status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "dbguard.audit.ledger_process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        config = wire.frame(wire.CONFIG, orjson.dumps({"store": "sqlite", "target": str(db), "chain": "c"}))
        if not with_config:
            proc.stdin.write(config)
            proc.stdin.flush()
            assert list(wire.FrameReader().feed(proc.stdout.read(wire.HEADER.size))) == [(wire.READY, b"")]
        with contextlib.suppress(BrokenPipeError):  # it may stop reading at a corrupt frame
            proc.stdin.write((config if with_config else b"") + b"".join(frames))
            proc.stdin.close()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return proc.returncode, err


T0 = 1764124800.25  # 2025-11-26T02:40:00.25Z
SHAPES = [wire.shape(number, b'"session":"s","identity":{"user":"u"}',
                     b'"statement":"SELECT a FROM t","statements":[{"actions":[{"operation":"SELECT","name":"t"}]}]')
          for number in (7, 8)]


def _record(index: int, when: float, stmt: int, tag: bytes, length: int | None = None) -> bytes:
    return read_records.RECORD.pack(index, when, stmt, 5, len(tag) if length is None else length) + tag


def test_a_read_appended_as_close_packs_the_last_ones_is_counted(tmp_path):
    """append_read saw the ledger open, and close() packed the reads and sent QUIT before the read
    reached the list (the loop's append and the executor's close interleave): it is counted as
    dropped, not left in a buffer nobody sends."""
    ledger = LedgerProcess({"store": "sqlite", "target": str(tmp_path / "l.db"), "chain": "c", "key": None},
                           name="l")
    shape = ReadShape(b'"session":"s"', b'"statement":"SELECT 1"')
    when = datetime.datetime.now(datetime.UTC)

    class ClosedMeanwhile(list):
        def append(self, item: object) -> None:
            ledger.close()  # between append_read's check and its append
            super().append(item)

    for i in range(10):
        ledger.append_read(Done(i, b'{"stmt":1,"status":"ok"}', (when, shape)))
    ledger._reads = ClosedMeanwhile(ledger._reads)
    ledger.append_read(Done(10, b'{"stmt":1,"status":"ok"}', (when, shape)))
    stored = sum(1 for event in ledger_events(tmp_path / "l.db") if event.get("kind") == "decision")
    assert (stored, ledger.dropped) == (10, 1)


def test_a_writer_whose_store_is_locked_sheds_reads_past_its_queue_and_counts_them(tmp_path):
    """While the store cannot commit, the writer holds about hold_max reads and entries: further batches
    of reads are dropped and counted (its memory stays bounded through a long outage); what must be
    durable still queues and is answered; once the store is back, every read is stored or counted."""
    db = tmp_path / "l.db"
    proc = subprocess.Popen([sys.executable, "-m", "dbguard.audit.ledger_process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    frames = wire.FrameReader()
    out: list[tuple[bytes, bytes]] = []
    try:
        config = {"store": "sqlite", "target": str(db), "chain": "c", "hold_max": 3}
        proc.stdin.write(wire.frame(wire.CONFIG, orjson.dumps(config)))
        proc.stdin.flush()
        assert list(frames.feed(proc.stdout.read(wire.HEADER.size))) == [(wire.READY, b"")]
        batches = [wire.reads(2, T0 + i, T0 + i + 0.5, [7, 8], _record(0, T0 + i, 2 * i, b"SELECT 1")
                              + _record(1, T0 + i + 0.5, 2 * i + 1, b"SELECT 1")) for i in range(40)]
        blocker = sqlite3.connect(db, timeout=10, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            proc.stdin.write(b"".join(SHAPES) + batches[0])
            proc.stdin.flush()
            time.sleep(0.5)  # its commit now waits for the file
            proc.stdin.write(b"".join(batches[1:]) + wire.entry(9, False, entry(1)))
            proc.stdin.flush()
            time.sleep(0.5)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        proc.stdin.write(wire.frame(wire.QUIT, b""))
        proc.stdin.close()
        out = list(frames.feed(proc.stdout.read()))
        err = proc.stderr.read()
        assert proc.wait(30) == 0, err
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        proc.stdout.close()
    assert b"reads are dropped (counted)" in err and b"Traceback" not in err, err
    acks = [wire.ACK_BODY.unpack_from(payload) for kind, payload in out if kind == wire.ACK]
    assert [request for request, seq in acks if seq > 0] == [9]  # the durable entry behind the shed reads
    stats = orjson.loads([payload for kind, payload in out if kind == wire.STATS][-1])
    stored = sum(1 for event in ledger_events(db) if event.get("kind") == "decision" and "completion" in event)
    assert stats["dropped"] >= 2 * (40 - 2), stats  # it took two batches of two reads (then held 4 >= 3)
    assert stored + stats["dropped"] == 80, (stored, stats)
    assert ledger.verify(sqlite_sink.read_rows(sqlite3.connect(db))).ok


@pytest.mark.parametrize("batch", [
    # two records, the frame says three
    wire.reads(3, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(1, T0 + 1, 2, b"SELECT 1")),
    # a tag cut off by the end of the frame
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(1, T0 + 1, 2, b"SELECT 1", 40)),
    # a record naming a shape past the frame's list of shapes
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(5, T0 + 1, 2, b"SELECT 1")),
    # a tag that is not ASCII
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(1, T0 + 1, 2, "SÉLECT 1".encode())),
    # a completion that is not a JSON object
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + read_records.whole(1, T0 + 1, 2, b"[1, 2")),
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + read_records.whole(1, T0 + 1, 2, b'"ok"')),
    # a read decided outside the frame's earliest..latest: its block's minute would be wrong
    wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(1, T0 + 3600, 2, b"SELECT 1")),
    # times no datetime holds (the writer died with a traceback, committing nothing)
    wire.reads(2, -math.inf, math.inf, [7, 8], _record(0, -math.inf, 1, b"SELECT 1") + _record(1, math.inf, 2, b"")),
    wire.reads(2, 1e15, 1e15, [7, 8], _record(0, 1e15, 1, b"SELECT 1") + _record(1, 1e15, 2, b"SELECT 1")),
], ids=["count", "cut-tag", "shape-index", "non-ascii", "bad-json", "json-not-object", "time", "infinite", "year"])
def test_a_batch_of_corrupt_read_records_is_refused_not_stored(tmp_path, batch):
    """The writer stores a batch of one minute as it came: records that do not hold what the frame
    says must be refused as a corrupt stream, not chained into a block that cannot be read back
    (or reads back as other reads than the proxy's)."""
    db = tmp_path / "l.db"
    status, err = _writer_fed(db, [wire.entry(0, False, entry(1)), *SHAPES, batch])
    assert status == 0 and b"stream from the proxy is corrupt" in err, err
    assert b"Traceback" not in err, err
    conn = sqlite3.connect(db)
    kinds = [kind for (kind,) in conn.execute("SELECT kind FROM entries ORDER BY id")]
    assert kinds == ["decision"]  # what came before the corrupt batch, and nothing of it
    assert ledger.verify(sqlite_sink.read_rows(conn)).ok


def test_a_corrupt_frame_that_came_with_the_configuration_is_refused_like_any_other(tmp_path):
    """Frames read together with the configuration are handled before the main loop: a corrupt one
    must still be the corrupt stream it is (logged, what came before it committed), not a traceback."""
    db = tmp_path / "l.db"
    bad = wire.reads(2, T0, T0 + 1, [7, 8], _record(0, T0, 1, b"SELECT 1") + _record(5, T0 + 1, 2, b"SELECT 1"))
    status, err = _writer_fed(db, [wire.entry(0, False, entry(1)), *SHAPES, bad], with_config=True)
    assert b"Traceback" not in err, err
    assert status == 0 and b"stream from the proxy is corrupt" in err, err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 1


def test_a_long_read_whose_tag_holds_a_control_character_is_stored_as_valid_json(tmp_path):
    """A read that ran longer than a record's µs hold keeps its completion whole, as ``json()``
    writes it: a tag with a control character (the server's text) must still make JSON, or the
    writer refuses the batch (and the proxy loses what was queued with it)."""
    from dbguard.session.completions import Pending

    path = str(tmp_path / "l.db")
    writer = LedgerProcess({"store": "sqlite", "target": path, "chain": "c1", "key": None}, name="t")
    shape = ReadShape(b'"session":"s","identity":{"user":"u"}', b'"statement":"SELECT 1","statements":[]')
    now = datetime.datetime(2026, 11, 24, 2, 13, 10, tzinfo=datetime.UTC)
    expected = []

    async def on_a_loop() -> None:
        for stmt, tag, seconds in ((1, "SELECT\t1", 5000.0), (2, "SELECT 1", 0.5)):
            p = Pending(stmt, 1, False, (now, shape))
            p.tags, p.closed, p.started, p.ended = [tag], True, 10.0, 10.0 + seconds
            expected.append({"time": "2026-11-24T02:13:10.000000+00:00", "kind": "decision", "session": "s",
                             "identity": {"user": "u"}, "stmt": stmt, "statement": "SELECT 1", "statements": [],
                             "completion": p.fields()})
            writer.append_read(p)
        await asyncio.sleep(READ_LINGER * 4)

    asyncio.run(on_a_loop())
    writer.close()
    assert writer.dropped == 0 and writer.restarts == 0
    got = [r for (data,) in sqlite3.connect(path).execute("SELECT data FROM entries ORDER BY id")
           for r in search.block_reads(orjson.loads(data))]
    assert got == expected


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the callbacks other threads hand it (call_soon_threadsafe)."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[str] = []

    def call_soon_threadsafe(self, callback, *args, context=None):  # noqa: ANN001, ANN201
        if not self.is_running() or threading.get_ident() != self._thread_id:
            self.handed.append(getattr(callback, "__qualname__", repr(callback)))
        return super().call_soon_threadsafe(callback, *args, context=context)


def switches(thread: threading.Thread) -> int:
    """How often ``thread`` was woken (its voluntary context switches)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def ack_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "dbguard-ledger-acks")


def test_acknowledgements_are_read_and_settled_on_the_event_loop(tmp_path):
    """Durable writes from an event loop: their acknowledgements are read by the loop itself and
    their futures set there, with no hop from another thread, while the acks thread sleeps."""
    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
    thread = ack_thread()
    assert ledger.append(entry(0), durable=True).result(10) == 1  # from a plain thread: the thread reads
    seen: list[tuple[int, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await ledger.append(entry(1), durable=True) == 2  # the loop takes the answers over
        before_switches, before_handed, t0 = switches(thread), len(loop.handed), time.monotonic()
        for i in range(300):
            future = ledger.append(entry(i + 2), durable=True)
            future.add_done_callback(lambda f: seen.append((threading.get_ident(), f.result())))
            if i % 3 == 0:
                frames = sys._current_frames()[thread.ident]  # noqa: SLF001
                assert "_read_some" not in repr(traceback.extract_stack(frames)), "the thread reads"
            await future
        # 300 acknowledgements (and their STATS): the thread woke for its 0.5 s checks and its
        # hand-over (each wake may wait for the GIL a few times: voluntary switches too), not for
        # each (a reader would wake ~300 times), and no settling was handed to the loop from another thread.
        woke, elapsed = switches(thread) - before_switches, time.monotonic() - t0
        assert woke <= min(4 * elapsed + 40, 150), (woke, elapsed)
        assert loop.handed[before_handed:] == []
        assert seen == [(threading.get_ident(), i + 3) for i in range(300)]

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(main())
    # The loop is gone: a plain thread's durable write is read by the thread again, and close too.
    assert ledger.append(entry(302), durable=True).result(10) == 303
    ledger.close()
    assert ledger._proc.poll() == 0
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 303


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_writer_killed_under_durable_writes_from_a_loop(tmp_path):
    """SIGKILL while durable writes from a running loop are in flight, with acknowledgements still
    unread in the pipe: those resolve with their sequence numbers, the unacknowledged fail with
    LedgerUnavailable, a new writer starts and the loop reads its acknowledgements."""
    from dbguard.audit.writer import LedgerUnavailable

    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
    conn = sqlite3.connect(db)

    def stored() -> int:
        return conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await ledger.append(entry(0), durable=True) == 1
        first = ledger._proc.pid
        # Without returning to the loop: 60 writes committed and acknowledged into the pipe (it
        # holds them with their STATS frames)
        # (the loop cannot read them yet), then 100 the stopped writer never reads, then SIGKILL.
        acked = [ledger.append(entry(i), durable=True) for i in range(1, 61)]
        wait_until(lambda: stored() == 61, timeout=30, what="the writer to commit")
        time.sleep(0.3)  # its acknowledgements written
        os.kill(first, signal.SIGSTOP)
        wait_until(lambda: stopped(first), timeout=10, what="the writer to stop")
        lost = [ledger.append(entry(i), durable=True) for i in range(61, 161)]
        os.kill(first, signal.SIGKILL)
        results = await asyncio.gather(*acked, return_exceptions=True)
        assert results == list(range(2, 62))
        failures = await asyncio.gather(*lost, return_exceptions=True)
        assert all(isinstance(r, LedgerUnavailable) for r in failures), failures
        wait_start = time.monotonic()
        while not (ledger.restarts == 1 and not ledger.last_failed):
            assert time.monotonic() - wait_start < 30, "no new writer"
            await asyncio.sleep(0.05)
        assert ledger._proc.pid != first and ledger._proc.poll() is None
        handed = len(loop.handed)
        later = [await ledger.append(entry(i), durable=True) for i in range(161, 211)]
        assert later == list(range(62, 112))
        assert loop.handed[handed:] == []  # the new writer's answers are read on the loop again
        assert ledger._ack_loop is loop

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(main())
    ledger.close()
    assert stored() == 111
    assert ledger.dropped == 100
    assert ledger_verifies(conn)


def ledger_verifies(conn: sqlite3.Connection) -> bool:
    return ledger.verify(sqlite_sink.read_rows(conn)).ok


def test_a_corrupt_answer_read_on_the_loop_is_a_dead_writer(tmp_path):
    """Nonsense on the writer's stdout (written there through /proc) while the loop reads it: the
    writer is killed and replaced, and the loop reads the new one's acknowledgements."""
    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await ledger.append(entry(0), durable=True) == 1
        assert ledger._ack_loop is loop
        first = ledger._proc.pid
        out = os.open(f"/proc/{first}/fd/1", os.O_WRONLY)
        try:
            os.write(out, wire.HEADER.pack(wire.ACK, wire.MAX_FRAME + 1))
        finally:
            os.close(out)
        started = time.monotonic()
        while not (ledger.restarts == 1 and not ledger.last_failed):
            assert time.monotonic() - started < 30, "no new writer"
            await asyncio.sleep(0.05)
        assert ledger._proc.pid != first and not alive(first)
        assert await ledger.append(entry(1), durable=True) == 2
        assert ledger._ack_loop is loop

    asyncio.run(main())
    ledger.close()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 2


def test_acknowledgements_move_between_a_stopped_loop_and_plain_threads(tmp_path):
    """A loop that read the acknowledgements stops (not closed): a plain thread's durable write is
    still answered, the loop takes them again when it runs, and close() with it stopped finishes."""
    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
    loop = asyncio.new_event_loop()

    async def durable(i: int) -> int:
        return await ledger.append(entry(i), durable=True)

    async def many(numbers: range) -> list[int]:
        return list(await asyncio.gather(*(durable(i) for i in numbers)))

    try:
        assert loop.run_until_complete(durable(0)) == 1
        assert ledger._ack_loop is loop
        for i in range(1, 4):  # stopped between these: the thread reads
            assert ledger.append(entry(i), durable=True).result(10) == i + 1
        assert loop.run_until_complete(many(range(4, 104))) == list(range(5, 105))
        assert ledger._ack_loop is loop
        rfd = ledger._rfd
        pipe = os.fstat(rfd).st_ino
        t0 = time.monotonic()
        ledger.close()
        assert time.monotonic() - t0 < 5
        assert ledger._proc.poll() == 0
        # The loop stays stopped and is closed without running again: the pipe is released anyway.
        assert ledger._watching is None
        assert loop._selector.get_map().get(rfd) is None
        with contextlib.suppress(OSError):  # (EBADF: closed)
            assert os.fstat(rfd).st_ino != pipe, "the closed writer's pipe is still open"
    finally:
        loop.close()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 104


def test_a_writer_restarts_when_the_proxy_holds_more_than_1024_descriptors(tmp_path):
    """A proxy with a thousand clients holds descriptors past 1024, where select.select() raises:
    the start of a new writer after one died must not depend on it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))  # (raises where the hard limit is lower)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # what clients would hold
    try:
        db = tmp_path / "l.db"
        ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
        try:
            assert ledger.append(entry(1), durable=True).result(10) == 1
            os.kill(ledger._proc.pid, signal.SIGKILL)
            wait_until(lambda: ledger.restarts == 1 and ledger._fd >= 0, timeout=20, what="a new writer")
            assert ledger.append(entry(2), durable=True).result(10) == 2
            assert ledger._fd > 1024
        finally:
            ledger.close()
        assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 2
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_plain_thread_waiting_for_the_pipe_does_not_freeze_the_loop_that_reads_the_answers(tmp_path):
    """The loop reads the acknowledgements and has not read them for a while (the writer is blocked
    writing them, so it stops reading its input); a plain thread's large write waits for the pipe
    holding _lock. The loop's next append waits for _lock: the thread must read the answers
    meanwhile, or the loop froze for _write_all's 10 s deadline."""
    db = tmp_path / "l.db"
    ledger = LedgerProcess({"store": "sqlite", "target": str(db), "chain": "c", "key": None}, name="l")
    blocked: list[float] = []

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        assert await ledger.append(entry(0), durable=True) == 1
        assert ledger._ack_loop is loop
        futures = [ledger.append(entry(i), durable=True) for i in range(1, 3000)]  # answers unread
        time.sleep(1.5)
        bulk = threading.Thread(target=lambda: [ledger.append(entry(i, 70000)) for i in range(40)])
        bulk.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        ledger.append(entry(3000))
        blocked.append(time.monotonic() - t0)
        results = await asyncio.gather(*futures, return_exceptions=True)
        await loop.run_in_executor(None, bulk.join)
        return results

    results = asyncio.run(main())
    ledger.close()
    assert blocked[0] < 2, blocked
    assert results == list(range(2, 3001))
    assert sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0] == 3041
