"""Row-level evidence: which rows a write changed, with the old and new values of watched columns.

The proxy puts a transactional marker (``pg_logical_emit_message(true, 'dbguard', ...)`` naming its
ledger chain, the session and the statement number) into the client's own transaction just before
every write it forwards (dbguard.session.rowmarks). Logical decoding (the built-in ``pgoutput``
plugin, a publication of the watched tables, one replication slot per proxy) returns committed
transactions in commit order with the markers in place, so every decoded change belongs to the
statement whose marker precedes it. The client's SQL and what the client receives are unchanged.

This module streams the slot, joins changes to statements and appends ``rows`` entries to the
ledger; the slot is confirmed only once the entries are committed (at least once: a crash between
the two records a transaction again, never loses one). Needs ``wal_level=logical``; see
docs/ledger.md "Row-level evidence".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import psycopg
from psycopg import sql

from dbguard.audit import pgoutput
from dbguard.audit.events import EventKind, EventSink
from dbguard.audit.writer import LedgerUnavailable
from dbguard.config import UpstreamSettings
from dbguard.errors import ConfigError
from dbguard.pgwire.messages import decode_error_fields, encode_query
from dbguard.session import upstream

_I32 = struct.Struct("!i")

log = logging.getLogger("dbguard.audit.rows")

MARKER_PREFIX = "dbguard"
MAX_CHANGES_PER_STATEMENT = 1000  # rows recorded per statement; the entry counts them all
MAX_VALUE = 1024  # characters of one value kept; longer ones keep their start, length and digest

# Masks of the ledger's copy of values: (schema, table, column) -> masked text for a clear text value.
ValueMask = Callable[[str, str, str], Callable[[str], str] | None]


def marker_key(upstream_password: str) -> bytes:
    """The key that authenticates markers: from the credentials only the proxies hold (the same on every
    proxy of one database, so a shared slot verifies them all); a client that forges a marker with
    its own ``pg_logical_emit_message`` call cannot produce it."""
    return hashlib.sha256(b"dbguard row marker\x00" + upstream_password.encode()).digest()


def _mac(key: bytes, chain: str, session: str, stmt: int) -> str:
    return hmac.new(key, f"{chain}\x00{session}\x00{stmt}".encode(), hashlib.sha256).hexdigest()[:32]


def marker_content(chain: str, session: str, stmt: int, key: bytes) -> bytes:
    return orjson.dumps({"chain": chain, "session": session, "stmt": stmt, "mac": _mac(key, chain, session, stmt)})


def default_slot(chain: str) -> str:
    """A replication slot name for a ledger chain: [a-z0-9_], at most 63 characters."""
    return "dbguard_" + hashlib.sha256(chain.encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True, slots=True)
class Watched:
    """One watched table, resolved against the catalog."""

    schema: str
    name: str
    columns: frozenset[str] | None  # None: every column
    keys: tuple[str, ...]  # primary key columns: how a changed row is named
    full_identity: bool  # REPLICA IDENTITY FULL: old values of UPDATE and DELETE are decoded

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def parse_watch_list(refs: Iterable[str]) -> dict[tuple[str, str], frozenset[str] | None]:
    """``schema.table.column`` / ``schema.table.*`` references -> {(schema, table): columns or None}."""
    out: dict[tuple[str, str], frozenset[str] | None] = {}
    for ref in refs:
        parts = [p[1:-1] if p.startswith('"') else p for p in _split_ident(ref)]
        if len(parts) != 3:
            raise ConfigError(f"audit.rows: {ref!r} is not schema.table.column")
        key = (parts[0], parts[1])
        if parts[2] == "*" or out.get(key, frozenset()) is None:
            out[key] = None
        else:
            out[key] = (out.get(key) or frozenset()) | {parts[2]}
    return out


def _split_ident(ref: str) -> list[str]:
    parts, cur, quoted = [], "", False
    for ch in ref:
        if ch == '"':
            quoted = not quoted
        if ch == "." and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


class Attributor:
    """Sans-IO: turns decoded pgoutput messages into ledger ``rows`` entries (one per statement)."""

    def __init__(self, chain: str, watched: dict[tuple[str, str], Watched], mask: ValueMask | None = None,
                 *, all_chains: bool = False, key: bytes = b"") -> None:
        self.chain = chain
        self._key = key
        self.forged = 0  # markers whose MAC does not verify: not written by a dbguard proxy
        self.all_chains = all_chains  # a slot shared by several proxies: record every proxy's statements
        self.watched = watched
        self._mask = mask
        self._relations: dict[int, pgoutput.Relation] = {}
        self._begin: pgoutput.Begin | None = None
        self._segments: list[dict[str, Any]] = []  # this transaction's statements, in order
        self._current: dict[str, Any] | None = None
        self.foreign = 0  # changes after another proxy's marker: that proxy records them

    def feed(self, msg: pgoutput.Decoded) -> list[dict[str, Any]]:
        """One decoded message; returns the entries a Commit completes."""
        if isinstance(msg, pgoutput.Relation):
            self._relations[msg.oid] = msg
        elif isinstance(msg, pgoutput.Begin):
            self._begin, self._segments, self._current = msg, [], None
        elif isinstance(msg, pgoutput.Message):
            if msg.transactional and msg.prefix == MARKER_PREFIX:
                self._current = self._segment_for(msg.content)
        elif isinstance(msg, pgoutput.Change):
            self._change(msg)
        elif isinstance(msg, pgoutput.Truncate):
            for oid in msg.relation_oids:
                rel = self._relations.get(oid)
                if rel is not None and (rel.schema, rel.name) in self.watched:
                    self._add({"table": f"{rel.schema}.{rel.name}", "op": "TRUNCATE"})
        elif isinstance(msg, pgoutput.Commit):
            return self._commit(msg)
        return []

    def _segment_for(self, content: bytes) -> dict[str, Any] | None:
        try:
            marker = orjson.loads(content)
            chain, session, stmt = str(marker["chain"]), str(marker["session"]), int(marker["stmt"])
            genuine = hmac.compare_digest(str(marker.get("mac", "")), _mac(self._key, chain, session, stmt))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            genuine, marker = False, {"unparsed": content[:200].decode("utf-8", "replace")}
        if not genuine:
            # A client's own pg_logical_emit_message(true, 'dbguard', ...) claiming to be a statement:
            # what follows is recorded unattributed, with the claim, as evidence of the attempt.
            self.forged += 1
            log.warning("row evidence: a marker that no dbguard proxy wrote: %r", content[:200])
            segment = {"chain": "", "session": "", "stmt": 0, "changes": [], "count": 0, "forged": marker}
            self._segments.append(segment)
            return segment
        segment = {"chain": chain, "session": session, "stmt": stmt, "changes": [], "count": 0}
        self._segments.append(segment)
        return segment

    def _add(self, change: dict[str, Any]) -> None:
        segment = self._current
        if segment is None:  # changes before any marker: not made by a statement through dbguard
            segment = {"chain": "", "session": "", "stmt": 0, "changes": [], "count": 0}
            self._segments.append(segment)
            self._current = segment
        segment["count"] += 1
        if len(segment["changes"]) < MAX_CHANGES_PER_STATEMENT:
            segment["changes"].append(change)

    def _change(self, msg: pgoutput.Change) -> None:
        rel = self._relations.get(msg.relation_oid)
        if rel is None:
            raise pgoutput.DecodeError(f"a change of relation {msg.relation_oid} before its description")
        watch = self.watched.get((rel.schema, rel.name))
        if watch is None:
            return  # in the publication but no longer watched
        names = [c.name for c in rel.columns]
        new = dict(zip(names, msg.new, strict=True)) if msg.new is not None else None
        old = dict(zip(names, msg.old, strict=True)) if msg.old is not None else None
        if msg.old_is_key_only and old is not None:
            keyed = {c.name for c in rel.columns if c.key}
            old = {k: v for k, v in old.items() if k in keyed}
        cols = watch.columns if watch.columns is not None else frozenset(names)
        if msg.op == "UPDATE" and old is not None and new is not None and not msg.old_is_key_only and not any(
                old.get(c) != new.get(c) and new.get(c) is not pgoutput.UNCHANGED for c in cols):
            return  # the row changed, but none of the watched columns did
        row = old if msg.op == "DELETE" else new
        assert row is not None
        key_source = old if old is not None else row
        keys = watch.keys or tuple(c.name for c in rel.columns if c.key)
        change: dict[str, Any] = {"table": watch.qualified, "op": msg.op,
                                  "key": {k: self._value(watch, k, key_source.get(k)) for k in keys}}
        if old is not None and not msg.old_is_key_only:
            change["old"] = {c: self._value(watch, c, old.get(c)) for c in names if c in cols}
        elif msg.op == "UPDATE":
            change["old"] = None  # not decoded: the table's REPLICA IDENTITY is not FULL
        if new is not None:
            change["new"] = {c: self._value(watch, c, new.get(c)) for c in names if c in cols}
        self._add(change)

    def _value(self, watch: Watched, column: str, value: object) -> object:
        if value is None:
            return None
        if value is pgoutput.UNCHANGED:
            return {"unchanged": True}  # a TOASTed value the UPDATE did not touch: not sent by the server
        mask = self._mask(watch.schema, watch.name, column) if self._mask is not None else None
        text = mask(str(value)) if mask is not None else str(value)
        if text is not None and len(text) > MAX_VALUE:
            digest = hashlib.sha256(text.encode()).hexdigest()[:32]
            return {"start": text[:MAX_VALUE], "length": len(text), "sha256": digest}
        return text

    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    def _commit(self, msg: pgoutput.Commit) -> list[dict[str, Any]]:
        begin, segments = self._begin, self._segments
        self._begin, self._segments, self._current = None, [], None
        if begin is None:
            raise pgoutput.DecodeError("a commit without its begin")
        out = []
        for seg in segments:
            if not seg["count"]:
                continue  # a write that changed no watched row
            if seg["chain"] and seg["chain"] != self.chain and not self.all_chains:
                self.foreign += seg["count"]
                continue
            entry: dict[str, Any] = {
                "xid": begin.xid, "commit_lsn": pgoutput.lsn_text(msg.commit_lsn),
                "committed": msg.commit_time.isoformat(timespec="microseconds"),
                "count": seg["count"], "changes": seg["changes"],
            }
            if seg["count"] > len(seg["changes"]):
                entry["truncated"] = True
            if seg["chain"]:
                entry.update(session=seg["session"], stmt=seg["stmt"])
                if seg["chain"] != self.chain:
                    entry["chain"] = seg["chain"]  # the proxy that ran the statement (a shared slot)
            else:
                entry["attributed"] = False  # no dbguard marker before it: not a statement of this proxy
                if "forged" in seg:
                    entry["forged_marker"] = seg["forged"]
            out.append(entry)
        return out


_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: the replication protocol's clock
_XLOG = struct.Struct("!QQQ")  # XLogData: start, end of WAL on the server, send time
_KEEPALIVE = struct.Struct("!QQB")  # walEnd, send time, reply requested
_FEEDBACK = struct.Struct("!cQQQqB")  # 'r', written, flushed, applied, client time, reply requested
MAX_BUFFERED = 64 * 1024 * 1024  # stream bytes held before the server is asked to wait (backpressure)
BATCH_MAX = 1000  # rows entries recorded (and confirmed to the server) at once
FEEDBACK_EVERY = 10.0  # seconds; the server drops a silent stream after wal_sender_timeout (60 s)


class _Frames:
    """The replication connection's messages, framed from the stream (CopyData may be large)."""

    def __init__(self, conn: upstream.UpstreamConnection) -> None:
        self._conn = conn
        self._buf = bytearray(conn.protocol.reader.take_rest())
        self._arrived = asyncio.Event()
        self._paused = False
        self._woken = False
        self.closed = False
        conn.protocol.on_data = self._data
        conn.protocol.on_lost = self._lost

    def _data(self, data: bytes) -> None:
        self._buf += data
        self._arrived.set()
        if len(self._buf) > MAX_BUFFERED and not self._paused:
            self._paused = True
            self._conn.transport.pause_reading()

    def _lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._arrived.set()

    async def next(self, timeout: float | None) -> tuple[int, bytes] | None:
        """The next message, or None after ``timeout`` seconds without one."""
        while True:
            buf = self._buf
            if len(buf) >= 5:
                (length,) = _I32.unpack_from(buf, 1)
                if len(buf) >= length + 1:
                    msg = (buf[0], bytes(buf[5:length + 1]))
                    del buf[:length + 1]
                    if self._paused and len(buf) < MAX_BUFFERED // 2:
                        self._paused = False
                        self._conn.transport.resume_reading()
                    return msg
            if self.closed:
                raise ConnectionError("the server closed the replication connection")
            if self._paused:  # the next message alone is larger than the buffer limit: read on until it is whole
                self._paused = False
                self._conn.transport.resume_reading()
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return None
            if self._woken:
                self._woken = False
                return None

    def wake(self) -> None:
        """Make a waiting ``next`` return None now."""
        self._woken = True
        self._arrived.set()

    def send(self, data: bytes) -> None:
        self._conn.transport.write(data)

    def close(self) -> None:
        self._conn.transport.close()


