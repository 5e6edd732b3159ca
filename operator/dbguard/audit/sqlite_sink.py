"""The embedded ledger sink: SQLite in WAL mode, one writer thread, group commit.

Entries arrive as the event's JSON bytes. The writer assigns each its place in this proxy's chain,
hashes it, extracts the indexed columns (time, identity, rule, tables/columns/operations touched)
and commits a whole batch in one transaction: a crash leaves whole batches or nothing. A durable
append returns a future that resolves once its batch is committed; the proxy waits for it before
it forwards a write or answers a refusal. WAL with synchronous=NORMAL survives a killed process;
``synchronous="FULL"`` also survives power loss.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbguard.audit import ledger

log = logging.getLogger("dbguard.ledger")

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
    data        BLOB NOT NULL,
    UNIQUE (chain, seq)
);
CREATE TABLE IF NOT EXISTS touches (
    entry_id  INTEGER NOT NULL,
    operation TEXT NOT NULL,
    schema    TEXT NOT NULL,
    name      TEXT NOT NULL,
    col       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    chain     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX IF NOT EXISTS entries_time ON entries (time);
CREATE INDEX IF NOT EXISTS entries_user_time ON entries (user, time);
CREATE INDEX IF NOT EXISTS entries_rule_time ON entries (rule, time);
CREATE INDEX IF NOT EXISTS entries_session ON entries (session, stmt);
CREATE INDEX IF NOT EXISTS entries_fingerprint ON entries (fingerprint);
CREATE INDEX IF NOT EXISTS touches_object ON touches (name, col, operation, entry_id);
"""

BATCH_MAX = 1000
RETRY_LIMIT = 100_000  # non-durable entries kept for retry while the sink fails


