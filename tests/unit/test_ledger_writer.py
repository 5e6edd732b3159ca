"""The ledger writer and search over a real SQLite store, with faults injected into the store."""

from __future__ import annotations

import datetime
import pathlib
import sqlite3

import orjson
import pytest

from dbguard.audit import ledger, search, sqlite_sink
from dbguard.audit import writer as writer_module
from dbguard.audit.events import Done, ReadShape
from dbguard.audit.writer import LedgerWriter
from dbguard.session.completions import Pending


@pytest.fixture(autouse=True)
def _one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests assert how entries fall into blocks: the writer thread must not commit part of
    them because an append loop was descheduled for READ_LINGER (close() and durable entries still
    wake it at once)."""
    monkeypatch.setattr(writer_module, "READ_LINGER", 30.0)


def _event(session: str, second: int, user: str = "bob") -> bytes:
    event = {"time": f"2026-11-24T02:0{second // 60}:{second % 60:02d}.000000+00:00", "kind": "decision",
             "session": session, "identity": {"user": user}, "stmt": second, "outcome": "forwarded", "rule": "",
             "statements": [{"command": "SELECT", "fingerprint": "f",
                             "actions": [{"operation": "SELECT", "schema": "", "name": "t", "columns": ["a"]}]}]}
    return orjson.dumps(event)


class LostAck(sqlite_sink.SqliteStore):
    """Commits, then reports an error: a connection lost while COMMIT's answer was on its way."""

    fail_next = False

    def write(self, chain, entries, checkpoints):  # noqa: ANN001, ANN201
        super().write(chain, entries, checkpoints)
        if entries and LostAck.fail_next:
            LostAck.fail_next = False
            raise OSError("connection lost during COMMIT")


def test_a_commit_whose_answer_was_lost_is_not_written_twice(tmp_path):
    path = str(tmp_path / "l.db")
    writer = LedgerWriter(LostAck(path), "c1")
    LostAck.fail_next = True
    writer.append(_event("s1", 1))
    writer.append(_event("s2", 2))
    assert writer.append(_event("s3", 3), durable=True).result(5) == 3  # it landed: not refused
    writer.append(_event("s4", 4), durable=True).result(5)
    writer.close()
    conn = sqlite3.connect(path)
    sessions = [orjson.loads(d)["session"] for (d,) in conn.execute("SELECT data FROM entries ORDER BY id")]
    assert sessions == ["s1", "s2", "s3", "s4"]
    assert ledger.verify(sqlite_sink.read_rows(conn)).ok


class Down(sqlite_sink.SqliteStore):
    """Refuses commits while ``down`` is set (a locked file, a sink that went away)."""

    down = True

    def write(self, chain, entries, checkpoints):  # noqa: ANN001, ANN201
        if entries and Down.down:
            raise OSError("the store is down")
        super().write(chain, entries, checkpoints)


def test_what_the_writer_holds_counts_retried_entries_until_they_commit(tmp_path):
    """held() (what the writer process sheds reads by) keeps the non-durable entries it retries,
    lets go of the durable ones it refused, and is zero once the store took everything."""
    from dbguard.audit.writer import LedgerUnavailable

    writer = LedgerWriter(Down(str(tmp_path / "l.db")), "c1")
    Down.down = True
    try:
        for second in range(3):
            writer.append(_event("s1", second))
        with pytest.raises(LedgerUnavailable):
            writer.append(_event("s2", 9), durable=True).result(5)
        assert writer.held() == 3 and writer.committed == 0
    finally:
        Down.down = False
    assert writer.append(_event("s3", 10), durable=True).result(5) == 4
    writer.close()
    assert writer.held() == 0 and writer.committed == 4


def test_search_finds_matches_behind_blocks_of_other_users_reads(tmp_path):
    path = str(tmp_path / "l.db")
    writer = sqlite_sink.SqliteLedger(path, "c1")
    for second in (1, 2, 61, 62):
        writer.append(_event("s-bob", second), block=True)
    for second in (121, 122):
        writer.append(_event("s-alice", second, user="alice"), block=True)
    writer.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM entries WHERE kind = 'reads'").fetchone()[0] == 3
    found = search.search(conn, search.Query(user="alice", limit=2))
    assert [e["stmt"] for e in found] == [121, 122]
    assert [e["stmt"] for e in search.search(conn, search.Query(limit=3))] == [1, 2, 61]


# -- blocks of reads: each shape once, each read a few bytes ---------------------------------------

