"""The ledger writer: one thread per proxy that chains, batches and commits entries to a store.

Entries arrive as the event's JSON bytes. The writer assigns each its place in this proxy's chain,
hashes it and hands a whole batch to the store, which commits it in one transaction: a crash
leaves whole batches or nothing. A durable append returns a future that resolves once its batch is
committed; the proxy waits for it before it forwards a write or answers a refusal. Checkpoints
are signed every ``checkpoint_every`` entries, at least once a second while entries arrive, when
the writer falls idle and at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dbguard.audit import ledger
from dbguard.audit.events import iso_time
from dbguard.metrics import LEDGER_BUCKETS, Buckets

log = logging.getLogger("dbguard.ledger")

BATCH_MAX = 1000
BLOCK_MAX = BATCH_MAX  # reads in one block entry: a batch's reads of one minute are one entry
READ_LINGER = 0.05  # seconds a batch of entries nobody waits for may gather before its commit
RETRY_LIMIT = 100_000  # non-durable entries kept for retry while the store fails


class LedgerUnavailable(Exception):
    """The ledger could not commit: a durable statement must be refused."""


class Entry:
    """One chained entry ready for the store, with its searchable fields extracted."""

    __slots__ = ("data", "event", "hash", "prev", "seq")

    def __init__(self, seq: int, prev: str, hash_: str, data: bytes, event: dict[str, Any]) -> None:
        self.seq, self.prev, self.hash, self.data, self.event = seq, prev, hash_, data, event


class Store(Protocol):
    """Where a chain is kept: SQLite (sqlite_sink) or PostgreSQL (postgres_sink)."""

    def tail(self, chain: str) -> tuple[int, str, int]:
        """(last seq, its hash, last signed seq) of ``chain``; (0, GENESIS, 0) when new."""
        ...

    def write(self, chain: str, entries: list[Entry], checkpoints: list[tuple[int, str, bytes]]) -> None:
        """Commit entries and checkpoints in one transaction, or raise and commit nothing."""
        ...

    def close(self) -> None: ...


def touches(event: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(operation, schema, table, column) for each object a statement touches: the search index."""
    if "block_touches" in event:  # a block of reads: its shapes' touches, worked out already
        yield from event["block_touches"]
        return
    for statement in event.get("statements") or ():
        for action in statement.get("actions") or ():
            for col in action.get("columns") or [""]:
                yield (action.get("operation", ""), action.get("schema", ""), action.get("name", ""), col)


def index_fields(event: dict[str, Any]) -> tuple[str, str, str, str, int, str, str, str]:
    """time, kind, user, session, stmt, outcome, rule, fingerprints: the searchable columns."""
    identity = event.get("identity") or {}
    stmt = event.get("stmt") or (event.get("completion") or {}).get("stmt") or 0
    return (event.get("time", ""), event.get("kind", ""), identity.get("user") or event.get("user", ""),
            event.get("session", ""), int(stmt), event.get("outcome", ""), event.get("rule", ""),
            " ".join(s.get("fingerprint", "") for s in event.get("statements") or ()))


Waiter = concurrent.futures.Future | asyncio.Future


class Built:
    """An entry made ready elsewhere (the writer process builds blocks of reads as they arrive):
    its bytes, its index fields, and how many reads it holds."""

    __slots__ = ("data", "event", "reads")

    def __init__(self, data: bytes, event: dict[str, Any], reads: int) -> None:
        self.data, self.event, self.reads = data, event, reads


def _weight(items: list[tuple[Any, ...]]) -> int:
    """Reads and entries in pending or retried items: a built block counts the reads it holds."""
    return len(items) + sum(item[0].reads - 1 for item in items if type(item[0]) is Built)


