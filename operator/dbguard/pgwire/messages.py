"""PostgreSQL wire messages (protocol 3.0), named as in the PostgreSQL documentation.

Frontend messages are decoded into frozen dataclasses that keep their ``raw`` bytes so the session
can forward exactly what the client sent. Backend messages that dbguard itself produces are built
by the ``encode_*`` functions; backend traffic that only passes through is never decoded here.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable

PROTOCOL_VERSION_3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


# --- frontend: startup phase (untyped) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StartupMessage:
    protocol: int
    params: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SSLRequest:
    pass


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GSSENCRequest:
    pass


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    process_id: int
    secret_key: int


# --- frontend: typed messages -------------------------------------------------------------------
# Slotted but not frozen: they are built for every message on the hot path, and a frozen
# dataclass's __init__ costs three times as much. Treat them as immutable all the same.


@dataclasses.dataclass(slots=True, kw_only=True)
class FrontendMessage:
    raw: bytes  # the whole message as received (type byte, length, payload)


@dataclasses.dataclass(slots=True, kw_only=True)
class Query(FrontendMessage):
    sql: bytes  # without the terminating NUL; decoding is the session's job (client_encoding)


@dataclasses.dataclass(slots=True, kw_only=True)
class Parse(FrontendMessage):
    name: str
    sql: bytes
    param_types: tuple[int, ...]


@dataclasses.dataclass(slots=True, kw_only=True)
class Bind(FrontendMessage):
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclasses.dataclass(slots=True, kw_only=True)
class Describe(FrontendMessage):
    kind: str  # "S" statement or "P" portal
    name: str


@dataclasses.dataclass(slots=True, kw_only=True)
class Execute(FrontendMessage):
    portal: str
    max_rows: int


@dataclasses.dataclass(slots=True, kw_only=True)
class Close(FrontendMessage):
    kind: str  # "S" or "P"
    name: str


@dataclasses.dataclass(slots=True, kw_only=True)
class Sync(FrontendMessage):
    pass


@dataclasses.dataclass(slots=True, kw_only=True)
class Flush(FrontendMessage):
    pass


@dataclasses.dataclass(slots=True, kw_only=True)
class Terminate(FrontendMessage):
    pass


@dataclasses.dataclass(slots=True, kw_only=True)
class PasswordMessage(FrontendMessage):
    """'p': password, SASLInitialResponse or SASLResponse; the meaning depends on the auth step."""

    data: bytes


@dataclasses.dataclass(slots=True, kw_only=True)
class CopyData(FrontendMessage):
    pass


@dataclasses.dataclass(slots=True, kw_only=True)
class CopyDone(FrontendMessage):
    pass


@dataclasses.dataclass(slots=True, kw_only=True)
class CopyFail(FrontendMessage):
    message: str


@dataclasses.dataclass(slots=True, kw_only=True)
class FunctionCall(FrontendMessage):
    """'F': the fast-path function call interface. dbguard refuses it: it bypasses SQL."""


@dataclasses.dataclass(slots=True, kw_only=True)
class UnknownMessage(FrontendMessage):
    type_code: str


# --- backend messages dbguard produces ----------------------------------------------------------


def _msg(type_code: bytes, payload: bytes) -> bytes:
    return type_code + _I32.pack(len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    return text.encode("utf-8").replace(b"\x00", b"") + b"\x00"


def encode_error(
    *,
    sqlstate: str,
    message: str,
    severity: str = "ERROR",
    detail: str = "",
    hint: str = "",
    notice: bool = False,
) -> bytes:
    """ErrorResponse ('E') or NoticeResponse ('N') with the fields clients display."""
    fields = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(sqlstate), b"M" + _cstr(message)]
    if detail:
        fields.append(b"D" + _cstr(detail))
    if hint:
        fields.append(b"H" + _cstr(hint))
    return _msg(b"N" if notice else b"E", b"".join(fields) + b"\x00")


def encode_ready_for_query(status: str) -> bytes:
    return _msg(b"Z", status.encode("ascii"))


def encode_auth_request(code: int, extra: bytes = b"") -> bytes:
    """Authentication* ('R'): 0 ok, 3 cleartext password, 10 SASL ..."""
    return _msg(b"R", _I32.pack(code) + extra)


def encode_parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def encode_backend_key_data(process_id: int, secret_key: int) -> bytes:
    return _msg(b"K", _I32.pack(process_id) + _I32.pack(secret_key))


def encode_empty_query_response() -> bytes:
    return _msg(b"I", b"")


# --- frontend messages dbguard sends upstream ---------------------------------------------------


def encode_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_VERSION_3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def encode_cancel_request(process_id: int, secret_key: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(process_id) + _I32.pack(secret_key)


def encode_password(data: bytes) -> bytes:
    return _msg(b"p", data)


def encode_sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _msg(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def encode_query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def encode_bind(*, statement: str, portal: str = "", params: Iterable[bytes | None] = ()) -> bytes:
    params = list(params)
    parts = [_cstr(portal), _cstr(statement), _I16.pack(0), _I16.pack(len(params))]
    for p in params:
        parts.append(_I32.pack(-1) if p is None else _I32.pack(len(p)) + p)
    parts.append(_I16.pack(0))
    return _msg(b"B", b"".join(parts))


def encode_parse(name: str, sql: str) -> bytes:
    """Parse with no parameter types given (the server infers them)."""
    return _msg(b"P", _cstr(name) + _cstr(sql) + _I16.pack(0))


def encode_execute(portal: str, max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + _I32.pack(max_rows))


def encode_close(kind: str, name: str) -> bytes:
    return _msg(b"C", kind.encode() + _cstr(name))


def encode_describe(kind: str, name: str) -> bytes:
    return _msg(b"D", kind.encode() + _cstr(name))


def encode_error_fields(type_code: bytes, fields: dict[str, str]) -> bytes:
    """An ErrorResponse/NoticeResponse with exactly these fields (as decode_error_fields returns them)."""
    return _msg(type_code, b"".join(k.encode() + _cstr(v) for k, v in fields.items()) + b"\x00")


def encode_sync() -> bytes:
    return _msg(b"S", b"")


def encode_terminate() -> bytes:
    return _msg(b"X", b"")


def decode_error_fields(payload: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload, keyed by their one-letter code.

    Never raises: a field without its terminating NUL runs to the end of the payload (found by
    fuzzing: the relay decodes the server's errors, and a malformed one must not break the session).
    """
    fields: dict[str, str] = {}
    data = bytes(payload)
    pos = 0
    while pos < len(data) and data[pos] != 0:
        code = chr(data[pos])
        end = data.find(b"\x00", pos + 1)
        if end < 0:
            end = len(data)
        fields[code] = data[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields
