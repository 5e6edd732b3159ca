"""Frames between the proxy and its ledger writer process (audit.ledger_process). Pure: no I/O.

Every frame is a type byte, the payload's length (u32, little endian) and the payload. The proxy
sends entries, statement shapes and reads; the writer answers with commit acknowledgements and
its counters. Reads are the hot path: a batch of reads is one frame of ``audit.read_records``
records, which name their shapes by an index into the frame's list of shape numbers (a shape's
text goes once per writer process, see ``ReadShape.wire``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HEADER = struct.Struct("<cI")

# proxy -> writer
CONFIG = b"C"  # JSON: the store, chain, key, settings; the first frame
ENTRY = b"E"  # u64 request (0: nobody waits), u8 block flag, the entry's JSON
SHAPE = b"S"  # u64 shape, u32 length of head, head, body (events.ReadShape's members)
READS = b"B"  # u32 reads, f64 earliest and latest decided at, u32 shapes, u64 each shape, the records
FORGET = b"F"  # u64 shape: no read will name it again
QUIT = b"Q"  # commit everything, sign the tail, exit

# writer -> proxy
READY = b"Y"  # the store is open and the chain's writer lock is held
FAILED = b"X"  # JSON {"message"}: the writer could not start
ACK = b"A"  # u64 request, u64 the entry's seq (0: the commit failed; the error follows as UTF-8)
STATS = b"M"  # JSON: the writer's counters

# Payload layouts, and the same with the frame header in front for one-call packing.
ENTRY_BODY = struct.Struct("<QB")
READS_BODY = struct.Struct("<IddI")
SHAPE_BODY = struct.Struct("<QI")
ACK_BODY = struct.Struct("<QQ")
U64 = struct.Struct("<Q")
ENTRY_HEAD = struct.Struct("<cI" + ENTRY_BODY.format[1:])
SHAPE_HEAD = struct.Struct("<cI" + SHAPE_BODY.format[1:])
ACK_HEAD = struct.Struct("<cI" + ACK_BODY.format[1:])
MAX_FRAME = 256 * 1024 * 1024  # a longer length is a corrupt stream, not a frame


class CorruptStream(ValueError):
    """The byte stream does not hold frames: the other side is not a dbguard ledger peer."""


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def entry(request: int, block: bool, data: bytes) -> bytes:
    return ENTRY_HEAD.pack(ENTRY, ENTRY_BODY.size + len(data), request, block) + data


def shape(number: int, head: bytes, body: bytes) -> bytes:
    return SHAPE_HEAD.pack(SHAPE, SHAPE_BODY.size + len(head) + len(body), number, len(head)) + head + body


def reads(count: int, earliest: float, latest: float, shapes: list[int], records: bytes | bytearray) -> bytes:
    """A batch of ``count`` reads: their records index ``shapes`` (shape numbers)."""
    numbers = struct.pack(f"<{len(shapes)}Q", *shapes)
    return (HEADER.pack(READS, READS_BODY.size + len(numbers) + len(records))
            + READS_BODY.pack(count, earliest, latest, len(shapes)) + numbers + records)


def reads_of(payload: bytes) -> tuple[int, float, float, tuple[int, ...], bytes]:
    """A READS payload: (count, earliest, latest, shape numbers, records)."""
    if len(payload) < READS_BODY.size:
        raise CorruptStream(f"a batch of reads of {len(payload)} bytes")
    count, earliest, latest, nshapes = READS_BODY.unpack_from(payload)
    start = READS_BODY.size + 8 * nshapes
    if len(payload) < start:
        raise CorruptStream(f"a batch of reads naming {nshapes} shapes in {len(payload)} bytes")
    return count, earliest, latest, struct.unpack_from(f"<{nshapes}Q", payload, READS_BODY.size), payload[start:]


def forget(number: int) -> bytes:
    return HEADER.pack(FORGET, 8) + U64.pack(number)


def ack(request: int, seq: int, error: str = "") -> bytes:
    text = error.encode()
    return ACK_HEAD.pack(ACK, ACK_BODY.size + len(text), request, seq) + text


class FrameReader:
    """Splits a byte stream into (type, payload) frames, however the reads cut it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The frames that ``data`` completes."""
        buf = self._buf
        buf += data
        view = memoryview(buf)
        pos, end = 0, len(buf)
        try:
            while end - pos >= HEADER.size:
                kind, length = HEADER.unpack_from(view, pos)
                if length > MAX_FRAME:
                    raise CorruptStream(f"a frame of {length} bytes")
                if end - pos - HEADER.size < length:
                    break
                start = pos + HEADER.size
                yield kind, bytes(view[start:start + length])
                pos = start + length
        finally:
            view.release()
            del buf[:pos]
