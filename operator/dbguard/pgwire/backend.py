"""Sans-IO readers of what the server (backend) sends.

``BackendStartupReader`` decodes whole messages during connection start-up (authentication,
ParameterStatus, BackendKeyData). ``BackendRelay`` frames the steady stream of results on the way
to the client without decoding it: it streams large messages through as they arrive (so a huge
DataRow never sits whole in memory), and hands only the few message types the session must see
(ErrorResponse, ReadyForQuery, ParameterStatus, CommandComplete, PortalSuspended,
EmptyQueryResponse) to a callback that may replace them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dbguard.pgwire.errors import RemoteProtocolError

_HEADER = struct.Struct("!ci")
_LEN = struct.Struct("!i")

MAX_BACKEND_CONTROL_MESSAGE = 1024 * 1024  # an ErrorResponse or ParameterStatus is never this large
MAX_DATA_ROW = 1024 * 1024 * 1024  # PostgreSQL's own limit on one message; masking holds a row whole

# ErrorResponse, ReadyForQuery, ParameterStatus, CommandComplete, PortalSuspended, EmptyQueryResponse.
WATCHED = frozenset(b"EZSCsI")


class BackendStartupReader:
    """Whole typed messages from the server, as (type byte, payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def take_rest(self) -> bytes:
        """Bytes already received beyond the messages returned so far."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_message(self) -> tuple[str, bytes] | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        type_code, length = _HEADER.unpack_from(buf, 0)
        if length < 4 or length > MAX_BACKEND_CONTROL_MESSAGE:
            raise RemoteProtocolError(f"server sent an invalid message length {length}")
        if len(buf) < length + 1:
            return None
        payload = bytes(buf[5 : length + 1])
        del buf[: length + 1]
        return type_code.decode("latin-1"), payload


# Returned by the callback to stop relaying at this message until ``feed(b"")`` is called again.
HOLD = b"\x00hold"

# Callback: (type byte as int, payload) -> replacement bytes for the whole message, or None to keep it.
WatchCallback = Callable[[int, bytes], "bytes | None"]
# Rows callback: (data, pos, end) -> (replacement for data[pos:after] or None to keep it, after). Called
# at a DataRow, it takes the run of complete DataRows that starts there (after == pos: none taken).
RowsCallback = Callable[[bytes, int, int], "tuple[bytes | None, int]"]


class BackendRelay:
    """Frames server output on its way to the client; see the module docstring."""

    __slots__ = ("_base", "_max", "_on_rows", "_on_watched", "_pending", "_skip", "_watched")

    def __init__(self, on_watched: WatchCallback) -> None:
        self._on_watched = on_watched
        self._on_rows: RowsCallback | None = None
        self._watched = self._base = WATCHED
        self._max = MAX_BACKEND_CONTROL_MESSAGE
        self._pending = b""  # an incomplete watched message (or header) held back
        self._skip = 0  # bytes of a pass-through message still to come

    def watch_rows(self, on_rows: RowsCallback | None = None) -> None:
        """Also hand over RowDescription, NoData, DataRow and COPY OUT messages (whole): for masking.

        With ``on_rows``, runs of DataRows go to it in one call per run instead of one callback
        each (the callback still gets any DataRow ``on_rows`` leaves).
        """
        self._watched = self._base = self._base | frozenset(b"TnDHdc")  # and COPY OUT: CopyOutResponse, ...
        self._max = MAX_DATA_ROW
        self._on_rows = on_rows

    def watch_also(self, types: bytes, *, for_now: bool = False) -> None:
        """Hand over these message types too: for good, or (``for_now``) until ``watch_less``."""
        self._watched = self._watched | frozenset(types)
        if not for_now:
            self._base = self._base | frozenset(types)
        if 0x44 in self._watched:
            self._max = MAX_DATA_ROW

    def watch_less(self) -> None:
        """Back to the types watched for good."""
        self._watched = self._base
        if 0x44 not in self._watched:
            self._max = MAX_BACKEND_CONTROL_MESSAGE

    def feed(self, data: bytes) -> bytes:
        """Return the bytes to send to the client now."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return data
            pos = self._skip
            self._skip = 0
        pieces: list[bytes] | None = None
        copied = 0  # data[:copied] is already in pieces
        on_rows = self._on_rows
        while pos < n:
            if n - pos < 5:
                self._pending = data[pos:]
                break
            type_code = data[pos]
            (length,) = _LEN.unpack_from(data, pos + 1)
            if length < 4:
                raise RemoteProtocolError(f"server sent an invalid message length {length}")
            end = pos + 1 + length
            if type_code == 0x44 and on_rows is not None:  # DataRow: the run that starts here
                replacement, after = on_rows(data, pos, n)
                if after > pos:
                    if replacement is not None:
                        if pieces is None:
                            pieces = []
                        pieces.append(data[copied:pos])
                        pieces.append(replacement)
                        copied = after
                    pos = after
                    continue
            if type_code in self._watched:
                if length > self._max:
                    raise RemoteProtocolError(f"server sent a {chr(type_code)!r} message of {length} bytes")
                if end > n:
                    self._pending = data[pos:]
                    break
                replacement = self._on_watched(type_code, data[pos + 5 : end])
                if replacement is HOLD:  # the caller needs time: keep this message and the rest
                    self._pending = data[pos:]
                    break
                if replacement is not None:
                    if pieces is None:
                        pieces = []
                    pieces.append(data[copied:pos])
                    pieces.append(replacement)
                    copied = end
            elif end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        stop = n - len(self._pending)
        if pieces is None:
            return data if stop == n else data[:stop]
        pieces.append(data[copied:stop])
        return b"".join(pieces)
