"""What became of each forwarded statement: rows affected, duration, error.

The session registers one ``Pending`` per forwarded simple Query (which may hold several
statements) and per forwarded Execute, in the order the server will answer them. The server's
CommandComplete, PortalSuspended, EmptyQueryResponse and ErrorResponse messages close them in
that order; ReadyForQuery closes the whole round trip, including what an earlier error made the
server skip. Sans-IO: the session feeds messages and emits the finished records.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Any

import orjson


class Pending:
    """One forwarded Query or Execute, until the server has answered it. Created per statement:
    a plain slotted class, cheaper than a dataclass."""

    __slots__ = ("closed", "deferred", "ended", "error", "interrupted", "masked", "portal", "started", "stmt",
                 "sync_no", "tags", "until_ready")

    def __init__(self, stmt: int, sync_no: int, until_ready: bool, deferred: tuple[str, Any] | None,
                 portal: str = "") -> None:
        self.stmt = stmt  # the session's statement number, shared with the decision entry
        self.sync_no = sync_no  # the ReadyForQuery that ends this round trip
        self.until_ready = until_ready  # a simple Query: every CommandComplete until ReadyForQuery is its
        self.deferred = deferred  # a read's (time, events.ReadShape): written together with its completion
        self.portal = portal  # an Execute's portal: its DataRows are masked by the portal's plan
        self.started = time.monotonic()
        self.tags: list[str] = []
        self.error: tuple[str, str] | None = None  # (sqlstate, message)
        self.ended = 0.0
        self.closed = False
        self.interrupted = False
        self.masked: tuple[str, ...] = ()  # output columns the client received masked

    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.interrupted:
            return "interrupted"  # the session ended before the server answered
        if not self.closed:
            return "skipped"  # an earlier error in the batch: the server did not run it
        return "ok"

    def fields(self) -> dict[str, Any]:
        end = self.ended or time.monotonic()
        out: dict[str, Any] = {"stmt": self.stmt, "duration_ms": round((end - self.started) * 1000, 3),
                               "tags": self.tags, "rows": rows_affected(self.tags)}
        if self.masked:
            out["masked"] = list(self.masked)
        if self.error is not None:
            out["error"] = {"sqlstate": self.error[0], "message": self.error[1]}
        out["status"] = self.status()
        return out

    def json(self) -> bytes:
        """``fields()`` as JSON; the common case (one tag, no error, nothing masked) without a dict."""
        tags = self.tags
        if len(tags) == 1 and self.closed and self.error is None and not self.masked and tags[0].isascii() \
                and tags[0].isprintable() and '"' not in tags[0] and "\\" not in tags[0]:  # (JSON: no control chars)
            end = self.ended or time.monotonic()
            last = tags[0].rpartition(" ")[2]
            return b'{"stmt":%d,"duration_ms":%.3f,"tags":["%s"],"rows":%d,"status":"ok"}' % (
                self.stmt, (end - self.started) * 1000, tags[0].encode(), int(last) if last.isdigit() else 0)
        return orjson.dumps(self.fields())

    def compact(self) -> tuple[int, int, str] | None:
        """(stmt, duration in µs, tag) when the statement ran and returned one ASCII tag with no error
        and nothing masked, else None: how a block of reads in the ledger stores the common case
        (``search.block_reads`` rebuilds the completion ``json()`` would write)."""
        tags = self.tags
        if len(tags) == 1 and self.closed and self.error is None and not self.masked and tags[0].isascii():
            return self.stmt, round(((self.ended or time.monotonic()) - self.started) * 1_000_000), tags[0]
        return None


_QUOTED = re.compile(r'"[^"]*"')


def redact_message(message: str) -> str:
    """A server error message without the values it quotes (``invalid input syntax ...: "4111..."``).

    The ledger keeps no literal values; names come in the error's own fields (constraint, column).
    """
    return _QUOTED.sub('"…"', message)[:1024]


def rows_affected(tags: list[str]) -> int:
    """Sum of the row counts in command tags ('UPDATE 3', 'INSERT 0 1', 'SELECT 10', 'COPY 5')."""
    total = 0
    for tag in tags:
        last = tag.rpartition(" ")[2]
        if last.isdigit():
            total += int(last)
    return total


class CompletionTracker:
    """Matches the server's result messages to the statements the session forwarded."""

    __slots__ = ("_early_error", "_queue", "_rfq")

    def __init__(self) -> None:
        self._queue: collections.deque[Pending] = collections.deque()
        self._rfq = 0  # ReadyForQuery messages seen: the round trip in flight is the next one
        # An error of a Parse or Bind that reached the server before its Execute reached dbguard
        # (the planner folds `1/0` at Bind): it belongs to the next Execute of the round trip.
        self._early_error: tuple[str, str] | None = None

    def expect(self, pending: Pending) -> None:
        if self._early_error is not None and pending.sync_no == self._rfq + 1:
            pending.error, self._early_error = self._early_error, None
            pending.ended = pending.started
        self._queue.append(pending)

    def _front(self) -> Pending | None:
        for p in self._queue:
            if p.sync_no > self._rfq + 1:
                return None  # a later round trip (pipelining): not what this message answers
            if not p.closed and p.error is None:
                return p
        return None

    def current(self) -> Pending | None:
        """The statement whose results the server is sending now."""
        return self._front()

    def command_complete(self, tag: str) -> None:
        queue = self._queue
        p = queue[0] if queue and not queue[0].closed and queue[0].error is None and \
            queue[0].sync_no == self._rfq + 1 else self._front()
        if p is None:
            return
        p.tags.append(tag)
        if not p.until_ready:
            p.closed = True
            p.ended = time.monotonic()

    def suspended(self) -> None:  # PortalSuspended: the Execute's row limit was reached
        self.command_complete("")

    def error(self, sqlstate: str, message: str) -> None:
        message = redact_message(message)
        p = self._front()
        if p is not None:
            p.error = (sqlstate, message)
            p.ended = time.monotonic()
        else:
            self._early_error = (sqlstate, message)

    def ready(self, rfq_no: int) -> list[Pending]:
        """ReadyForQuery number ``rfq_no`` arrived: return the round trip's finished statements."""
        self._rfq = rfq_no
        self._early_error = None
        done: list[Pending] = []
        queue = self._queue
        while queue and queue[0].sync_no <= rfq_no:
            p = queue.popleft()
            if p.until_ready and p.error is None:
                p.closed = True
            if not p.ended:
                p.ended = time.monotonic()
            done.append(p)
        return done

    def drain(self) -> list[Pending]:
        """The session ended: whatever was still pending, for the record."""
        done = list(self._queue)
        self._queue.clear()
        now = time.monotonic()
        for p in done:
            if not p.closed and p.error is None:
                p.interrupted = True
                p.ended = now  # its duration ends here, not when the ledger's writer formats it
        return done
