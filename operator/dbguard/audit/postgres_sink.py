"""The shared ledger store: PostgreSQL, for a cluster of proxies.

Use a database separate from the governed one. Every proxy instance writes its own chain (its
``--ledger-chain``, by default HOST:PORT) into the same tables; search merges the chains and
verify walks each. A batch is one transaction. The tables refuse UPDATE and DELETE through a
trigger, and the role the proxies use needs only INSERT and SELECT (see docs/ledger.md); an owner
who disables the trigger and edits rows is still caught by ``dbguard audit verify``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbguard.audit import ledger
from dbguard.audit.writer import Entry, LedgerWriter, index_fields, touches

log = logging.getLogger("dbguard.ledger")

SCHEMA_NAME = "dbguard_audit"

SCHEMA = f"""
SELECT pg_advisory_xact_lock(hashtext('dbguard-ledger-schema'));
CREATE SCHEMA IF NOT EXISTS {SCHEMA_NAME};
CREATE TABLE IF NOT EXISTS {SCHEMA_NAME}.entries (
    id          bigserial PRIMARY KEY,        -- storage order, what verify walks
    chain       text NOT NULL,
    seq         bigint NOT NULL,
    prev        text NOT NULL,
    hash        text NOT NULL,
    time        text NOT NULL,                -- ISO 8601 UTC, as in the entry: sorts as time
    kind        text NOT NULL,
    "user"      text NOT NULL DEFAULT '',
    session     text NOT NULL DEFAULT '',
    stmt        bigint NOT NULL DEFAULT 0,
    outcome     text NOT NULL DEFAULT '',
    rule        text NOT NULL DEFAULT '',
    fingerprint text NOT NULL DEFAULT '',
    data        bytea NOT NULL,               -- the exact bytes that were hashed
    UNIQUE (chain, seq)
);
CREATE TABLE IF NOT EXISTS {SCHEMA_NAME}.touches (
    entry_id  bigint NOT NULL,
    operation text NOT NULL,
    schema    text NOT NULL,
    name      text NOT NULL,
    col       text NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA_NAME}.checkpoints (
    chain     text NOT NULL,
    seq       bigint NOT NULL,
    hash      text NOT NULL,
    signature bytea NOT NULL,
    PRIMARY KEY (chain, seq)
);
-- lz4 (PostgreSQL 14+ built with it) compresses a block's JSON at a fraction of pglz's cost; left
-- as it is where unsupported, or where this role does not own the table.
DO $$ BEGIN
    IF (SELECT attcompression FROM pg_attribute
        WHERE attrelid = '{SCHEMA_NAME}.entries'::regclass AND attname = 'data') IS DISTINCT FROM 'l' THEN
        EXECUTE 'ALTER TABLE {SCHEMA_NAME}.entries ALTER COLUMN data SET COMPRESSION lz4';
    END IF;