class RowEvidence:
    """Streams this proxy's replication slot and appends ``rows`` entries to its ledger.

    One long-lived logical replication connection (``START_REPLICATION``): changes arrive as the
    server commits them, without polling (which would decode the WAL again and log every call).
    The slot is confirmed (standby status update) only up to what the ledger has committed.
    """

    def __init__(self, settings: UpstreamSettings, *, chain: str, watch: Iterable[str], events: EventSink,
                 slot: str = "", publication: str = "dbguard_rows", interval: float = 0.2,
                 mask: ValueMask | None = None, shared: bool = False, key: bytes = b"") -> None:
        self._upstream = settings
        self.chain = chain
        self.slot = slot or default_slot(chain)
        self.publication = publication
        self.interval = interval  # decoded entries wait at most this long to be recorded together
        self.events = events
        self._mask = mask
        self._watch = parse_watch_list(watch)
        # A slot several proxies name: whichever streams it records every proxy's statements; the
        # others stand by (PostgreSQL lets one connection stream a slot) and take over when it stops.
        self.shared = shared
        self.key = key  # authenticates markers (marker_key)
        self.attributor: Attributor | None = None
        self._watched: dict[tuple[str, str], Watched] = {}
        self._task: asyncio.Task | None = None
        self._frames: _Frames | None = None
        self._stop_at = 0  # stopping: record up to this WAL position, then end
        self._seen_end = 0  # the furthest WAL position the server said it sent
        self._flushed = 0  # transactions ending at or before this are in the ledger
        self.recorded = 0
        self.forged = 0  # markers no proxy wrote, in earlier streams (see ``forged_markers``)
        self.gaps = 0  # times the slot had to be created again: what changed meanwhile is not recorded
        self.streaming = False
        self.last_error = ""

    @property
    def forged_markers(self) -> int:
        return self.forged + (self.attributor.forged if self.attributor is not None else 0)

    async def _connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(**self._upstream.conninfo("dbguard-row-evidence"),
                                                     autocommit=True)

    async def setup(self) -> None:
        """Check the server, resolve the watched tables, create the publication and the slot if missing.

        Raises ConfigError naming what is missing and the SQL a DBA would run.
        """
        try:
            async with await self._connect() as conn:
                level = (await (await conn.execute("SHOW wal_level")).fetchone())[0]
                if level != "logical":
                    raise ConfigError(
                        f"--row-evidence needs wal_level=logical on the governed server (it is {level}): "
                        "ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL")
                self._watched = await self._resolve(conn)
                if not self._watched:
                    log.warning("row evidence: none of the audit.rows tables is in database %s; nothing to watch",
                                self._upstream.database)
                    return
                await self._ensure_publication(conn, self._watched)
                await self._ensure_slot(conn)
        except psycopg.Error as exc:
            raise ConfigError(f"--row-evidence: {exc.diag.message_primary or exc}") from exc
        for w in self._watched.values():
            if not w.full_identity:
                log.warning("row evidence: %s has REPLICA IDENTITY %s; old values of UPDATE are not recorded "
                            "(ALTER TABLE %s REPLICA IDENTITY FULL records them)", w.qualified,
                            "DEFAULT" if w.keys else "NOTHING", w.qualified)
        log.info("row evidence on %s via slot %s, publication %s",
                 ", ".join(sorted(w.qualified for w in self._watched.values())), self.slot, self.publication)
    async def _resolve(self, conn: psycopg.AsyncConnection) -> dict[tuple[str, str], Watched]:
        watched: dict[tuple[str, str], Watched] = {}
        for (schema, name), columns in self._watch.items():
            row = await (await conn.execute(
                "SELECT c.oid, c.relreplident, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s", (schema, name))).fetchone()
            if row is None or row[2] not in ("r", "p"):
                # Policies may serve several databases: a table this one lacks is not an error.
                log.warning("row evidence: no table %s.%s in database %s; its audit.rows entries are skipped",
                            schema, name, self._upstream.database)
                continue
            oid, identity = row[0], row[1]
            cols = {r[0] for r in await (await conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                (oid,))).fetchall()}
            unknown = sorted((columns or frozenset()) - cols)
            if unknown:
                raise ConfigError(f"audit.rows: {schema}.{name} has no column(s) {', '.join(unknown)}")
            keys = tuple(r[0] for r in await (await conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary "
                "ORDER BY array_position(i.indkey::int2[], a.attnum)", (oid,))).fetchall())
            watched[(schema, name)] = Watched(schema=schema, name=name, columns=columns, keys=keys,
                                              full_identity=identity == "f")
        return watched

    async def _ensure_publication(self, conn: psycopg.AsyncConnection, watched: dict[tuple[str, str], Watched]) -> None:
        tables = [sql.Identifier(s, n) for s, n in sorted(watched)]
        have = await (await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                         (self.publication,))).fetchone()
        if have is None:
            stmt = sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate')"
                           ).format(sql.Identifier(self.publication), sql.SQL(", ").join(tables))
        else:
            present = {(r[0], r[1]) for r in await (await conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,))).fetchall()}
            missing = [sql.Identifier(s, n) for s, n in sorted(watched) if (s, n) not in present]
            if not missing:
                return
            stmt = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(self.publication), sql.SQL(", ").join(missing))
        try:
            await conn.execute(stmt)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(f"--row-evidence: cannot create or extend publication {self.publication} "
                              f"({exc.diag.message_primary}); as the tables' owner run: {stmt.as_string(conn)}"
                              ) from exc

    async def _ensure_slot(self, conn: psycopg.AsyncConnection) -> None:
        row = await (await conn.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s",
                                        (self.slot,))).fetchone()
        if row is not None:
            if row[0] != "pgoutput":
                raise ConfigError(f"--row-evidence-slot {self.slot}: the slot uses {row[0]}, not pgoutput")
            return
        try:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(f"--row-evidence: cannot create replication slot {self.slot} "
                              f"({exc.diag.message_primary}): the role needs the REPLICATION attribute") from exc

    def _feedback(self, frames: _Frames, *, reply: bool = False) -> None:
        now = int(time.time() * 1_000_000) - _PG_EPOCH_US
        lsn = self._flushed
        frames.send(b"d" + _I32.pack(4 + _FEEDBACK.size) + _FEEDBACK.pack(b"r", lsn, lsn, lsn, now, int(reply)))

    async def _record(self, entries: list[dict[str, Any]], end: int, frames: _Frames) -> None:
        waits = [self.events.emit(EventKind.ROWS, e, durable=True) for e in entries]
        for w in waits:
            if w is not None:
                await w  # raises when the ledger cannot commit: the slot keeps the changes for the next stream
        self.recorded += len(entries)
        self._flushed = max(self._flushed, end)
        self._feedback(frames)

    async def _stream(self) -> None:
        """One replication connection, until it fails or the proxy stops."""
        conn = await upstream.connect(self._upstream, {"replication": "database",
                                                       "application_name": "dbguard-row-evidence"})
        frames = self._frames = _Frames(conn)
        try:
            frames.send(encode_query(
                f"START_REPLICATION SLOT {_ident(self.slot)} LOGICAL 0/0 (proto_version '1', "
                f"publication_names '{_ident(self.publication)}', messages 'true')"))
            first = await frames.next(self._upstream.connect_timeout)
            if first is None or first[0] != 0x57:  # 'W' CopyBothResponse
                fields = decode_error_fields(first[1]) if first is not None and first[0] == 0x45 else {}
                raise ConnectionError(f"START_REPLICATION failed: {fields.get('M', first)}")
            self.forged = self.forged_markers
            self.attributor = Attributor(self.chain, self._watched, self._mask, all_chains=self.shared, key=self.key)
            self.streaming = True
            if self.last_error:
                log.info("row evidence: streaming slot %s", self.slot)
                self.last_error = ""
            batch: list[dict[str, Any]] = []
            batch_end = 0
            skipping = False
            since = 0.0
            last_feedback = time.monotonic()
            while True:
                wait = FEEDBACK_EVERY if not batch_end else max(0.0, since + self.interval - time.monotonic())
                msg = await frames.next(min(wait, 0.1) if self._stop_at else wait)
                if msg is not None:
                    kind, payload = msg
                    if kind == 0x45:  # 'E'
                        raise ConnectionError(f"replication stream: {decode_error_fields(payload).get('M', '')}")
                    if kind == 0x63:  # 'c' CopyDone
                        raise ConnectionError("the server ended the replication stream")
                    if kind == 0x64 and payload[:1] == b"w":  # XLogData
                        _start, end, _sent = _XLOG.unpack_from(payload, 1)
                        self._seen_end = max(self._seen_end, end)
                        decoded = pgoutput.decode(payload[1 + _XLOG.size:])
                        if isinstance(decoded, pgoutput.Begin):
                            # Sent again after a reconnect (the server may not have kept our last
                            # confirmation across its restart): recorded already, skip it.
                            skipping = decoded.final_lsn < self._flushed
                        if skipping and not isinstance(decoded, pgoutput.Relation):
                            if isinstance(decoded, pgoutput.Commit):
                                skipping = False
                            continue
                        done = self.attributor.feed(decoded)
                        if isinstance(decoded, pgoutput.Commit):
                            batch += done
                            batch_end = decoded.end_lsn
                            since = since or time.monotonic()
                    elif kind == 0x64 and payload[:1] == b"k":  # primary keepalive
                        wal_end, _sent, reply = _KEEPALIVE.unpack_from(payload, 1)
                        self._seen_end = max(self._seen_end, wal_end)
                        if not batch_end and not self.attributor.in_transaction:
                            # Everything sent so far is recorded: confirm it (as pg_recvlogical does), or
                            # a shutting-down server waits for us forever.
                            self._flushed = max(self._flushed, wal_end)
                        if reply:
                            self._feedback(frames)
                now = time.monotonic()
                if batch_end and (self._stop_at or len(batch) >= BATCH_MAX or now - since >= self.interval):
                    await self._record(batch, batch_end, frames)
                    batch, batch_end, since = [], 0, 0.0
                    last_feedback = now
                if self._stop_at:
                    if self._seen_end >= self._stop_at and not batch_end:
                        return
                    self._feedback(frames, reply=True)  # the server answers with how far it has sent
                elif now - last_feedback >= FEEDBACK_EVERY:
                    self._feedback(frames)
                    last_feedback = now
        finally:
            self.streaming = False
            frames.close()

    async def _recreate_slot(self, why: str) -> None:
        """The slot is gone (dropped by someone): create it again and record the gap, loudly."""
        async with await self._connect() as conn:
            await self._ensure_slot(conn)
        self.gaps += 1
        log.error("row evidence: replication slot %s was gone (%s); created again: changes made meanwhile are not "
                  "recorded", self.slot, why)
        wait = self.events.emit(EventKind.ROWS, {"gap": True, "slot": self.slot, "reason": why}, durable=True)
        if wait is not None:
            await wait

    async def run(self) -> None:
        """Stream until stopped; reconnects after errors (the slot keeps what was not recorded)."""
        while True:
            try:
                await self._stream()
                return  # stopped
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, retried: evidence waits in the slot meanwhile
                standby = self.shared and "is active for PID" in str(exc)  # another proxy streams it
                if self._stop_at:
                    if not standby:
                        log.error("row evidence: %s; what was not recorded waits in slot %s", exc, self.slot)
                    return
                if f'replication slot "{self.slot}" does not exist' in str(exc):
                    # Dropped under the proxy: nothing would ever be recorded again. What was committed
                    # between the drop and now is lost with the slot (the gap is recorded); from here on
                    # everything is.
                    try:
                        await self._recreate_slot(str(exc))
                        self.last_error = ""
                        continue
                    except (psycopg.Error, OSError, ConfigError, LedgerUnavailable) as again:
                        exc = again
                if str(exc) != self.last_error:
                    if standby:
                        log.info("row evidence: slot %s is streamed by another proxy; standing by", self.slot)
                    else:
                        log.error("row evidence: %s (retrying; the slot keeps the changes)", exc)
                self.last_error = str(exc)
            await asyncio.sleep(1.0)

    @property
    def active(self) -> bool:
        """Whether there is anything to watch (after ``setup``): sessions mark writes only then."""
        return bool(self._watched)

    def start(self) -> None:
        if self.active:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def _insert_lsn(self) -> str:
        async with await self._connect() as conn:
            return (await (await conn.execute("SELECT pg_current_wal_insert_lsn()::text")).fetchone())[0]

    async def stop(self, timeout: float = 5.0) -> None:
        """Record what the server has committed up to now, then end the stream."""
        if self._task is None:
            return
        try:
            self._stop_at = pgoutput.parse_lsn(await asyncio.wait_for(self._insert_lsn(), timeout / 2))
            if self._frames is not None:
                self._frames.wake()
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("row evidence: stopped before recording everything (%s; at %s of %s); the rest waits in "
                        "slot %s", exc or type(exc).__name__, pgoutput.lsn_text(self._seen_end),
                        pgoutput.lsn_text(self._stop_at), self.slot)
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _ident(name: str) -> str:
    """A slot or publication name in replication commands: only [a-z0-9_] is accepted."""
    if not name or any(not (c.isascii() and (c.isalnum() or c == "_")) for c in name) or name.lower() != name:
        raise ConfigError(f"row evidence: {name!r} is not a valid slot or publication name ([a-z0-9_])")
    return name