def resolve_waiters(futures: list[tuple[Waiter, int | None]], error: BaseException | None) -> None:
    """Settle the waiters of a batch, each with its own entry's sequence number (or all with the
    error): concurrent futures and those of the loop running here at once, other asyncio futures
    on their loop, once per loop."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Waiter, int | None]]] = {}
    here: list[tuple[Waiter, int | None]] = []
    for fut, seq in futures:
        if isinstance(fut, asyncio.Future) and fut.get_loop() is not running:
            by_loop.setdefault(fut.get_loop(), []).append((fut, seq))
        else:
            here.append((fut, seq))
    _settle(here, error)
    for loop, waiting in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, waiting, error)


def _settle(waiting: list[tuple[Waiter, int | None]], error: BaseException | None) -> None:
    for fut, seq in waiting:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(seq)


Read = Any  # a read: its events.Completion, whose ``deferred`` is (decided at, its events.ReadShape)


def _records(pending: list[tuple[bytes | Read, Waiter | None, bool]]) -> Iterator[tuple[bytes, dict[str, Any], int]]:
    """What the chain stores, in order: each entry, except that consecutive reads become block
    entries (see ``Blocks``). The third item is how many pending appends the record holds."""
    blocks: Blocks | None = None
    for data, _, block in pending:
        done: Built | None = None
        if block:
            blocks = blocks or Blocks()
            if type(data) is bytes:  # a read appended whole
                event = orjson.loads(data)
                done = blocks.add_whole(data, event, _micros_of(event))
            else:
                when, shape = data.deferred
                compact = data.compact()
                done = blocks.add(shape, round(when.timestamp() * 1e6),
                                  compact if compact is not None else (orjson.loads(data.json()),))
        elif blocks is not None:
            done, blocks = blocks.flush(), None
        if done is not None:
            yield done.data, done.event, done.reads
        if not block:
            yield (data.data, data.event, 1) if type(data) is Built else (data, orjson.loads(data), 1)
    if blocks is not None and (done := blocks.flush()) is not None:
        yield done.data, done.event, done.reads


def _micros_of(event: dict[str, Any]) -> int:
    """A read appended whole: its time in µs since the epoch (now if it has none, so it cannot
    stall the batch)."""
    try:
        when = datetime.datetime.fromisoformat(event.get("time", "")).astimezone(datetime.UTC)
    except (ValueError, TypeError, AttributeError):
        when = datetime.datetime.now(datetime.UTC)
    return round(when.timestamp() * 1e6)


def shape_touches(shape: Any) -> list[tuple[str, str, str, str]]:
    """A read shape's rows for the search index, worked out once per shape (shapes are reused)."""
    if shape.touches is None:
        shape.touches = list(dict.fromkeys(touches(orjson.loads(b"{" + shape.body + b"}"))))
    return shape.touches