EXCEPTION WHEN OTHERS THEN NULL;
END $$;
CREATE INDEX IF NOT EXISTS entries_time ON {SCHEMA_NAME}.entries (time);
CREATE INDEX IF NOT EXISTS entries_user_time ON {SCHEMA_NAME}.entries ("user", time);
CREATE INDEX IF NOT EXISTS entries_rule_time ON {SCHEMA_NAME}.entries (rule, time);
CREATE INDEX IF NOT EXISTS entries_session ON {SCHEMA_NAME}.entries (session, stmt);
CREATE INDEX IF NOT EXISTS entries_fingerprint ON {SCHEMA_NAME}.entries (fingerprint);
CREATE INDEX IF NOT EXISTS touches_object ON {SCHEMA_NAME}.touches (name, col, operation, entry_id);
CREATE INDEX IF NOT EXISTS touches_entry ON {SCHEMA_NAME}.touches (entry_id, name, col, operation, schema);
CREATE OR REPLACE FUNCTION {SCHEMA_NAME}.append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the dbguard audit ledger is append-only: % on %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE OR REPLACE TRIGGER entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {SCHEMA_NAME}.entries
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA_NAME}.append_only();
CREATE OR REPLACE TRIGGER touches_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {SCHEMA_NAME}.touches
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA_NAME}.append_only();
CREATE OR REPLACE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {SCHEMA_NAME}.checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA_NAME}.append_only();
"""


_WRITE = f"""
WITH e AS (
    INSERT INTO {SCHEMA_NAME}.entries (chain, seq, prev, hash, time, kind, "user", session, stmt, outcome, rule,
                                       fingerprint, data)
    SELECT %b, u.* FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                               %b::text[], %b::bigint[], %b::text[], %b::text[], %b::text[], %b::bytea[])
        AS u(seq, prev, hash, time, kind, "user", session, stmt, outcome, rule, fingerprint, data)
    ORDER BY u.seq
    RETURNING id, seq
), t AS (
    INSERT INTO {SCHEMA_NAME}.touches (entry_id, operation, schema, name, col)
    SELECT e.id, u.operation, u.schema, u.name, u.col
    FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[]) AS u(seq, operation, schema, name, col)
    JOIN e ON e.seq = u.seq
), c AS (
    INSERT INTO {SCHEMA_NAME}.checkpoints (chain, seq, hash, signature)
    SELECT %b, u.* FROM unnest(%b::bigint[], %b::text[], %b::bytea[]) AS u(seq, hash, signature)
    ON CONFLICT (chain, seq) DO NOTHING
)
SELECT count(*) FROM e
"""


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class PostgresStore:
    """The ledger tables in a PostgreSQL database; used by the writer thread only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None
        conn = self._connection()
        with conn.transaction():
            conn.execute(SCHEMA)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                log.warning("ledger: reconnecting to the PostgreSQL sink")
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                         application_name="dbguard-ledger")
        return self._conn

    def tail(self, chain: str) -> tuple[int, str, int]:
        conn = self._connection()
        row = conn.execute(f"SELECT seq, hash FROM {SCHEMA_NAME}.entries WHERE chain = %s ORDER BY seq DESC LIMIT 1",
                           (chain,)).fetchone()
        signed = conn.execute(f"SELECT max(seq) FROM {SCHEMA_NAME}.checkpoints WHERE chain = %s", (chain,)).fetchone()
        seq, prev = (row[0], row[1]) if row else (0, ledger.GENESIS)
        return seq, prev, (signed[0] if signed else 0) or 0

    def write(self, chain: str, entries: list[Entry], checkpoints: list[tuple[int, str, bytes]]) -> None:
        """One statement, one round trip: entries, their touches and checkpoints from arrays, sent in
        binary (``%b``): a block's tens of KB of data go as bytes, not hex escaped into an array literal.

        A single statement is atomic in autocommit mode; the entries are inserted in chain order,
        so their ids (storage order, what verify walks) follow the chain.
        """
        cols: list[list[Any]] = [[] for _ in range(12)]
        touch_cols: list[list[Any]] = [[] for _ in range(5)]
        for e in entries:
            for column, value in zip(cols, (e.seq, e.prev, e.hash, *index_fields(e.event), e.data), strict=True):
                column.append(value)
            for t in dict.fromkeys(touches(e.event)):
                for column, value in zip(touch_cols, (e.seq, *t), strict=True):
                    column.append(value)
        cp_cols: list[list[Any]] = [[seq for seq, _, _ in checkpoints], [h for _, h, _ in checkpoints],
                                    [sig for _, _, sig in checkpoints]]
        self._connection().execute(_WRITE, (chain, *cols, *touch_cols, chain, *cp_cols))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresLedger(LedgerWriter):
    """The writer over a PostgreSQL database."""

    def __init__(self, url: str, chain: str, *, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = ledger.SIGN_EVERY) -> None:
        super().__init__(PostgresStore(url), chain, signing_key=signing_key, checkpoint_every=checkpoint_every,
                         name=f"postgresql sink ({chain})")


# -- reading ---------------------------------------------------------------------------------------


class PostgresReader:
    """A read connection that speaks the SQLite placeholders the search code is written with."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10,
                                    options=f"-c search_path={SCHEMA_NAME} -c default_transaction_read_only=on")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]

    def close(self) -> None:
        self.conn.close()


def read_rows(reader: PostgresReader) -> Iterator[ledger.Row]:
    with reader.conn.transaction(), reader.conn.cursor(name="dbguard_verify") as cur:  # a million rows stream
        cur.itersize = 5000
        cur.execute("SELECT chain, seq, prev, hash, data FROM entries ORDER BY id")
        for chain, seq, prev, hash_, data in cur:
            yield ledger.Row(chain=chain, seq=seq, prev=prev, hash=hash_, data=bytes(data))


def read_checkpoints(reader: PostgresReader) -> Iterator[ledger.Checkpoint]:
    for chain, seq, hash_, sig in reader.conn.execute(
            "SELECT chain, seq, hash, signature FROM checkpoints ORDER BY chain, seq"):
        yield ledger.Checkpoint(chain=chain, seq=seq, hash=hash_, signature=bytes(sig))
