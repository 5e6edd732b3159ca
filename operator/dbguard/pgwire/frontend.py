"""Sans-IO reader of what a client (frontend) sends: bytes in, typed messages out.

It owns framing and size caps. ``receive_data`` buffers bytes; ``next_message`` returns one
message or ``NEED_DATA``. It raises ``RemoteProtocolError`` for anything malformed, oversized or
unknown in the startup phase; unknown typed messages are returned as ``UnknownMessage`` so the
session can refuse them politely and keep the connection.
"""

from __future__ import annotations

import enum
import struct

from dbguard.pgwire import messages as m
from dbguard.pgwire.errors import RemoteProtocolError

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!ci")

MAX_STARTUP_PACKET = 10_000  # PostgreSQL's own limit for the startup packet
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class _Need(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Need.NEED_DATA


class Phase(enum.Enum):
    STARTUP = "startup"  # untyped packets: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest
    TYPED = "typed"  # everything after the StartupMessage


class FrontendParser:
    """Frames and decodes frontend messages."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.phase = Phase.STARTUP
        self.max_message_size = max_message_size

    def receive_data(self, data: bytes) -> None:
        if self._pos == len(self._buf):
            # Everything received was parsed (the usual case): start afresh, so an idle session holds
            # no consumed bytes (and no capacity a large message left behind).
            self._buf = bytearray(data)
            self._pos = 0
            return
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    def next_message(self) -> object:
        if self.phase is Phase.STARTUP:
            return self._next_startup()
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            return NEED_DATA
        type_code, length = _HEADER.unpack_from(buf, pos)
        if length < 4:
            raise RemoteProtocolError(f"invalid message length {length} for message type {type_code!r}")
        if length + 1 > self.max_message_size:
            raise RemoteProtocolError(
                f"message of type {type_code.decode('latin-1')!r} is {length} bytes, over the "
                f"{self.max_message_size}-byte limit",
                sqlstate="54000",
            )
        end = pos + 1 + length
        if len(buf) < end:
            return NEED_DATA
        raw = bytes(buf[pos:end])
        self._pos = end
        return _decode_typed(type_code, raw)

    def _next_startup(self) -> object:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 4:
            return NEED_DATA
        (length,) = _I32.unpack_from(buf, pos)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise RemoteProtocolError(f"invalid startup packet length {length}")
        if len(buf) - pos < length:
            return NEED_DATA
        body = bytes(buf[pos + 4 : pos + length])
        self._pos = pos + length
        (code,) = _I32.unpack_from(body, 0)
        if code == m.SSL_REQUEST_CODE and length == 8:
            return m.SSLRequest()
        if code == m.GSSENC_REQUEST_CODE and length == 8:
            return m.GSSENCRequest()
        if code == m.CANCEL_REQUEST_CODE and length == 16:
            pid, key = struct.unpack_from("!ii", body, 4)
            return m.CancelRequest(process_id=pid, secret_key=key)
        if code >> 16 != 3:
            raise RemoteProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}", sqlstate="0A000")
        params = _decode_startup_params(body[4:])
        self.phase = Phase.TYPED
        return m.StartupMessage(protocol=code, params=params)


def _decode_startup_params(data: bytes) -> dict[str, str]:
    if not data.endswith(b"\x00"):
        raise RemoteProtocolError("startup packet is not terminated")
    parts = data[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise RemoteProtocolError("startup packet has a parameter name without a value")
    try:
        items = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("startup packet is not valid UTF-8") from exc
    params: dict[str, str] = {}
    for i in range(0, len(items), 2):
        name = items[i]
        if not name:
            raise RemoteProtocolError("startup packet has an empty parameter name")
        if name in params:
            raise RemoteProtocolError(f"startup parameter {name!r} given twice")
        params[name] = items[i + 1]
    return params


class _Reader:
    """Cursor over one message payload; every read is bounds-checked."""

    __slots__ = ("data", "pos", "type_code")

    def __init__(self, data: bytes, type_code: str) -> None:
        self.data = data
        self.pos = 5
        self.type_code = type_code

    def _fail(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"malformed {self.type_code!r} message: {what}")

    def cstring_bytes(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self._fail("unterminated string")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value

    def cstring(self) -> str:
        try:
            return self.cstring_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail("name is not valid UTF-8") from exc

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self._fail("truncated")
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self._fail("truncated")
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail("truncated")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def byte(self) -> str:
        return self.take(1).decode("latin-1")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self._fail(f"{len(self.data) - self.pos} unexpected trailing bytes")


_SYNC = m.Sync(raw=b"S\x00\x00\x00\x04")
_FLUSH = m.Flush(raw=b"H\x00\x00\x00\x04")


def _name_at(raw: bytes, pos: int, t: str) -> tuple[str, int]:
    end = raw.find(b"\x00", pos)
    if end < 0:
        raise RemoteProtocolError(f"malformed {t!r} message: unterminated string")
    try:
        return raw[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"malformed {t!r} message: name is not valid UTF-8") from exc


def _decode_bind(raw: bytes) -> m.Bind:
    """Bind, validated in one pass with direct unpacking: it is on every extended-protocol statement."""
    portal, pos = _name_at(raw, 5, "B")
    stmt, pos = _name_at(raw, pos, "B")
    n = len(raw)
    try:
        (nf,) = _I16.unpack_from(raw, pos)
        formats = struct.unpack_from(f"!{nf}h", raw, pos + 2) if nf > 0 else ()
        pos += 2 + 2 * nf
        (np_,) = _I16.unpack_from(raw, pos)
        pos += 2
        if nf < 0 or np_ < 0:
            raise RemoteProtocolError("malformed 'B' message: negative count")
        params: list[bytes | None] = []
        for _ in range(np_):
            (ln,) = _I32.unpack_from(raw, pos)
            pos += 4
            if ln == -1:
                params.append(None)
                continue
            if ln < 0 or pos + ln > n:
                raise RemoteProtocolError("malformed 'B' message: truncated")
            params.append(raw[pos : pos + ln])
            pos += ln
        (nr,) = _I16.unpack_from(raw, pos)
        rformats = struct.unpack_from(f"!{nr}h", raw, pos + 2) if nr > 0 else ()
        pos += 2 + 2 * max(nr, 0)
    except struct.error as exc:
        raise RemoteProtocolError("malformed 'B' message: truncated") from exc
    if nr < 0:
        raise RemoteProtocolError("malformed 'B' message: negative result format count")
    if pos != n:
        raise RemoteProtocolError(f"malformed 'B' message: {n - pos} unexpected trailing bytes"
                                  if pos < n else "malformed 'B' message: truncated")
    return m.Bind(raw=raw, portal=portal, statement=stmt, param_formats=formats, params=tuple(params),
                  result_formats=rformats)


def _decode_typed(type_code: bytes, raw: bytes) -> m.FrontendMessage:
    t = type_code.decode("latin-1")
    if t == "Q":
        if len(raw) < 6 or raw[-1] != 0:
            raise RemoteProtocolError("malformed 'Q' message: unterminated query string")
        sql = raw[5:-1]
        if b"\x00" in sql:
            raise RemoteProtocolError("malformed 'Q' message: NUL byte inside the query string")
        return m.Query(raw=raw, sql=sql)
    if t == "B":
        return _decode_bind(raw)
    if t == "E":
        portal, pos = _name_at(raw, 5, t)
        if pos + 4 != len(raw):
            raise RemoteProtocolError("malformed 'E' message: truncated" if pos + 4 > len(raw)
                                      else f"malformed 'E' message: {len(raw) - pos - 4} unexpected trailing bytes")
        return m.Execute(raw=raw, portal=portal, max_rows=_I32.unpack_from(raw, pos)[0])
    if t == "S" or t == "H":
        if len(raw) != 5:
            raise RemoteProtocolError(f"malformed {t!r} message: {len(raw) - 5} unexpected trailing bytes")
        return _SYNC if t == "S" else _FLUSH
    if t == "D" or t == "C":
        if len(raw) < 6:
            raise RemoteProtocolError(f"malformed {t!r} message: truncated")
        kind = chr(raw[5])
        if kind not in ("S", "P"):
            raise RemoteProtocolError(f"malformed {t!r} message: unknown target {kind!r}")
        name, pos = _name_at(raw, 6, t)
        if pos != len(raw):
            raise RemoteProtocolError(f"malformed {t!r} message: {len(raw) - pos} unexpected trailing bytes")
        return (m.Describe if t == "D" else m.Close)(raw=raw, kind=kind, name=name)
    r = _Reader(raw, t)
    if t == "P":
        name = r.cstring()
        sql = r.cstring_bytes()
        n = r.int16()
        if n < 0:
            raise r._fail("negative parameter count")
        types = tuple(r.int32() for _ in range(n))
        r.end()
        return m.Parse(raw=raw, name=name, sql=sql, param_types=types)
    if t == "X":
        r.end()
        return m.Terminate(raw=raw)
    if t == "p":
        return m.PasswordMessage(raw=raw, data=raw[5:])
    if t == "d":
        return m.CopyData(raw=raw)
    if t == "c":
        r.end()
        return m.CopyDone(raw=raw)
    if t == "f":
        message = r.cstring()
        r.end()  # trailing bytes after the message are malformed, as for every other type (found by fuzzing)
        return m.CopyFail(raw=raw, message=message)
    if t == "F":
        return m.FunctionCall(raw=raw)
    return m.UnknownMessage(raw=raw, type_code=t)
