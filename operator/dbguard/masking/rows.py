"""RowDescription -> which fields to mask; DataRow -> the same row with those fields masked. Sans-IO."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from dbguard.masking.catalog import IdentityMasks
from dbguard.masking.rules import ColumnMask
from dbguard.masking.strategies import masker

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")
_I32_UNPACK = _I32.unpack_from
_I32_PACK = _I32.pack
_NULL = b"\xff\xff\xff\xff"  # table oid, attnum, type oid, typlen, typmod, format


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
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.fields)

    def compile(self, hash_key: bytes) -> tuple[tuple[int, Callable[[bytes], bytes | None]], ...]:
        """(field index, masker) in field order, built once per plan and key."""
        steps = tuple(sorted((i, masker(mask.strategy, mask.opts, typ, binary, hash_key))
                             for i, mask, typ, binary in self.fields))
        self.compiled[hash_key] = steps
        return steps


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
    """The DataRow message (type byte and length included) with the plan's fields masked.

    Walks the length-prefixed fields only as far as the last masked one and copies the rest as
    slices: the per-row cost is a few field headers and the masked values themselves.
    """
    maskers = plan.compiled.get(hash_key) or plan.compile(hash_key)
    unpack = _I32_UNPACK
    pieces = []
    start = 0
    pos = 2
    i = 0
    for index, mask_field in maskers:
        while i < index:  # skip the fields before this masked one
            length = unpack(payload, pos)[0]
            pos += 4 + (length if length > 0 else 0)
            i += 1
        length = unpack(payload, pos)[0]
        if length >= 0:
            pieces.append(payload[start:pos])
            value = mask_field(payload[pos + 4:pos + 4 + length])
            pieces.append(_NULL if value is None else _I32_PACK(len(value)) + value)
            pos += 4 + length
            start = pos
        else:
            pos += 4
        i += 1
    pieces.append(payload[start:])
    body = b"".join(pieces)
    return b"D" + _I32_PACK(len(body) + 4) + body
