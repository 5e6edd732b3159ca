"""Decode PostgreSQL's built-in ``pgoutput`` logical decoding messages (protocol version 1).

Sans-IO: each row of ``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1',
'publication_names', ..., 'messages', 'true')`` is one message. Reference: "Logical Replication
Message Formats" in the PostgreSQL manual. Tuple values come in text format.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct

_PG_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")


class DecodeError(ValueError):
    """A message this decoder does not understand: row evidence stops rather than guess."""


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclasses.dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime.datetime
    xid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    key: bool  # part of the replica identity


@dataclasses.dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # d (default: primary key), f (full), i (index), n (nothing)
    columns: tuple[Column, ...]


# A tuple's values: text, None for NULL, UNCHANGED for an unchanged TOASTed value (not sent).
UNCHANGED = object()
Values = tuple[object, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    op: str  # INSERT | UPDATE | DELETE
    relation_oid: int
    new: Values | None  # INSERT, UPDATE
    old: Values | None  # DELETE, and UPDATE when the key changed or REPLICA IDENTITY FULL
    old_is_key_only: bool  # old holds only the replica identity's columns (others are None)


@dataclasses.dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


Decoded = Begin | Commit | Message | Relation | Change | Truncate | None


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, st: struct.Struct) -> int:
        if self.pos + st.size > len(self.data):
            raise DecodeError("message ends early")
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return value

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise DecodeError("message ends early")
        self.pos += 1
        return chr(self.data[self.pos - 1])

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self.data[self.pos:end].decode("utf-8", "replace")
        self.pos = end + 1
        return text

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError("value runs past the message")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def time(self) -> datetime.datetime:
        return _PG_EPOCH + datetime.timedelta(microseconds=self.take(_I64))

    def tuple_data(self) -> Values:
        values: list[object] = []
        for _ in range(self.take(_I16)):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind in ("t", "b"):
                value = self.raw(self.take(_I32))
                values.append(value.decode("utf-8", "replace") if kind == "t" else "\\x" + value.hex())
            else:
                raise DecodeError(f"unknown tuple value kind {kind!r}")
        return tuple(values)


def decode(data: bytes) -> Decoded:
    """One pgoutput message; None for the kinds row evidence does not need (Origin, Type)."""
    if not data:
        raise DecodeError("empty message")
    r = _Reader(data)
    kind = r.byte()
    if kind == "B":
        return Begin(final_lsn=r.take(_U64), commit_time=r.time(), xid=r.take(_U32))
    if kind == "C":
        r.take(_I8)  # flags, unused
        return Commit(commit_lsn=r.take(_U64), end_lsn=r.take(_U64), commit_time=r.time())
    if kind == "M":
        flags = r.take(_I8)
        lsn = r.take(_U64)
        prefix = r.string()
        return Message(transactional=bool(flags & 1), lsn=lsn, prefix=prefix, content=r.raw(r.take(_I32)))
    if kind == "R":
        oid = r.take(_U32)
        schema, name = r.string(), r.string()
        identity = r.byte()
        columns = []
        for _ in range(r.take(_I16)):
            flags = r.take(_I8)
            col = r.string()
            type_oid = r.take(_U32)
            r.take(_I32)  # type modifier
            columns.append(Column(name=col, type_oid=type_oid, key=bool(flags & 1)))
        return Relation(oid=oid, schema=schema, name=name, replica_identity=identity, columns=tuple(columns))
    if kind == "I":
        oid = r.take(_U32)
        if r.byte() != "N":
            raise DecodeError("INSERT without a new tuple")
        return Change(op="INSERT", relation_oid=oid, new=r.tuple_data(), old=None, old_is_key_only=False)
    if kind == "U":
        oid = r.take(_U32)
        marker = r.byte()
        old = None
        key_only = False
        if marker in ("K", "O"):
            key_only = marker == "K"
            old = r.tuple_data()
            marker = r.byte()
        if marker != "N":
            raise DecodeError("UPDATE without a new tuple")
        return Change(op="UPDATE", relation_oid=oid, new=r.tuple_data(), old=old, old_is_key_only=key_only)
    if kind == "D":
        oid = r.take(_U32)
        marker = r.byte()
        if marker not in ("K", "O"):
            raise DecodeError("DELETE without an old tuple")
        return Change(op="DELETE", relation_oid=oid, new=None, old=r.tuple_data(), old_is_key_only=marker == "K")
    if kind == "T":
        count = r.take(_U32)
        options = r.take(_I8)
        oids = tuple(r.take(_U32) for _ in range(count))
        return Truncate(relation_oids=oids, cascade=bool(options & 1), restart_identity=bool(options & 2))
    if kind in ("O", "Y"):
        return None
    raise DecodeError(f"unknown pgoutput message {kind!r}")
