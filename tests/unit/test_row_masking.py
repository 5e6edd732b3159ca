"""DataRow masking: the compiled row masker, its Python twin and the relay's rows callback agree.

Every strategy, type and format, NULLs, non-ASCII and invalid UTF-8 values, malformed rows and
any split of the stream: the compiled masker must give byte for byte what the Python twin gives,
raise where it raises, and both must give what ``mask_value`` (the definition) gives for valid text.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard.masking import rows as R
from dbguard.masking.rows import MalformedRow, MaskPlan, mask_data_row
from dbguard.masking.rules import ColumnMask
from dbguard.masking.strategies import TEXT_TYPES, mask_value
from dbguard.pgwire import BackendRelay, RemoteProtocolError

KEY = b"k" * 32
STRATEGIES = [("email", ()), ("partial", (("keepFirst", 3), ("keepLast", 2))), ("partial", ()),
              ("partial", (("keepFirst", 0), ("keepLast", 0), ("fill", "#"))), ("partial", (("fill", "é"),)),
              ("partial", (("keepFirst", 2**62), ("keepLast", 2**62))),
              ("redact", ()), ("redact", (("with", "XX"),)), ("redact", (("with", "ñ"),)), ("hash", ()),
              ("hash", (("length", 8), ("prefix", "x:"))), ("null", ())]
TYPES = [25, 1043, 1042, 19, 705, 23, 20, 21, 16, 700, 701, 1700, 3802, 1082]
ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(str.encode)
VALUES = st.one_of(st.none(), ASCII, ASCII, st.binary(max_size=40), st.text(max_size=20).map(str.encode),
                   st.sampled_from([b"", b"@", b"a@b", b"x@y@z.org", b"\xff@\xfe", "ü@ñ.es".encode()]))


def datarow(values: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values)
    return b"D" + struct.pack("!i", len(body) + 4) + body


def fields_of(message: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", message, 5)
    pos, out = 7, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", message, pos)
        out.append(None if length < 0 else message[pos + 4:pos + 4 + length])
        pos += 4 + max(length, 0)
    assert pos == len(message)
    return out


def split(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(stream):
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        out.append(stream[pos:pos + 1 + length])
        pos += 1 + length
    return out


@st.composite
def plans(draw: st.DrawFn, width: int) -> MaskPlan:
    fields = []
    for i in range(width):
        if draw(st.booleans()):
            strategy, options = draw(st.sampled_from(STRATEGIES))
            fields.append((i, ColumnMask(strategy, options, "t/masking[0]"), draw(st.sampled_from(TYPES)),
                           draw(st.booleans())))
    return MaskPlan(tuple(fields), tuple(f"c{i}" for i, *_ in fields))


def both(data: bytes, pos: int, end: int, max_len: int, steps: tuple) -> object:
    """The compiled masker's answer, checked against the Python twin's."""
    results = []
    for impl in (R._mask_rows_c, R._mask_rows_py):
        try:
            results.append(impl(data, pos, end, max_len, steps, MalformedRow) if impl is R._mask_rows_c
                           else impl(data, pos, end, max_len, steps))
        except MalformedRow as exc:
            results.append(("raised", str(exc)))
    assert results[0] == results[1]
    return results[0]


def test_the_compiled_row_masker_is_built():
    # make venv and the image build it; without it masking runs ~30x slower (docs/performance.md)
    assert R._mask_rows_c is not None


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_compiled_and_python_maskers_agree_and_follow_the_definition(data):
    width = data.draw(st.integers(1, 6))
    plan = data.draw(plans(width))
    rows = data.draw(st.lists(st.lists(VALUES, min_size=width, max_size=width), min_size=1, max_size=4))
    stream = b"".join(datarow(r) for r in rows) + b"C\x00\x00\x00\x0dSELECT 3\x00"
    steps = plan.compile(KEY)
    out, after, count = both(stream, 0, len(stream), 1 << 30, steps)
    assert count == len(rows) and stream[after:after + 1] == b"C"
    if not plan:
        assert out is None
        return
    masked = {i: (mask, typ, binary) for i, mask, typ, binary in plan.fields}
    for message, values in zip(split(out), rows, strict=True):
        for i, (got, value) in enumerate(zip(fields_of(message), values, strict=True)):
            if i not in masked or value is None:
                assert got == value  # unmasked fields and NULLs pass as they came
                continue
            mask, typ, binary = masked[i]
            try:
                text_ok = value.decode("utf-8") is not None
            except UnicodeDecodeError:
                text_ok = False
            if text_ok or typ not in TEXT_TYPES:
                assert got == mask_value(mask.strategy, mask.opts, value, typ, binary, KEY)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_malformed_and_partial_input_is_handled_alike(data):
    width = data.draw(st.integers(1, 4))
    plan = data.draw(plans(width))
    rows = data.draw(st.lists(st.lists(VALUES, min_size=width, max_size=width), min_size=1, max_size=3))
    stream = bytearray(b"".join(datarow(r) for r in rows))
    for _ in range(data.draw(st.integers(0, 3))):  # corrupt some bytes
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    stream = bytes(stream)
    end = data.draw(st.integers(0, len(stream)))
    pos = data.draw(st.integers(0, end))
    both(stream, pos, end, data.draw(st.sampled_from([1 << 30, 64, 4])), plan.compile(KEY))


@pytest.mark.parametrize("message", [
    datarow([b"a", b"b"])[:-1],  # shortened: the last field overruns the message
    b"D\x00\x00\x00\x0a\x00\x02\x00\x00\x00\x09x",  # a field longer than the message
    b"D\x00\x00\x00\x0e\x00\x02\xff\xff\xff\xfe\x00\x00\x00\x00",  # a field length of -2
    b"D\x00\x00\x00\x05\x00",  # no room for the field count
    datarow([b"only one"]),  # fewer fields than the masked index
])
def test_a_malformed_data_row_is_a_protocol_error(message):
    message = message[:1] + struct.pack("!i", len(message) - 1) + message[5:]
    plan = MaskPlan(((1, ColumnMask("redact", (), "r"), 25, False),), ("c1",))
    with pytest.raises(MalformedRow):
        mask_data_row(message[5:], plan, KEY)
    saved = R._mask_rows_c
    try:
        R._mask_rows_c = None
        with pytest.raises(MalformedRow):
            mask_data_row(message[5:], plan, KEY)
    finally:
        R._mask_rows_c = saved
    relay = BackendRelay(lambda t, p: None)
    relay.watch_rows(lambda d, p, e: plan.rows(d, p, e, 1 << 30, KEY)[:2])
    with pytest.raises(RemoteProtocolError):
        relay.feed(message)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_rows_callback_gives_what_the_per_message_callback_gives_for_any_split(data):
    width = data.draw(st.integers(1, 5))
    plan = data.draw(plans(width))
    rows = data.draw(st.lists(st.lists(VALUES, min_size=width, max_size=width), min_size=0, max_size=6))
    stream = (b"T\x00\x00\x00\x06\x00\x00" + b"".join(datarow(r) for r in rows) + b"C\x00\x00\x00\x0dSELECT 1\x00"
              + b"".join(datarow(r) for r in rows[:2]) + b"Z\x00\x00\x00\x05I")
    seen: list[int] = []

    def per_message(type_code: int, payload: bytes) -> bytes | None:
        seen.append(type_code)
        return mask_data_row(payload, plan, KEY) if type_code == 0x44 else None

    reference = BackendRelay(per_message)
    reference.watch_rows()
    expected = reference.feed(stream)
    expected_seen = [t for t in seen if t != 0x44]
    seen.clear()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    relay = BackendRelay(per_message)
    relay.watch_rows(lambda d, p, e: plan.rows(d, p, e, 1 << 30, KEY)[:2])
    out = b"".join(relay.feed(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True))
    assert out == expected
    assert seen == expected_seen  # DataRows went to the rows callback, everything else as before


def test_rows_the_rows_callback_leaves_go_to_the_message_callback():
    seen = []
    relay = BackendRelay(lambda t, p: seen.append(chr(t)) or (b"<fatal>" if t == 0x44 else None))
    relay.watch_rows(lambda d, p, e: (None, p))  # e.g. no plan for this result: the DataRow callback decides
    out = relay.feed(datarow([b"x"]) + b"Z\x00\x00\x00\x05I")
    assert out == b"<fatal>Z\x00\x00\x00\x05I" and seen == ["D", "Z"]


def test_an_oversized_data_row_is_still_refused_by_the_relay():
    relay = BackendRelay(lambda t, p: None)
    relay.watch_rows(lambda d, p, e: MaskPlan((), ()).rows(d, p, e, 16, KEY)[:2])
    relay._max = 16
    with pytest.raises(RemoteProtocolError):
        relay.feed(datarow([b"x" * 40]))
