"""Frames between the proxy and its ledger writer process: split anywhere, refused when corrupt."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbguard.audit import ledger_wire as wire
from dbguard.audit import read_records


def _frames() -> list[tuple[bytes, bytes]]:
    records = (read_records.RECORD.pack(0, 1764124800.123456, 42, 1500, 8) + b"SELECT 1"
               + read_records.whole(1, 1764124801.5, 43, b'{"stmt":43,"status":"error"}'))
    return [(wire.ENTRY, wire.entry(3, True, b'{"kind":"decision"}')),
            (wire.SHAPE, wire.shape(7, b'"session":"s"', b'"statement":"SELECT 1"')),
            (wire.READS, wire.reads(2, 1764124800.123456, 1764124801.5, [7, 9], records)),
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
    count, earliest, latest, shapes, records = wire.reads_of(got[2][1])
    assert (count, earliest, latest, shapes) == (2, 1764124800.123456, 1764124801.5, (7, 9))
    assert list(read_records.records(records)) == [(0, 1764124800.123456, 42, 1500, "SELECT 1"),
                                                   (1, 1764124801.5, 43, 0, {"stmt": 43, "status": "error"})]
    assert wire.U64.unpack(got[3][1]) == (7,)
    assert wire.ACK_BODY.unpack_from(got[4][1]) == (3, 99)


def test_a_length_no_frame_can_have_is_a_corrupt_stream():
    with pytest.raises(wire.CorruptStream):
        list(wire.FrameReader().feed(wire.HEADER.pack(b"R", wire.MAX_FRAME + 1)))


def test_a_batch_of_reads_shorter_than_its_shape_list_is_a_corrupt_stream():
    payload = wire.reads(1, 0.0, 0.0, [1, 2, 3], b"")[wire.HEADER.size:]
    with pytest.raises(wire.CorruptStream):
        wire.reads_of(payload[:wire.READS_BODY.size + 8])
    with pytest.raises(wire.CorruptStream):
        wire.reads_of(payload[:3])


@given(st.lists(st.tuples(st.integers(0, read_records.MAX_SHAPES - 1), st.floats(0, 4e9), st.integers(0, 2**64 - 1),
                          st.integers(0, read_records.MAX_DURATION), st.text(alphabet=st.characters(max_codepoint=127), max_size=254)),
                max_size=20),
       st.integers(min_value=0))
def test_read_records_come_back_as_packed_and_a_cut_record_is_refused(reads, cut):
    packed = [read_records.RECORD.pack(i, t, s, d, len(tag)) + tag.encode() for i, t, s, d, tag in reads]
    data = b"".join(packed)
    assert list(read_records.records(data)) == reads
    times = [t for _, t, _, _, _ in reads] or [0.0]
    read_records.check(data, len(reads), read_records.MAX_SHAPES, min(times), max(times))  # what the writer stores
    boundaries = {sum(map(len, packed[:n])) for n in range(len(packed) + 1)}
    inside = [n for n in range(len(data)) if n not in boundaries]
    if inside:
        with pytest.raises(read_records.CorruptRecords):
            list(read_records.records(data[:inside[cut % len(inside)]]))
        with pytest.raises(read_records.CorruptRecords):
            read_records.check(data[:inside[cut % len(inside)]], len(reads), read_records.MAX_SHAPES, 0.0, 4e9)
