"""Structured decision events as JSON lines: the feed the audit ledger persists.

One event per connection, decision and refusal. The sink buffers lines and flushes them on a
short timer (and at shutdown) so emitting costs a few microseconds on the statement path.
"""

from __future__ import annotations

import collections
import datetime
import enum
import itertools
import sys
from typing import IO, TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from dbguard.audit.writer import Waiter


class EventKind(str, enum.Enum):
    CONNECTION = "connection"  # a client authenticated (or failed to)
    DECISION = "decision"  # a statement was decided (allow, deny, warn, dryrun, require-approval)
    REFUSAL = "refusal"  # dbguard refused something before any policy (parse error, protocol, unsafe setting)
    DISCONNECT = "disconnect"
    COMPLETION = "completion"  # what became of a forwarded write: rows affected, duration, error
    POLICY = "policy"  # a policy revision came into force, or a changed policy failed to load
    APPROVAL = "approval"  # an approval request was created, or an approved statement is about to run
    ROWS = "rows"  # row-level evidence: the rows a statement changed in watched columns (audit.row_evidence)

    def __str__(self) -> str:
        return self.value


_second_cache: tuple[int, str] = (0, "")
_shape_numbers = itertools.count(1)
# Numbers of shapes a ledger writer process was told about and that no read will name again: the
# ledger process drains this and tells its writer to forget them (audit.ledger_process).
RELEASED_SHAPES: collections.deque[int] = collections.deque()


class ReadShape:
    """What every read of one statement shape in one session has in common, serialized once.

    ``head`` is the session's members (session, identity, database, client_addr) and ``body`` the
    statement's (protocol, statement, statements, decisions, outcome...), both ``"key":value``
    bytes without braces. A read's entry is ``time``, ``kind``, ``head``, its ``stmt``, ``body``
    and its ``completion``: the session keeps one ReadShape per shape, so a repeated read costs
    the ledger a reference, and a block of reads stores each shape once (see audit.writer). The
    ledger's writer process learns a shape once, by its ``wire`` number (audit.ledger_process).
    """

    __slots__ = ("batch", "body", "head", "index", "sent", "touches", "wire")

    def __init__(self, head: bytes, body: bytes, wire: int = 0) -> None:
        self.head = head
        self.body = body
        self.touches: list[tuple[str, str, str, str]] | None = None  # the search index's rows, made by the writer
        self.wire = wire or next(_shape_numbers)  # its number between the proxy and the writer process
        self.sent = 0  # the writer process (its generation) that knows this shape; 0: none
        self.batch = 0  # the batch of reads that last named it, and its index in that batch's shapes
        self.index = 0

    def __del__(self) -> None:
        if self.sent:
            RELEASED_SHAPES.append(self.wire)

    def line(self, now: datetime.datetime, stmt: int, completion: bytes) -> bytes:
        """The read's entry as one JSON object: the same bytes a decision event has."""
        return (b'{"time":"' + iso_time(now).encode() + b'","kind":"decision",' + self.head
                + b',"stmt":%d,' % stmt + self.body + b',"completion":' + completion + b"}")


class Completion(Protocol):
    """What became of a read (session.completions.Pending): its statement number, its decision's
    ``deferred`` (when it was decided, its ReadShape) and its JSON."""

    stmt: int
    deferred: tuple[datetime.datetime, ReadShape] | None

    def json(self) -> bytes: ...

    def compact(self) -> tuple[int, int, str] | None:
        """(stmt, duration in microseconds, tag) when that says everything (one tag, ok), else None."""
        ...


class Done:
    """A completion known in advance (a read bound but never executed)."""

    __slots__ = ("_json", "deferred", "stmt")

    def __init__(self, stmt: int, json: bytes, deferred: tuple[datetime.datetime, ReadShape]) -> None:
        self.stmt, self._json, self.deferred = stmt, json, deferred

    def json(self) -> bytes:
        return self._json

    def compact(self) -> None:
        return None


def iso_time(now: datetime.datetime) -> str:
    """ISO 8601 UTC with microseconds; the seconds part is formatted once per second.

    The event loop and the ledger's writer thread both call it: the cache is read once, so a
    thread switch between the check and the use cannot pair one second's text with another's.
    """
    global _second_cache
    ts = int(now.timestamp())
    cache = _second_cache
    if cache[0] != ts:
        cache = _second_cache = (ts, now.replace(microsecond=0).isoformat()[:19])
    return f"{cache[1]}.{now.microsecond:06d}+00:00"


class EventSink:
    """Writes events as JSON lines to a file or stdout."""

    def __init__(self, stream: IO[bytes], ledger: Any = None) -> None:
        self._stream = stream
        self.ledger = ledger  # the audit ledger (audit.writer.LedgerWriter over SQLite or PostgreSQL) or None
        # Anything reads the events: with --events none and no ledger the statement path skips building them.
        self.active = stream is not None or ledger is not None
        self._buf: list[bytes] = []
        self.emitted = 0

    @classmethod
    def open(cls, target: str, ledger: Any = None) -> EventSink:
        """``-`` for stdout, ``none`` for no JSON lines, otherwise a file path appended to."""
        if target == "-":
            return cls(sys.stdout.buffer, ledger)
        if target == "none":
            return cls(None, ledger)  # type: ignore[arg-type]
        return cls(open(target, "ab"), ledger)  # noqa: SIM115 - owned by the sink, closed in close()

    def emit(self, kind: EventKind, fields: dict[str, Any], *, flush: bool = False,
             durable: bool = False) -> Waiter | None:
        """Queue one event; ``flush`` writes the JSON line now; ``durable`` returns the ledger commit to wait for."""
        event = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"), "kind": kind.value}
        event.update(fields)
        return self._line(orjson.dumps(event, default=str), flush, durable)

    def _line(self, line: bytes, flush: bool, durable: bool, block: bool = False) -> Waiter | None:
        self.emitted += 1
        future = self.ledger.append(line, durable=durable, block=block) if self.ledger is not None else None
        if self._stream is not None:
            self._buf.append(line)
            if flush or len(self._buf) >= 512:
                self.flush()
        return future

    def emit_fragments(self, kind: EventKind, now_iso: str, *fragments: bytes, flush: bool = False,
                       durable: bool = False, block: bool = False) -> Waiter | None:
        """Queue one event assembled from pre-serialized JSON members (``"key":value`` bytes).

        The statement path uses this: the session's constant members and a statement shape's
        facts and decisions are serialized once and reused.
        """
        line = (b'{"time":"' + now_iso.encode() + b'","kind":"' + kind.value.encode() + b'",'
                + b",".join(fragments) + b"}")
        return self._line(line, flush, durable, block)

    def emit_read(self, completion: Completion) -> None:
        """Queue a read's decision (``completion.deferred``: when, its ReadShape) with its outcome.

        The ledger receives the completion object, not a line: its writer formats it and chains
        reads in blocks that hold each shape once, so a read costs the event loop one queue
        append. JSON lines get the whole event, as ``emit_fragments`` would write it.
        """
        self.emitted += 1
        if self.ledger is not None:
            self.ledger.append_read(completion)
        if self._stream is not None:
            now, shape = completion.deferred  # type: ignore[misc]
            self._buf.append(shape.line(now, completion.stmt, completion.json()))
            if len(self._buf) >= 512:
                self.flush()

    def flush(self) -> None:
        if self._buf and self._stream is not None:
            self._stream.write(b"\n".join(self._buf) + b"\n")
            self._buf.clear()
            self._stream.flush()

    def close(self) -> None:
        self.flush()
        if self._stream is not None and self._stream is not sys.stdout.buffer:
            self._stream.close()
        if self.ledger is not None:
            self.ledger.close()
