"""RowDescription -> which fields to mask; DataRow -> the same row with those fields masked. Sans-IO."""

from __future__ import annotations

import dataclasses
import struct

from dbguard.masking.catalog import IdentityMasks
from dbguard.masking.rules import ColumnMask
from dbguard.masking.strategies import mask_value

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")  # table oid, attnum, type oid, typlen, typmod, format


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    name: str
    table_oid: int
    attnum: int
    type_oid: int
    binary: bool


@dataclasses.dataclass(frozen=True, slots=True)
class MaskPlan:
    """The masked fields of one result shape: (index, mask, type oid, binary)."""

    fields: tuple[tuple[int, ColumnMask, int, bool], ...]
    columns: tuple[str, ...]  # names of the masked output columns, for the ledger

    def __bool__(self) -> bool:
        return bool(self.fields)


class CatalogOutdated(Exception):
    """A result column dbguard's catalog does not know yet: it cannot tell whether to mask it."""


def parse_row_description(payload: bytes) -> list[Field]:
    (n,) = _I16.unpack_from(payload, 0)
    pos = 2
    fields = []
    for _ in range(n):
        end = payload.index(b"\x00", pos)
        name = payload[pos:end].decode("utf-8", "replace")
        table, attnum, typ, _len, _mod, fmt = _FIELD.unpack_from(payload, end + 1)
        fields.append(Field(name, table & 0xFFFFFFFF, attnum, typ & 0xFFFFFFFF, fmt == 1))
        pos = end + 1 + _FIELD.size
    return fields


def plan_for(fields: list[Field], masks: IdentityMasks, formats: tuple[int, ...] | None = None) -> MaskPlan:
    """Which fields carry masked columns; ``formats`` are the Bind's result formats when the
    RowDescription came from a statement Describe (which reports text for every column)."""
    out = []
    names = []
    for i, f in enumerate(fields):
        if f.table_oid and f.attnum > 0 and not masks.knows_attribute(f.table_oid, f.attnum):
            raise CatalogOutdated(f"column {f.name!r} is newer than dbguard's catalog snapshot")
        found = masks.by_attribute.get((f.table_oid, f.attnum)) if f.table_oid else None
        if found is None:
            continue
        binary = f.binary
        if formats is not None:
            binary = (formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0) == 1
        out.append((i, found[0], f.type_oid, binary))
        names.append(f.name)
    return MaskPlan(tuple(out), tuple(names))


def mask_data_row(payload: bytes, plan: MaskPlan, hash_key: bytes) -> bytes:
    """The DataRow message (type byte and length included) with the plan's fields masked."""
    (n,) = _I16.unpack_from(payload, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(n):
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[pos:pos + length])
            pos += length
    for index, mask, type_oid, binary in plan.fields:
        if index < n and values[index] is not None:
            values[index] = mask_value(mask.strategy, mask.opts, values[index], type_oid, binary, hash_key)  # type: ignore[arg-type]
    parts = [_I16.pack(n)]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    body = b"".join(parts)
    return b"D" + _I32.pack(len(body) + 4) + body
