"""Frames between the proxy and its ledger writer process: split anywhere, refused when corrupt."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbguard.audit import ledger_wire as wire


def _frames() -> list[tuple[bytes, bytes]]:
    read = wire.READ_HEAD.pack(wire.READ, wire.READ_BODY.size + 8, 7, 1764124800.123456, 42, 1500) + b"SELECT 1"
    return [(wire.ENTRY, wire.entry(3, True, b'{"kind":"decision"}')),
            (wire.SHAPE, wire.shape(7, b'"session":"s"', b'"statement":"SELECT 1"')),
            (wire.READ, read),
            (wire.FORGET, wire.forget(7)),
            (wire.ACK, wire.ack(3, 99, "")),
            (wire.QUIT, wire.frame(wire.QUIT, b""))]


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_frames_come_out_whole_however_the_stream_is_cut(cuts):
    stream = b"".join(f for _, f in _frames())
    points = sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]
    reader, got, start = wire.FrameReader(), [], 0
    for point in points:
        got += list(reader.feed(stream[start:point]))
        start = point
    assert [kind for kind, _ in got] == [kind for kind, _ in _frames()]
    entry = got[0][1]
    assert wire.ENTRY_BODY.unpack_from(entry) == (3, 1) and entry[wire.ENTRY_BODY.size:] == b'{"kind":"decision"}'
    number, head_len = wire.SHAPE_BODY.unpack_from(got[1][1])
    rest = got[1][1][wire.SHAPE_BODY.size:]
    assert number == 7 and rest[:head_len] == b'"session":"s"' and rest[head_len:] == b'"statement":"SELECT 1"'
    assert wire.READ_BODY.unpack_from(got[2][1]) == (7, 1764124800.123456, 42, 1500)
    assert got[2][1][wire.READ_BODY.size:] == b"SELECT 1"
    assert wire.U64.unpack(got[3][1]) == (7,)
    assert wire.ACK_BODY.unpack_from(got[4][1]) == (3, 99)


def test_a_length_no_frame_can_have_is_a_corrupt_stream():
    with pytest.raises(wire.CorruptStream):
        list(wire.FrameReader().feed(wire.HEADER.pack(b"R", wire.MAX_FRAME + 1)))