class LedgerUnavailable(Exception):
    """The ledger could not commit: a durable statement must be refused."""


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def touches(event: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    for statement in event.get("statements") or ():
        for action in statement.get("actions") or ():
            columns = action.get("columns") or [""]
            for col in columns:
                yield (action.get("operation", ""), action.get("schema", ""), action.get("name", ""), col)


class SqliteLedger:
    """Append-only, hash-chained ledger in one SQLite file, written by one thread."""

    def __init__(self, path: str, chain: str, *, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = 1000, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.chain = chain
        self._key = signing_key
        self._checkpoint_every = checkpoint_every
        self._conn = connect(path)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(SCHEMA)
        row = self._conn.execute("SELECT seq, hash FROM entries WHERE chain = ? ORDER BY seq DESC LIMIT 1",
                                 (chain,)).fetchone()
        self._seq, self._prev = (row[0], row[1]) if row else (0, ledger.GENESIS)
        self._queue: queue.Queue[tuple[bytes, concurrent.futures.Future | None] | None] = queue.Queue()
        self._retry: list[bytes] = []
        self._last_signed = 0.0
        signed = self._conn.execute("SELECT max(seq) FROM checkpoints WHERE chain = ?", (chain,)).fetchone()
        self._signed_seq = signed[0] or 0  # after a kill -9 the tail may be unsigned: sign it when idle
        self.committed = 0
        self.failures = 0
        self.dropped = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="dbguard-ledger", daemon=True)
        self._thread.start()

    # -- producer side (event loop) --------------------------------------------------------------

    def append(self, data: bytes, *, durable: bool = False) -> concurrent.futures.Future | None:
        future: concurrent.futures.Future | None = concurrent.futures.Future() if durable else None
        self._queue.put((data, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        self._conn.close()

    # -- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._sign_tail()  # idle: sign what the last burst left unsigned
                continue
            batch: list[tuple[bytes, concurrent.futures.Future | None]] = []
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < BATCH_MAX:  # group commit: take whatever queued up meanwhile
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if batch or self._retry:
                self._commit(batch)
        self._sign_tail()  # a clean shutdown leaves the whole chain signed

    def _sign_tail(self) -> None:
        if self._key is None or self._signed_seq >= self._seq:
            return
        try:
            sig = ledger.sign_checkpoint(self._key, self.chain, self._seq, self._prev)
            self._conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                               (self.chain, self._seq, self._prev, sig))
            self._signed_seq = self._seq
            self._last_signed = time.monotonic()
        except sqlite3.Error as exc:
            log.error("ledger %s: writing a checkpoint failed: %s", self.path, exc)

    def _commit(self, batch: list[tuple[bytes, concurrent.futures.Future | None]]) -> None:
        pending = [(data, None) for data in self._retry] + batch
        seq, prev = self._seq, self._prev
        checkpoints: list[tuple[int, str]] = []
        try:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for data, _ in pending:
                    seq += 1
                    h = ledger.entry_hash(prev, seq, self.chain, data)
                    event = orjson.loads(data)
                    cur.execute(
                        "INSERT INTO entries (chain, seq, prev, hash, time, kind, user, session, stmt, outcome,"
                        " rule, fingerprint, data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (self.chain, seq, prev, h, *index_fields(event), data))
                    entry_id = cur.lastrowid
                    cur.executemany("INSERT INTO touches VALUES (?,?,?,?,?)",
                                    [(entry_id, *t) for t in touches(event)])
                    if self._key is not None and seq % self._checkpoint_every == 0:
                        checkpoints.append((seq, h))
                    prev = h
                now = time.monotonic()
                if (self._key is not None and pending and now - self._last_signed >= 1.0
                        and (not checkpoints or checkpoints[-1][0] != seq)):
                    checkpoints.append((seq, prev))  # at most a second of entries is ever unsigned
                    self._last_signed = now
                for cp_seq, cp_hash in checkpoints:
                    sig = ledger.sign_checkpoint(self._key, self.chain, cp_seq, cp_hash)  # type: ignore[arg-type]
                    cur.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                                (self.chain, cp_seq, cp_hash, sig))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        except Exception as exc:  # noqa: BLE001 - disk full, locked, I/O error: refuse what must be durable
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("ledger %s: commit of %d entries failed: %s", self.path, len(pending), self.last_error)
            keep = [data for data, fut in pending if fut is None]
            if len(keep) > RETRY_LIMIT:
                self.dropped += len(keep) - RETRY_LIMIT
                log.error("ledger: %d non-durable entries dropped after repeated failures", len(keep) - RETRY_LIMIT)
                keep = keep[-RETRY_LIMIT:]
            self._retry = keep
            for _, fut in pending:
                if fut is not None:
                    fut.set_exception(LedgerUnavailable(self.last_error))
            time.sleep(0.05)
            return
        self._seq, self._prev = seq, prev
        if checkpoints:
            self._signed_seq = checkpoints[-1][0]
        self._retry = []
        self.committed += len(pending)
        for _, fut in pending:
            if fut is not None:
                fut.set_result(seq)


def index_fields(event: dict[str, Any]) -> tuple[str, str, str, str, int, str, str, str]:
    """time, kind, user, session, stmt, outcome, rule, fingerprints: the searchable columns."""
    identity = event.get("identity") or {}
    stmt = event.get("stmt") or (event.get("completion") or {}).get("stmt") or 0
    return (event.get("time", ""), event.get("kind", ""), identity.get("user") or event.get("user", ""),
            event.get("session", ""), int(stmt), event.get("outcome", ""), event.get("rule", ""),
            " ".join(s.get("fingerprint", "") for s in event.get("statements") or ()))


# -- reading ---------------------------------------------------------------------------------------


def read_rows(conn: sqlite3.Connection) -> Iterator[ledger.Row]:
    for chain, seq, prev, hash_, data in conn.execute("SELECT chain, seq, prev, hash, data FROM entries ORDER BY id"):
        yield ledger.Row(chain=chain, seq=seq, prev=prev, hash=hash_, data=bytes(data))


def read_checkpoints(conn: sqlite3.Connection) -> Iterator[ledger.Checkpoint]:
    for chain, seq, hash_, sig in conn.execute("SELECT chain, seq, hash, signature FROM checkpoints ORDER BY chain, seq"):
        yield ledger.Checkpoint(chain=chain, seq=seq, hash=hash_, signature=bytes(sig))
