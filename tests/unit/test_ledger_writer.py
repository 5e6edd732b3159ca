"""The ledger writer and search over a real SQLite store, with faults injected into the store."""

from __future__ import annotations

import sqlite3

import orjson

from dbguard.audit import ledger, search, sqlite_sink
from dbguard.audit.writer import LedgerWriter


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
