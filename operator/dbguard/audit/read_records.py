"""The binary records of reads in a packed block entry. Pure: no I/O.

The proxy packs each read it sends to its ledger writer process as one record, and the writer
stores a batch's records as they came (base64 in the block's ``packed`` member): the writer does
no work per read. ``search.block_reads`` turns them back into decision events.

A record is ``RECORD`` (the read's shape as an index into the block's ``shapes``, the time it
was decided in epoch seconds, its statement number, its duration in µs, and a tag length),
followed by the tag (ASCII, at most ``MAX_TAG`` bytes) for a read that ran with one command tag,
no error, nothing masked and a duration under ``MAX_DURATION``, or, when the length byte is
``WHOLE``, by a u32 length and the read's completion as JSON (errors, masked columns, several
tags, not executed, longer than 71 minutes). A batch names at most ``MAX_SHAPES`` shapes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

RECORD = struct.Struct("<HdQIB")  # 23 bytes
WHOLE = 255  # the length byte of a record whose completion follows as JSON
MAX_TAG = WHOLE - 1
MAX_DURATION = 2**32 - 1  # µs
MAX_SHAPES = 2**16
LENGTH = struct.Struct("<I")
MAX_TIME = 2.0**33  # epoch seconds (the year 2242): an f64 holds times to the µs below it


class CorruptRecords(ValueError):
    """The bytes do not hold whole read records."""


def whole(index: int, when: float, stmt: int, completion: bytes) -> bytes:
    """The record of a read whose completion is kept as JSON."""
    return RECORD.pack(index, when, stmt, 0, WHOLE) + LENGTH.pack(len(completion)) + completion


def check(data: bytes, count: int, shapes: int, earliest: float, latest: float) -> None:
    """Raise ``CorruptRecords`` unless ``data`` is exactly ``count`` whole records, each naming one
    of ``shapes`` shapes, decided between ``earliest`` and ``latest``, with an ASCII tag or a JSON
    object: what a block that keeps the records as they came must hold to read back as they were.

    It walks the records itself rather than through ``records()``: it decodes no tag and builds no
    tuple per read (the writer process checks every read; ~0.25 µs each here)."""
    pos, end, n, unpack, length_of, loads = 0, len(data), 0, RECORD.unpack_from, LENGTH.unpack_from, orjson.loads
    fixed = RECORD.size
    if not 0.0 <= earliest <= latest < MAX_TIME:
        raise CorruptRecords(f"a batch of reads decided from {earliest} to {latest}")
    while pos < end:
        if end - pos < fixed:
            raise CorruptRecords(f"{end - pos} bytes at offset {pos} are not a read record")
        index, when, _, _, length = unpack(data, pos)
        if index >= shapes:
            raise CorruptRecords(f"a read at offset {pos} names shape {index} of {shapes}")
        if not earliest <= when <= latest:
            raise CorruptRecords(f"a read at offset {pos} was decided at {when}, not in {earliest}..{latest}")
        pos += fixed
        if length == WHOLE:
            if end - pos < LENGTH.size:
                raise CorruptRecords(f"a completion's length is cut off at offset {pos}")
            (length,) = length_of(data, pos)
            pos += LENGTH.size
            if end - pos < length:
                raise CorruptRecords(f"a completion of {length} bytes is cut off at offset {pos}")
            if type(loads(data[pos:pos + length])) is not dict:  # (orjson.JSONDecodeError is a ValueError)
                raise CorruptRecords(f"the completion at offset {pos} is not a JSON object")
        elif end - pos < length or not data[pos:pos + length].isascii():
            raise CorruptRecords(f"the tag of {length} bytes at offset {pos} is cut off or not ASCII")
        pos += length
        n += 1
    if n != count:
        raise CorruptRecords(f"{n} read records where the batch says {count}")


def records(data: bytes) -> Iterator[tuple[int, float, int, int, str | dict[str, Any]]]:
    """(shape index, decided at, stmt, duration µs, tag or completion) for each record."""
    pos, end, fixed, unpack = 0, len(data), RECORD.size, RECORD.unpack_from
    while pos < end:
        if end - pos < fixed:
            raise CorruptRecords(f"{end - pos} bytes at offset {pos} are not a read record")
        index, when, stmt, duration, length = unpack(data, pos)
        pos += fixed
        if length == WHOLE:
            if end - pos < LENGTH.size:
                raise CorruptRecords(f"a completion's length is cut off at offset {pos}")
            (length,) = LENGTH.unpack_from(data, pos)
            pos += LENGTH.size
            if end - pos < length:
                raise CorruptRecords(f"a completion of {length} bytes is cut off at offset {pos}")
            yield index, when, stmt, duration, orjson.loads(data[pos:pos + length])
        else:
            if end - pos < length:
                raise CorruptRecords(f"a tag of {length} bytes is cut off at offset {pos}")
            yield index, when, stmt, duration, data[pos:pos + length].decode("ascii")
        pos += length
