"""The embedded ledger store: one SQLite file in WAL mode, the default for a single proxy.

WAL with synchronous=NORMAL survives a killed process; ``synchronous="FULL"`` also survives power
loss. Searchable fields live in indexed columns and in ``touches`` (one row per table/column a
statement reads or writes), so the 2 a.m. question is an index lookup, not a scan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbguard.audit import ledger
from dbguard.audit.writer import Entry, LedgerUnavailable, LedgerWriter, index_fields, touches

__all__ = ["LedgerUnavailable", "SqliteLedger", "SqliteStore", "read_checkpoints", "read_rows"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id          INTEGER PRIMARY KEY,          -- storage order, what verify walks
    chain       TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    prev        TEXT NOT NULL,
    hash        TEXT NOT NULL,
    time        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    user        TEXT NOT NULL DEFAULT '',
    session     TEXT NOT NULL DEFAULT '',
    stmt        INTEGER NOT NULL DEFAULT 0,   -- the statement's number in its session
    outcome     TEXT NOT NULL DEFAULT '',
    rule        TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    data        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS touches (
    entry_id  INTEGER NOT NULL,
    operation TEXT NOT NULL,
    schema    TEXT NOT NULL,
    name      TEXT NOT NULL,
    col       TEXT NOT NULL,
    PRIMARY KEY (entry_id, name, col, operation, schema)  -- an entry's touches: probed per entry
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    chain     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
);
-- Every index costs each entry a b-tree insert: only what search and the writer use.
CREATE INDEX IF NOT EXISTS entries_time ON entries (time);
CREATE INDEX IF NOT EXISTS entries_user_time ON entries (user, time);
CREATE INDEX IF NOT EXISTS entries_rule_time ON entries (rule, time) WHERE rule <> '';
CREATE INDEX IF NOT EXISTS entries_session ON entries (session, stmt);
CREATE INDEX IF NOT EXISTS touches_object ON touches (name, col, operation, entry_id);
"""


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


class SqliteStore:
    """The ledger tables in one SQLite file; used by the writer thread only."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._conn = connect(path)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(SCHEMA)

    def tail(self, chain: str) -> tuple[int, str, int]:
        row = self._conn.execute("SELECT seq, hash FROM entries WHERE chain = ? ORDER BY id DESC LIMIT 1",
                                 (chain,)).fetchone()
        self._next_id = (self._conn.execute("SELECT max(id) FROM entries").fetchone()[0] or 0) + 1
        signed = self._conn.execute("SELECT max(seq) FROM checkpoints WHERE chain = ?", (chain,)).fetchone()
        seq, prev = (row[0], row[1]) if row else (0, ledger.GENESIS)
        return seq, prev, signed[0] or 0

    def write(self, chain: str, entries: list[Entry], checkpoints: list[tuple[int, str, bytes]]) -> None:
        # One proxy writes one SQLite file, so the writer numbers the rows itself and inserts a
        # whole batch with two executemany calls.
        first = self._next_id
        rows = [(first + i, chain, e.seq, e.prev, e.hash, *index_fields(e.event), e.data)
                for i, e in enumerate(entries)]
        touch_rows = [(first + i, *t) for i, e in enumerate(entries) for t in dict.fromkeys(touches(e.event))]
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO entries (id, chain, seq, prev, hash, time, kind, user, session, stmt,"
                            " outcome, rule, fingerprint, data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            cur.executemany("INSERT INTO touches VALUES (?,?,?,?,?)", touch_rows)
            cur.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                            [(chain, seq, h, sig) for seq, h, sig in checkpoints])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            self._next_id = (self._conn.execute("SELECT max(id) FROM entries").fetchone()[0] or 0) + 1
            raise
        self._next_id = first + len(entries)

    def close(self) -> None:
        self._conn.close()


class SqliteLedger(LedgerWriter):
    """The writer over a SQLite file."""

    def __init__(self, path: str, chain: str, *, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = ledger.SIGN_EVERY, synchronous: str = "NORMAL") -> None:
        self.path = path
        super().__init__(SqliteStore(path, synchronous=synchronous), chain, signing_key=signing_key,
                         checkpoint_every=checkpoint_every, name=path)


# -- reading ---------------------------------------------------------------------------------------


def read_rows(conn: sqlite3.Connection) -> Iterator[ledger.Row]:
    for chain, seq, prev, hash_, data in conn.execute("SELECT chain, seq, prev, hash, data FROM entries ORDER BY id"):
        yield ledger.Row(chain=chain, seq=seq, prev=prev, hash=hash_, data=bytes(data))


def read_checkpoints(conn: sqlite3.Connection) -> Iterator[ledger.Checkpoint]:
    for chain, seq, hash_, sig in conn.execute("SELECT chain, seq, hash, signature FROM checkpoints ORDER BY chain, seq"):
        yield ledger.Checkpoint(chain=chain, seq=seq, hash=hash_, signature=bytes(sig))