class Blocks:
    """Reads of one minute, at most ``BLOCK_MAX``, as one entry: ``{"kind":"reads","time":..,
    "count":..,"shapes":[..],"reads":[..]}`` (the one place that writes this format: ``_records``
    feeds it as reads leave the in-process writer's queue, and the writer process the batches it
    cannot store packed as they came, see ``packed_block``).

    ``shapes`` holds each distinct ``[{session members},{statement members}]`` once; a read that
    ran and returned one command tag with no error and nothing masked is ``[shape, microseconds
    into the block's minute, stmt, duration in microseconds, tag]``, any other read ``[shape,
    microseconds, {completion}]``, and a read appended whole its whole entry. The block's time is
    its earliest read. A lone read is an ordinary decision entry. ``search.block_reads`` turns a
    block back into its reads, exactly as each read's own decision event would have been.
    ``add`` and ``add_whole`` return the finished block when a read starts the next one.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Any] = []
        self.shapes: dict[Any, int] = {}
        self.touches: dict[tuple[str, str, str, str], None] = {}
        self.minute = -1
        self.first = 0  # the earliest read's µs since the epoch
        self.whole: tuple[bytes, dict[str, Any]] | None = None  # the last read appended whole

    def _next(self, micros: int) -> Built | None:
        minute = micros // 60_000_000
        if minute != self.minute or len(self.rows) >= BLOCK_MAX:
            done = self.flush()
            self.minute, self.first = minute, micros
            return done
        if micros < self.first:
            self.first = micros
        return None

    def add(self, shape: Any, micros: int, tail: tuple[Any, ...]) -> Built | None:
        """A read of ``shape`` decided at ``micros``: ``tail`` is (stmt, duration µs, tag) or ({completion},)."""
        done = self._next(micros)
        index = self.shapes.get(shape)
        if index is None:
            index = self.shapes[shape] = len(self.shapes)
            self.touches.update(dict.fromkeys(shape_touches(shape)))
        self.rows.append((index, micros % 60_000_000, *tail))
        return done

    def add_whole(self, data: bytes, event: dict[str, Any], micros: int) -> Built | None:
        done = self._next(micros)
        self.rows.append(event)
        self.touches.update(dict.fromkeys(touches(event)))
        self.whole = (data, event)
        return done

    def flush(self) -> Built | None:
        rows = self.rows
        if not rows:
            return None
        first = datetime.datetime.fromtimestamp(self.first / 1e6, datetime.UTC)
        if len(rows) == 1:
            if type(rows[0]) is dict:
                data, event = self.whole  # type: ignore[misc]
            else:
                _, _, *tail = rows[0]
                stmt = tail[0] if len(tail) == 3 else tail[0].get("stmt", 0)
                data = next(iter(self.shapes)).line(first, stmt, _completion(tail))
                event = orjson.loads(data)
            done = Built(data, event, 1)
        else:
            done = _block_entry(first, len(rows), self.shapes, b'"reads":' + orjson.dumps(rows), self.touches)
        self._reset()
        return done


def _block_entry(first: datetime.datetime, count: int, shapes: Iterable[Any], reads: bytes,
                 touched: dict[tuple[str, str, str, str], None]) -> Built:
    """A block entry: its time (the earliest read), count, each shape once, and ``reads`` (the
    ``"reads"`` or ``"packed"`` member). Search matches a block on its time and touches only, then
    filters each read: no per-block user or session to index."""
    iso = iso_time(first)
    data = (b'{"kind":"reads","time":"' + iso.encode() + b'","count":%d,"shapes":[' % count
            + b",".join([b"[{" + s.head + b"},{" + s.body + b"}]" for s in shapes]) + b"]," + reads + b"}")
    return Built(data, {"kind": "reads", "time": iso, "outcome": "forwarded", "block_touches": list(touched)}, count)


def packed_block(shapes: list[Any], earliest: float, count: int, records: bytes) -> Built:
    """A batch of ``count`` reads of one minute, decided at ``earliest`` or later, as one entry
    that keeps the proxy's ``audit.read_records`` as they came: ``{"kind":"reads","time":..,
    "count":..,"shapes":[..],"packed":"<base64 records>"}``. The writer process stores a batch
    without touching its reads; ``search.block_reads`` expands them."""
    touched: dict[tuple[str, str, str, str], None] = {}
    for shape in shapes:
        touched.update(dict.fromkeys(shape_touches(shape)))
    return _block_entry(datetime.datetime.fromtimestamp(round(earliest * 1e6) / 1e6, datetime.UTC), count, shapes,
                        b'"packed":"' + base64.b64encode(records) + b'"', touched)


def same_minute(earliest: float, latest: float) -> bool:
    """Whether reads decided between the two times (epoch seconds) can share a block."""
    return round(earliest * 1e6) // 60_000_000 == round(latest * 1e6) // 60_000_000


def _completion(tail: list[Any]) -> bytes:
    """A read's completion as its decision entry holds it (what ``search.block_reads`` rebuilds)."""
    if len(tail) == 1:
        return orjson.dumps(tail[0])
    stmt, duration, tag = tail
    last = tag.rpartition(" ")[2]
    return orjson.dumps({"stmt": stmt, "duration_ms": duration / 1000, "tags": [tag],
                         "rows": int(last) if last.isdigit() else 0, "status": "ok"})


