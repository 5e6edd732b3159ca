"""Masking strategies: a column value in, the masked value out, in the wire format it travels in.

Values arrive as the bytes of one DataRow field (text or binary format) with the column's type
OID. Text-like types are masked as text in both formats (their binary form is the UTF-8 text).
Other types keep a value of their type where the format needs one: ``redact`` gives the type's
zero, ``null`` gives NULL; a strategy that only makes sense for text (``partial``, ``email``,
``hash``) turns a non-text value into NULL rather than into bytes the client cannot decode.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Callable
from typing import Any

TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705})  # text, varchar, bpchar, name, unknown
_ZERO_TEXT = {20: b"0", 21: b"0", 23: b"0", 700: b"0", 701: b"0", 1700: b"0", 16: b"f"}
_ZERO_BINARY = {20: b"\0" * 8, 21: b"\0" * 2, 23: b"\0" * 4, 700: struct.pack("!f", 0.0),
                701: struct.pack("!d", 0.0), 1700: b"\0" * 8, 16: b"\0"}

REDACTED = "****"
_KEY_VALUES = re.compile(r"\)=\((.*)\)")  # Key (ssn)=(123-45-6789) already exists.
_ROW_VALUES = re.compile(r"(Failing row contains |row )\((.*)\)")


def redact_detail(detail: str) -> str:
    """A server error DETAIL without the column values it quotes."""
    detail = _KEY_VALUES.sub(")=(…)", detail)
    return _ROW_VALUES.sub(lambda m: m.group(1) + "(…)", detail)


def mask_value(strategy: str, options: dict[str, Any], value: bytes, type_oid: int, binary: bool,
               hash_key: bytes) -> bytes | None:
    """The masked field; None means SQL NULL."""
    if strategy == "null":
        return None
    if type_oid not in TEXT_TYPES:
        if strategy == "redact":
            zero = (_ZERO_BINARY if binary else _ZERO_TEXT).get(type_oid)
            return zero  # unknown types: NULL, the only value every type has
        return None
    text = value.decode("utf-8", "replace")
    return mask_text(strategy, options, text, hash_key).encode("utf-8")


# How the row masker rewrites one field: (kind, a, b, first, last). The compiled row masker
# (_rowmask.c) and its Python twin (rows._mask_rows_py) read the same steps.
CONST = 0  # a: the masked value (bytes, or None for NULL), whatever the input
EMAIL = 1  # a + the bytes after the last "@"; b without "@"
PARTIAL = 2  # ASCII: keep `first` and `last` bytes, fill the rest with byte b; otherwise the callable a
CALL = 3  # the callable a: bytes -> bytes or None
Step = tuple[int, Any, Any, int, int]
_MAX_KEEP = 1 << 30  # PARTIAL's first and last: past any field's length, and no overflow in C


def row_step(strategy: str, options: dict[str, Any], type_oid: int, binary: bool, hash_key: bytes) -> Step:
    """The step that masks one field of a DataRow, specialised once per plan (NULL stays NULL).

    The common strategies work on the bytes directly (ASCII fast paths; "@" never occurs inside a
    multi-byte UTF-8 sequence); anything else goes through ``mask_value``, which defines the result.
    """
    if strategy == "null":
        return (CONST, None, None, 0, 0)
    if type_oid not in TEXT_TYPES:
        # mask_value: redact gives the type's zero (NULL for unknown types), anything else NULL
        zero = (_ZERO_BINARY if binary else _ZERO_TEXT).get(type_oid) if strategy == "redact" else None
        return (CONST, zero, None, 0, 0)
    if strategy == "redact":
        return (CONST, str(options.get("with", REDACTED)).encode(), None, 0, 0)
    if strategy == "email":
        return (EMAIL, REDACTED.encode() + b"@", REDACTED.encode(), 0, 0)
    if strategy == "hash":
        return (CALL, _hasher(options, hash_key), None, 0, 0)
    fill = str(options.get("fill", "*")).encode()
    first = int(options.get("keepFirst", 0))
    last = int(options.get("keepLast", 4))
    if strategy == "partial" and len(fill) == 1 and 0 <= first <= _MAX_KEEP and 0 <= last <= _MAX_KEEP:
        def partial(value: bytes) -> bytes:  # the values that are not ASCII
            return mask_text("partial", options, value.decode("utf-8", "replace"), hash_key).encode()
        return (PARTIAL, partial, fill[0], first, last)
    return (CALL, lambda value: mask_value(strategy, options, value, type_oid, binary, hash_key), None, 0, 0)


def _hasher(options: dict[str, Any], hash_key: bytes) -> Callable[[bytes], bytes]:
    """mask_text's hash on bytes: the keyed HMAC state is set up once and copied per value."""
    prefix = str(options.get("prefix", "h:")).encode()
    length = int(options.get("length", 16))
    keyed = hmac.new(hash_key, digestmod=hashlib.sha256)

    def hash_value(value: bytes) -> bytes:
        if not value.isascii():  # what mask_text hashes: the text as decoded, invalid bytes replaced
            value = value.decode("utf-8", "replace").encode("utf-8")
        h = keyed.copy()
        h.update(value)
        return prefix + h.hexdigest()[:length].encode()
    return hash_value


def step_function(step: Step) -> Callable[[bytes], bytes | None]:
    """One non-NULL field's bytes -> its masked bytes (None: NULL): what the compiled row masker does."""
    kind, a, b, first, last = step
    if kind == CONST:
        return lambda value: a
    if kind == EMAIL:
        def email(value: bytes) -> bytes:
            at = value.rfind(b"@")
            return a + value[at + 1:] if at >= 0 else b
        return email
    if kind == PARTIAL:
        fill = bytes((b,))

        def partial(value: bytes) -> bytes | None:
            if not value.isascii():
                return a(value)
            n = len(value)
            if first + last >= n:
                return fill * n
            return value[:first] + fill * (n - first - last) + (value[n - last:] if last else b"")
        return partial
    return a


def mask_text(strategy: str, options: dict[str, Any], text: str, hash_key: bytes) -> str:
    if strategy == "redact":
        return str(options.get("with", REDACTED))
    if strategy == "partial":
        first = int(options.get("keepFirst", 0))
        last = int(options.get("keepLast", 4))
        fill = str(options.get("fill", "*"))
        if first + last >= len(text):  # short values would show whole: mask them completely
            return fill * len(text)
        return text[:first] + fill * (len(text) - first - last) + (text[len(text) - last:] if last else "")
    if strategy == "email":
        local, at, domain = text.rpartition("@")
        return f"{REDACTED}@{domain}" if at else REDACTED
    if strategy == "hash":
        # Keyed and deterministic: equal values mask equally (joins, GROUP BY), and without the key
        # nobody can test a guess against the output.
        digest = hmac.new(hash_key, text.encode("utf-8"), hashlib.sha256).hexdigest()
        return str(options.get("prefix", "h:")) + digest[: int(options.get("length", 16))]
    raise ValueError(f"unknown masking strategy {strategy!r}")