def _shape(session: str, user: str, table: str) -> ReadShape:
    head = orjson.dumps({"session": session, "identity": {"user": user, "groups": ["g"]}, "database": "shop",
                         "client_addr": "127.0.0.1:5"})[1:-1]
    body = orjson.dumps({"protocol": "extended", "statement": f"SELECT a FROM {table} WHERE id = $1",
                         "statements": [{"command": "SELECT", "fingerprint": f"fp-{table}", "flags": [],
                                         "actions": [{"operation": "SELECT", "schema": "", "name": table,
                                                      "columns": ["a", "id"]}]}],
                         "decisions": [{"policy": "p", "rule": "r", "action": "allow"}], "outcome": "forwarded",
                         "rule": "", "sqlstate": "", "reason": ""})[1:-1]
    return ReadShape(head, body)


def _reads(writer: LedgerWriter) -> list[tuple[dict, bytes]]:
    """Reads of two sessions over a minute boundary, plus one appended whole: (expected event, line)."""
    bob_orders, bob_items, alice = _shape("s-bob", "bob", "orders"), _shape("s-bob", "bob", "items"), \
        _shape("s-alice", "alice", "orders")
    t0 = datetime.datetime(2026, 11, 24, 2, 13, 58, 999_000, tzinfo=datetime.UTC)
    out = []
    for i in range(40):
        now = t0 + datetime.timedelta(microseconds=97_003 * i)  # crosses 02:14:00 after ~11 reads
        shape = (bob_orders, bob_items, alice)[i % 3]
        done: Done | Pending = Pending(i + 1, 1, False, (now, shape))  # ran, one tag: stored as a few numbers
        done.tags, done.closed, done.started, done.ended = [f"SELECT {i % 4}"], True, 10.0, 10.0 + 0.00025 * i
        if i == 25:  # a tag JSON must escape
            done.tags = ['WEIRD "tag" \\ 2']
        if i == 33:  # ran for 73 minutes: more µs than a packed read record holds
            done.ended = done.started + 4_400.0
        if i % 7 == 0:  # anything else keeps its completion whole
            done = Done(i + 1, b'{"stmt":%d,"tags":[],"rows":0,"status":"not-executed"}' % (i + 1), (now, shape))
        if i == 20:  # an error, with a message that needs escaping
            done = Done(i + 1, orjson.dumps({"stmt": i + 1, "duration_ms": 1.5, "tags": [], "rows": 0,
                                             "error": {"sqlstate": "22P02", "message": 'bad "…" \\ é'},
                                             "status": "error"}), (now, shape))
        line = shape.line(now, done.stmt, done.json())
        if i == 30:
            writer.append(line, block=True)  # a read appended whole still lands in the block
        else:
            writer.append_read(done)
        out.append((orjson.loads(line), line))
    return out


def test_a_block_expands_to_exactly_the_decision_events_of_its_reads(tmp_path):
    path = str(tmp_path / "l.db")
    writer = sqlite_sink.SqliteLedger(path, "c1")
    expected = _reads(writer)
    assert writer.held() == len(expected)  # nothing committed yet (READ_LINGER is long here)
    writer.close()
    assert writer.held() == 0 and writer.committed == len(expected)
    conn = sqlite3.connect(path)
    blocks = [orjson.loads(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind = 'reads' ORDER BY id")]
    assert len(blocks) == 2 and [b["count"] for b in blocks] == [11, 29]  # one per minute
    assert all(len(b["shapes"]) == 3 for b in blocks)  # each shape stored once per block
    got = [r for b in blocks for r in search.block_reads(b)]
    assert got == [e for e, _ in expected]
    assert [list(r) for r in got] == [list(e) for e, _ in expected]  # the same keys in the same order
    size = sum(len(d) for (d,) in conn.execute("SELECT data FROM entries WHERE kind = 'reads'"))
    assert size < sum(len(line) for _, line in expected) / 2
    assert ledger.verify(sqlite_sink.read_rows(conn)).ok


def test_search_finds_and_expands_each_read_of_a_compact_block(tmp_path):
    path = str(tmp_path / "l.db")
    writer = sqlite_sink.SqliteLedger(path, "c1")
    expected = [e for e, _ in _reads(writer)]
    writer.close()
    conn = sqlite3.connect(path)

    def found(**q: object) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "ledger"} for e in search.search(conn, search.Query(**q))]

    assert found() == expected
    assert found(user="alice") == [e for e in expected if e["identity"]["user"] == "alice"]
    assert found(table="items", column="a", operation="select") == [e for e in expected if "items" in e["statement"]]
    assert found(since="2026-11-24 02:14:00", user="bob", limit=3) == [
        e for e in expected if e["time"] >= "2026-11-24T02:14" and e["identity"]["user"] == "bob"][:3]
    assert found(fingerprint="fp-orders", session="s-alice") == [e for e in expected if e["session"] == "s-alice"]
    hit = search.search(conn, search.Query(user="alice", since="2026-11-24 02:14:01", limit=1))[0]
    assert hit["ledger"]["index"] > 0 and hit["completion"]["rows"] == 23 % 4 and hit["completion"]["duration_ms"] == 5.75
    error = [e for e in search.search(conn, search.Query()) if e["stmt"] == 21][0]
    assert error["completion"]["error"]["message"] == 'bad "…" \\ é'


def test_verify_catches_edits_inside_a_compact_block(tmp_path):
    path = str(tmp_path / "l.db")
    writer = sqlite_sink.SqliteLedger(path, "c1")
    _reads(writer)
    writer.close()
    for edit in ("replace(CAST(data AS TEXT), '\"user\":\"alice\"', '\"user\":\"carol\"')",  # a shape
                 "replace(CAST(data AS TEXT), 'SELECT 1\"]', 'SELECT 9\"]')",  # one read's outcome (its rows)
                 "replace(CAST(data AS TEXT), ',[1,', ',[2,')"):  # a read moved to another shape
        copy = tmp_path / "edited.db"
        copy.write_bytes(pathlib.Path(path).read_bytes())
        conn = sqlite3.connect(copy)
        where = "kind = 'reads' AND id = (SELECT min(id) FROM entries WHERE kind = 'reads')"
        before = conn.execute(f"SELECT data FROM entries WHERE {where}").fetchone()[0]
        conn.execute(f"UPDATE entries SET data = CAST({edit} AS BLOB) WHERE {where}")
        conn.commit()
        assert conn.execute(f"SELECT data FROM entries WHERE {where}").fetchone()[0] != before, edit
        result = ledger.verify(sqlite_sink.read_rows(conn))
        assert [p.kind for p in result.problems] == ["altered"], edit
        conn.close()


def test_a_read_appended_whole_without_a_time_does_not_stall_the_writer(tmp_path):
    path = str(tmp_path / "l.db")
    writer = sqlite_sink.SqliteLedger(path, "c1")
    writer.append(b'{"kind":"decision","stmt":1}', block=True)  # taken as of now: its own minute
    writer.append(_event("s1", 2), block=True)
    writer.append(_event("s1", 3), block=True)
    assert writer.append(_event("s2", 4), durable=True).result(5) == 3
    writer.close()
    conn = sqlite3.connect(path)
    events = [orjson.loads(d) for (d,) in conn.execute("SELECT data FROM entries ORDER BY id")]
    reads = [r for e in events for r in (search.block_reads(e) if e["kind"] == "reads" else [e])]
    assert [r["stmt"] for r in reads] == [1, 2, 3, 4]
    assert ledger.verify(sqlite_sink.read_rows(conn)).ok


def test_verify_reads_one_snapshot_of_a_ledger_being_written(tmp_path):
    """Checkpoints are signed while verify scans: it must see entries and checkpoints as of one
    moment, or a new checkpoint names an entry the scan did not see ("removed")."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dbguard.audit import cli

    key = Ed25519PrivateKey.generate()
    path = str(tmp_path / "l.db")
    live = sqlite_sink.SqliteLedger(path, "c1", signing_key=key, checkpoint_every=1)  # every entry signed
    for second in range(5):
        live.append(_event("s1", second), durable=True).result(5)

    class WrittenMeanwhile:
        read_checkpoints = staticmethod(sqlite_sink.read_checkpoints)

        @staticmethod
        def read_rows(conn):  # noqa: ANN001, ANN205
            for i, row in enumerate(sqlite_sink.read_rows(conn)):
                if i == 2:  # the proxy commits (and signs) three more while verify is halfway
                    for second in range(10, 13):
                        live.append(_event("s2", second), durable=True).result(5)
                yield row

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = cli._verify_snapshot(conn, WrittenMeanwhile, key.public_key())  # noqa: SLF001
        assert result.ok and result.entries == 5 and result.unsigned_tails == (), result
        again = cli._verify_snapshot(conn, sqlite_sink, key.public_key())  # noqa: SLF001
        assert again.ok and again.entries == 8
    finally:
        conn.close()
        live.close()
