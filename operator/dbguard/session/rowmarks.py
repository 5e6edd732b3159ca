"""Row-evidence markers: tie each forwarded write to the rows it changes in logical decoding.

Just before a write reaches the server, the session sends, in the same stream (and so in the
client's transaction, explicit or implicit):

    Parse(N, "SELECT $2::text FROM pg_logical_emit_message(true, 'dbguard', $1::text)")
    Bind(N -> portal N, [marker content, tag]) Execute(N) Close(portal N) Close(statement N)

with a statement and portal name of its own, so the client's unnamed statement and portal are
untouched. The server answers ParseComplete, BindComplete, one DataRow carrying the tag,
CommandComplete, CloseComplete, CloseComplete; none of it may reach the client, nor the notices
the server raises while it runs them (log_duration, debug_print_plan with client_min_messages=log).
ParseComplete and BindComplete carry nothing to recognise them by, so the session counts the
Parse and Bind messages the client sent in each round trip (Sync to Sync) before the marker: the
server answers in order, so once that many have come back, the next two are the marker's. Its
DataRow must then carry this session's secret tag. After an error the server skips the rest of
the round trip: a marker not answered by the next ReadyForQuery never ran.

Sans-IO: the session feeds the server's messages while ``active`` and sends what it returns.
"""

from __future__ import annotations

import collections
import secrets
import struct

from dbguard.audit.row_evidence import MARKER_PREFIX, marker_content
from dbguard.pgwire import messages as m
from dbguard.pgwire.errors import RemoteProtocolError

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_SQL = f"SELECT $2::text FROM pg_logical_emit_message(true, '{MARKER_PREFIX}', $1::text)"
_AFTER_ROW = (0x43, 0x33, 0x33)  # CommandComplete, CloseComplete (portal), CloseComplete (statement)


class _Marker:
    __slots__ = ("before", "errored", "ours_seen", "query", "row", "sync_no")

    def __init__(self, row: bytes, sync_no: int, query: bool, before: int) -> None:
        self.row = row  # the DataRow our Execute returns
        self.sync_no = sync_no  # the round trip it is in
        self.query = query  # sent just before a simple Query (no Sync between them)
        self.before = before  # the client's Parse/Bind messages in this round trip ahead of it
        self.ours_seen = 0  # of our ParseComplete and BindComplete
        self.errored = False  # an ErrorResponse came after our ParseComplete: it did not run


class RowMarks:
    """The markers of one session, in the order the server will answer them."""

    __slots__ = ("_client_pb", "_inflight", "_key", "_n", "_name", "_rfq", "_secret", "_seen", "_swallow", "chain",
                 "failed", "sent", "session")

    def __init__(self, chain: str, session: str, rfq_seen: int = 0, key: bytes = b"") -> None:
        self.chain = chain
        self._key = key  # authenticates the marker's content (audit.row_evidence.marker_key)
        self.session = session
        self._secret = secrets.token_hex(12)  # tags the DataRow; the client cannot produce it
        self._name = f"dbguard_rowmark_{secrets.token_hex(6)}"
        self._n = 0
        self._inflight: collections.deque[_Marker] = collections.deque()
        self._client_pb: dict[int, int] = {}  # round trip -> the client's Parse/Bind messages sent
        self._seen: dict[int, int] = {}  # round trip -> the client's ParseComplete/BindComplete received
        self._rfq = rfq_seen  # ReadyForQuery messages seen: the server answers round trip _rfq + 1
        self._swallow: list[int] = []  # what still follows our DataRow
        self.sent = 0
        self.failed = 0  # markers the server skipped or refused

    @property
    def active(self) -> bool:
        return bool(self._inflight or self._swallow)

    def client_parse_or_bind(self, sync_no: int) -> None:
        """The client's Parse or Bind (or a refusal's Bind) went to the server in round trip ``sync_no``."""
        self._client_pb[sync_no] = self._client_pb.get(sync_no, 0) + 1

    def mark(self, stmt: int, sync_no: int, *, before_query: bool) -> bytes:
        """The messages to send just before statement ``stmt`` (answered by ReadyForQuery ``sync_no``)."""
        self._n += 1
        self.sent += 1
        tag = f"{self._secret}:{self._n}".encode()
        content = marker_content(self.chain, self.session, stmt, self._key)
        name = f"{self._name}_{self._n}"
        row = _I16.pack(1) + _I32.pack(len(tag)) + tag
        self._inflight.append(_Marker(row, sync_no, before_query, self._client_pb.get(sync_no, 0)))
        return (m.encode_parse(name, _SQL) + m.encode_bind(statement=name, portal=name, params=(content, tag))
                + m.encode_execute(name) + m.encode_close("P", name) + m.encode_close("S", name))

    def feed(self, type_code: int, payload: bytes) -> bool:
        """Whether the server's message answers a marker (then it must not reach the client)."""
        if self._swallow:
            if type_code == self._swallow[0]:
                self._swallow.pop(0)
                return True
            if type_code == 0x4E:  # a notice our Execute raised (log_duration, client_min_messages=log ...)
                return True
            self._swallow.clear()  # the server answered otherwise: handle it as the client's
        rt = self._rfq + 1
        head = self._inflight[0] if self._inflight and self._inflight[0].sync_no == rt else None
        if type_code == 0x31 or type_code == 0x32:  # ParseComplete, BindComplete
            seen = self._seen.get(rt, 0)
            if head is not None and seen == head.before and head.ours_seen < 2:
                head.ours_seen += 1
                return True
            self._seen[rt] = seen + 1
            return False
        if type_code == 0x44 and head is not None and head.ours_seen == 2:
            if payload != head.row:  # cannot happen: the server answers in order
                raise RemoteProtocolError("the server answered a row marker out of order")
            self._inflight.popleft()
            self._swallow = list(_AFTER_ROW)
            return True
        if head is None or not head.ours_seen or head.errored:
            return False
        if type_code == 0x4E:  # between our ParseComplete and our DataRow every message is the marker's
            return True
        if type_code == 0x45:
            head.errored = True
        return False

    def error_skips_query(self) -> bool:
        """An ErrorResponse arrived: whether a marker sent just before a simple Query did not run, and
        so the Query is skipped too (the server now waits for a Sync that will not come)."""
        head = self._inflight[0] if self._inflight else None
        return head is not None and head.sync_no == self._rfq + 1 and head.query

    def ready(self, rfq_no: int) -> None:
        """ReadyForQuery ``rfq_no``: markers of the round trip it ends that were not answered were skipped."""
        self._rfq = rfq_no
        while self._inflight and self._inflight[0].sync_no <= self._rfq:
            self._inflight.popleft()
            self.failed += 1
        self._swallow.clear()
        self._client_pb.pop(self._rfq, None)
        self._seen.pop(self._rfq, None)
