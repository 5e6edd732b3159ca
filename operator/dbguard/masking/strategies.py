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


def masker(strategy: str, options: dict[str, Any], type_oid: int, binary: bool,
           hash_key: bytes) -> Callable[[bytes], bytes | None]:
    """A function from one field's bytes to its masked bytes (None: NULL), specialised once per plan.

    The common strategies work on the bytes directly (ASCII fast paths); anything else goes
    through ``mask_value``, which defines the result.
    """
    if strategy == "null":
        return lambda value: None
    if type_oid not in TEXT_TYPES or strategy == "hash":
        return lambda value: mask_value(strategy, options, value, type_oid, binary, hash_key)
    if strategy == "redact":
        constant = str(options.get("with", REDACTED)).encode()
        return lambda value: constant
    if strategy == "email":
        prefix = REDACTED.encode() + b"@"

        def email(value: bytes) -> bytes:
            at = value.rfind(b"@")
            return prefix + value[at + 1:] if at >= 0 else REDACTED.encode()
        return email
    if strategy == "partial" and len(str(options.get("fill", "*")).encode()) == 1:
        first = int(options.get("keepFirst", 0))
        last = int(options.get("keepLast", 4))
        fill = str(options.get("fill", "*")).encode()

        def partial(value: bytes) -> bytes:
            if not value.isascii():
                return mask_text("partial", options, value.decode("utf-8", "replace"), hash_key).encode()
            n = len(value)
            if first + last >= n:
                return fill * n
            return value[:first] + fill * (n - first - last) + (value[n - last:] if last else b"")
        return partial
    return lambda value: mask_value(strategy, options, value, type_oid, binary, hash_key)


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
