"""RowDescription -> which fields to mask; DataRow -> the same row with those fields masked. Sans-IO."""

from __future__ import annotations

import dataclasses
import struct

from dbguard.masking.catalog import IdentityMasks
from dbguard.masking.rules import ColumnMask
from dbguard.masking.strategies import row_step, step_function
from dbguard.pgwire.errors import RemoteProtocolError

try:  # the compiled row masker (built by pip install from _rowmask.c); the Python twin otherwise
    from dbguard.masking._rowmask import mask_rows as _mask_rows_c
except ImportError:  # pragma: no cover - a platform without a compiler at install time
    _mask_rows_c = None

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

    def compile(self, hash_key: bytes) -> tuple[tuple[int, int, object, object, int, int], ...]:
        """(field index, *step) in field order (see strategies.row_step), built once per plan and key."""
        steps = tuple(sorted(((i, *row_step(mask.strategy, mask.opts, typ, binary, hash_key))
                              for i, mask, typ, binary in self.fields), key=lambda step: step[0]))
        self.compiled[hash_key] = steps
        return steps

    def rows(self, data: bytes, pos: int, end: int, max_len: int, hash_key: bytes) -> tuple[bytes | None, int, int]:
        """``mask_rows`` with this plan's steps."""
        steps = self.compiled.get(hash_key)
        return mask_rows(data, pos, end, max_len, self.compile(hash_key) if steps is None else steps)


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


class MalformedRow(RemoteProtocolError):
    """A DataRow whose fields do not add up: nothing of it may pass (the session closes)."""


def mask_rows(data: bytes, pos: int, end: int, max_len: int, steps: tuple) -> tuple[bytes | None, int, int]:
    """Mask the run of complete DataRow messages at ``data[pos:end]``: (out, after, rows).

    The run stops at the first message that is not a DataRow, is incomplete, or has a length
    outside [4, max_len] (left to the caller to judge). ``out`` replaces ``data[pos:after]`` (None:
    unchanged, when no field is masked); ``rows`` counts the DataRows. Only the masked fields and
    the field headers before them are looked at; everything else is copied as it came. A DataRow
    whose fields overrun it, with fewer fields than a masked index, or with a field length below
    -1 raises MalformedRow. Compiled when the extension is there; ``_mask_rows_py`` is its twin.
    """
    if _mask_rows_c is not None:
        return _mask_rows_c(data, pos, end, max_len, steps, MalformedRow)
    return _mask_rows_py(data, pos, end, max_len, steps)


def _mask_rows_py(data: bytes, pos: int, end: int, max_len: int, steps: tuple) -> tuple[bytes | None, int, int]:
    unpack = _I32_UNPACK
    pack = _I32_PACK
    fields = [(index, step_function(step)) for index, *step in steps]
    need = steps[-1][0] + 1 if steps else 0
    out = bytearray()
    rows = 0
    while end - pos >= 5 and data[pos] == 0x44:
        (mlen,) = unpack(data, pos + 1)
        if mlen < 4 or mlen > max_len or mlen > end - pos - 1:
            break
        mend = pos + 1 + mlen
        rows += 1
        if not fields:
            pos = mend
            continue
        if mend - pos < 7 or _I16.unpack_from(data, pos + 5)[0] < need:
            raise MalformedRow("malformed DataRow")
        header = len(out)
        out += data[pos:pos + 7]  # type, length (set below), field count
        new_len = mlen
        p = copied = pos + 7
        i = 0
        for index, mask_field in fields:
            while True:
                if mend - p < 4:
                    raise MalformedRow("malformed DataRow")
                (length,) = unpack(data, p)
                if length < -1 or length > mend - p - 4:
                    raise MalformedRow("malformed DataRow")
                if i == index:
                    break
                p += 4 + (length if length > 0 else 0)
                i += 1
            if length >= 0:
                out += data[copied:p]
                value = mask_field(data[p + 4:p + 4 + length])
                if value is None:
                    out += _NULL
                    new_len -= length
                else:
                    out += pack(len(value))
                    out += value
                    new_len += len(value) - length
                p += 4 + length
                copied = p
            else:
                p += 4
            i += 1
        out += data[copied:mend]
        if new_len > 0x7FFFFFFF:
            raise MalformedRow("masked DataRow too large")
        _I32.pack_into(out, header + 1, new_len)
        pos = mend
    if not fields or not rows:
        return None, pos, rows
    return bytes(out), pos, rows


def mask_data_row(payload: bytes, plan: MaskPlan, hash_key: bytes) -> bytes:
    """One DataRow message (type byte and length included) with the plan's fields masked."""
    message = b"D" + _I32_PACK(len(payload) + 4) + payload
    out, after, _ = plan.rows(message, 0, len(message), len(message), hash_key)
    if after != len(message):
        raise MalformedRow("malformed DataRow")
    return message if out is None else out