class LedgerWriter:
    """Append-only, hash-chained ledger of one proxy instance, written by one thread."""

    def __init__(self, store: Store, chain: str, *, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = ledger.SIGN_EVERY, name: str = "") -> None:
        self.store = store
        self.name = name or chain
        self.chain = chain
        self._key = signing_key
        self._checkpoint_every = checkpoint_every
        self._seq, self._prev, self._signed_seq = store.tail(chain)
        # Entries wait in a deque (appending is atomic); the writer wakes for a durable entry, for
        # shutdown, or every READ_LINGER: reads never wake it one by one.
        self._items: collections.deque[tuple[bytes, Waiter | None, bool] | Read] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._stopping_attempts = 0  # commits retried at shutdown while the store fails
        self._retry: list[tuple[bytes | Read, bool]] = []
        self._last_signed = 0.0
        self.committed = 0
        # Reads and entries appended, and those committed or given up: ``held()`` is what waits in
        # memory (a block of reads counts its reads). Each counter has one writing thread.
        self.taken = 0
        self.released = 0
        self.commit_latency = Buckets(LEDGER_BUCKETS)
        self.failures = 0
        self.dropped = 0
        self.last_error = ""
        self.last_failed = False
        self._thread = threading.Thread(target=self._run, name="dbguard-ledger", daemon=True)
        self._thread.start()

    # -- producer side (event loop) --------------------------------------------------------------

    def append(self, data: bytes, *, durable: bool = False, block: bool = False) -> Waiter | None:
        """Queue an entry; a durable one returns what resolves once it is committed.

        From an event loop that is an asyncio future, resolved by one wake-up of the loop per
        committed batch (not one cross-thread call per statement); elsewhere a concurrent future.
        """
        future: Waiter | None = None
        if durable:
            try:
                future = asyncio.get_running_loop().create_future()
            except RuntimeError:
                future = concurrent.futures.Future()
        self._items.append((data, future, block))
        self.taken += 1
        if future is not None or len(self._items) >= BATCH_MAX:
            self._wake.set()
        return future

    def append_read(self, completion: Any) -> None:
        """Queue a read (never durable): its finished ``events.Completion``, whose ``deferred`` is
        when it was decided and its session's ``events.ReadShape``. This thread formats it and
        chains reads in blocks that store each shape once: the event loop neither builds nor
        serializes the read's entry, and queues the object itself (no tuple to allocate)."""
        self._items.append(completion)
        self.taken += 1
        if len(self._items) >= BATCH_MAX and not self._wake.is_set():  # set() takes a lock: once per batch
            self._wake.set()

    def append_built(self, entry: Built) -> None:
        """Queue an entry built elsewhere (never durable): chained and stored as it is."""
        self._items.append((entry, None, False))
        self.taken += entry.reads
        if len(self._items) >= BATCH_MAX and not self._wake.is_set():
            self._wake.set()

    def queued(self) -> int:
        """Entries not yet committed: the ledger's lag."""
        return len(self._items) + len(self._retry)

    def held(self) -> int:
        """Reads and entries appended and neither committed nor given up (a commit's too)."""
        return self.taken - self.released

    def close(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # still committing: closing the store under it would lose the batch
            log.error("ledger %s: the writer did not finish within %.0f s; %d entries not yet committed",
                      self.name, timeout, self.queued())
            return
        self.store.close()

    # -- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            self._wake.wait(READ_LINGER)
            self._wake.clear()
            stop = self._stopping
            items = self._items
            while items or self._retry:  # group commit: everything that queued up, in batches
                batch = [items.popleft() for _ in range(min(len(items), BATCH_MAX))]
                batch = [x if type(x) is tuple else (x, None, True) for x in batch]  # a read (append_read)
                self._commit(batch)
                idle_since = time.monotonic()
                if self.last_failed:
                    break  # retried at the next wake-up
                if not (stop or self._wake.is_set() or len(items) >= BATCH_MAX):
                    # What queued up during the commit is reads: they wait for the next durable entry
                    # or READ_LINGER, so a batch is ~READ_LINGER of reads, not a commit's worth.
                    break
                self._wake.clear()  # a durable entry is among them: commit it now
            if stop and not items:
                if self._retry:
                    self._stopping_attempts += 1
                    if self._stopping_attempts < 3:
                        continue  # the store may be back in a moment: try again before giving up
                    self.dropped += _weight(self._retry)
                    self.released += _weight(self._retry)
                    log.error("ledger %s: shutting down with the store failing; %d non-durable entries "
                              "were not recorded", self.name, len(self._retry))
                break
            if time.monotonic() - idle_since >= 1.0:
                self._sign_tail()  # idle: sign what the last burst left unsigned
                idle_since = time.monotonic()
        self._sign_tail()  # a clean shutdown leaves the whole chain signed

    def _sign_tail(self) -> None:
        if self._key is None or self._signed_seq >= self._seq:
            return
        sig = ledger.sign_checkpoint(self._key, self.chain, self._seq, self._prev)
        try:
            self.store.write(self.chain, [], [(self._seq, self._prev, sig)])
        except Exception as exc:  # noqa: BLE001 - retried at the next idle second
            log.error("ledger %s: writing a checkpoint failed: %s", self.name, exc)
            return
        self._signed_seq = self._seq
        self._last_signed = time.monotonic()

    def _commit(self, batch: list[tuple[bytes | Read, Waiter | None, bool]]) -> None:
        pending = [(data, None, block) for data, block in self._retry] + batch
        seq, prev = self._seq, self._prev
        entries: list[Entry] = []
        checkpoints: list[tuple[int, str, bytes]] = []
        item_seqs: list[int] = []  # the entry each pending append landed in
        try:
            for data, event, count in _records(pending):
                seq += 1
                item_seqs.extend([seq] * count)
                h = ledger.entry_hash(prev, seq, self.chain, data)
                entries.append(Entry(seq, prev, h, data, event))
                if self._key is not None and seq % self._checkpoint_every == 0:
                    checkpoints.append((seq, h, ledger.sign_checkpoint(self._key, self.chain, seq, h)))
                prev = h
            now = time.monotonic()
            if (self._key is not None and entries and now - self._last_signed >= 1.0
                    and (not checkpoints or checkpoints[-1][0] != seq)):
                # at most a second of entries is ever unsigned while traffic flows
                checkpoints.append((seq, prev, ledger.sign_checkpoint(self._key, self.chain, seq, prev)))
                self._last_signed = now
            started = time.monotonic()
            self.store.write(self.chain, entries, checkpoints)
            self.commit_latency.observe(time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - disk full, locked, server gone: refuse what must be durable
            if entries and self._landed(seq, prev):
                log.warning("ledger %s: the commit reported %s but landed; continuing", self.name, exc)
                self._succeeded(pending, seq, prev, checkpoints, item_seqs)
                return
            self.failures += 1
            self.last_failed = True
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("ledger %s: commit of %d entries failed: %s", self.name, len(pending), self.last_error)
            keep = [(data, block) for data, fut, block in pending if fut is None]
            if len(keep) > RETRY_LIMIT:
                given_up = _weight(keep[:-RETRY_LIMIT])  # (a block counts its reads)
                self.dropped += given_up
                log.error("ledger: %d non-durable reads and entries dropped after repeated failures", given_up)
                keep = keep[-RETRY_LIMIT:]
            self.released += _weight(pending) - _weight(keep)  # the refused durable ones, the dropped
            self._retry = keep
            resolve_waiters([(fut, None) for _, fut, _ in pending if fut is not None], LedgerUnavailable(self.last_error))
            # A commit whose answer was lost may have landed: continue from what is stored. If the
            # store is still down, the next commit retries.
            with contextlib.suppress(Exception):
                self._seq, self._prev, self._signed_seq = self.store.tail(self.chain)
            time.sleep(0.05)
            return
        self._succeeded(pending, seq, prev, checkpoints, item_seqs)

    def _landed(self, seq: int, prev: str) -> bool:
        """After an error: did the batch commit anyway (a connection lost during COMMIT)?"""
        try:
            return self.store.tail(self.chain)[:2] == (seq, prev)
        except Exception:  # noqa: BLE001 - the store is down: it did not land as far as we can know
            return False

    def _succeeded(self, pending: list[tuple[bytes | Read, Waiter | None, bool]], seq: int, prev: str,
                   checkpoints: list[tuple[int, str, bytes]], item_seqs: list[int]) -> None:
        self._seq, self._prev = seq, prev
        self.last_failed = False
        if checkpoints:
            self._signed_seq = checkpoints[-1][0]
        self._retry = []
        done = _weight(pending)
        self.committed += done
        self.released += done
        resolve_waiters([(fut, item_seq) for (_, fut, _), item_seq in zip(pending, item_seqs, strict=True)
                  if fut is not None], None)
