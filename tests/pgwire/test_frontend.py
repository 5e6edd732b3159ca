"""The frontend parser: framing, decoding, caps; table-driven plus a hypothesis fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard.pgwire import NEED_DATA, FrontendParser, Phase, RemoteProtocolError
from dbguard.pgwire import messages as m


def typed(code: bytes, payload: bytes) -> bytes:
    return code + struct.pack("!i", len(payload) + 4) + payload


def started(**kw: int) -> FrontendParser:
    p = FrontendParser(**kw)
    p.receive_data(m.encode_startup({"user": "alice", "database": "app"}))
    assert isinstance(p.next_message(), m.StartupMessage)
    return p


def test_startup_message_decodes_parameters_and_switches_to_typed_phase():
    p = FrontendParser()
    p.receive_data(m.encode_startup({"user": "alice", "database": "app", "application_name": "psql"}))
    msg = p.next_message()
    assert msg == m.StartupMessage(protocol=m.PROTOCOL_VERSION_3,
                                   params={"user": "alice", "database": "app", "application_name": "psql"})
    assert p.phase is Phase.TYPED


@pytest.mark.parametrize("packet, expected", [
    (m.encode_ssl_request(), m.SSLRequest()),
    (struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE), m.GSSENCRequest()),
    (m.encode_cancel_request(42, 7), m.CancelRequest(process_id=42, secret_key=7)),
])
def test_special_startup_packets(packet, expected):
    p = FrontendParser()
    p.receive_data(packet)
    assert p.next_message() == expected
    assert p.phase is Phase.STARTUP


@pytest.mark.parametrize("packet, error", [
    (struct.pack("!i", 10_001) + b"\x00" * 10, "invalid startup packet length 10001"),
    (struct.pack("!i", 4) + b"\x00" * 4, "invalid startup packet length 4"),
    (struct.pack("!ii", 9, 2 << 16) + b"\x00", "unsupported frontend protocol 2.0"),
    (struct.pack("!ii", 12, m.PROTOCOL_VERSION_3) + b"user", "not terminated"),
    (struct.pack("!ii", 13, m.PROTOCOL_VERSION_3) + b"user\x00", "without a value"),
])
def test_bad_startup_packets_are_remote_errors(packet, error):
    p = FrontendParser()
    p.receive_data(packet)
    with pytest.raises(RemoteProtocolError, match=error):
        p.next_message()


def test_truncated_frames_wait_for_more_data_byte_by_byte():
    p = started()
    raw = typed(b"Q", b"SELECT 1\x00")
    for b in raw[:-1]:
        p.receive_data(bytes([b]))
        assert p.next_message() is NEED_DATA
    p.receive_data(raw[-1:])
    assert p.next_message() == m.Query(raw=raw, sql=b"SELECT 1")


@pytest.mark.parametrize("raw, expected", [
    (typed(b"P", b"s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"),
     dict(cls=m.Parse, name="s1", sql=b"SELECT $1", param_types=(23,))),
    (typed(b"B", b"p\x00s1\x00\x00\x01\x00\x01\x00\x02\x00\x00\x00\x01x\xff\xff\xff\xff\x00\x01\x00\x01"),
     dict(cls=m.Bind, portal="p", statement="s1", param_formats=(1,), params=(b"x", None), result_formats=(1,))),
    (typed(b"E", b"p\x00\x00\x00\x00\x0a"), dict(cls=m.Execute, portal="p", max_rows=10)),
    (typed(b"D", b"Ss1\x00"), dict(cls=m.Describe, kind="S", name="s1")),
    (typed(b"C", b"Pp\x00"), dict(cls=m.Close, kind="P", name="p")),
    (typed(b"S", b""), dict(cls=m.Sync)),
    (typed(b"H", b""), dict(cls=m.Flush)),
    (typed(b"X", b""), dict(cls=m.Terminate)),
    (typed(b"F", b"\x00\x00\x00\x01"), dict(cls=m.FunctionCall)),
    (typed(b"z", b"abc"), dict(cls=m.UnknownMessage, type_code="z")),
])
def test_typed_messages_decode(raw, expected):
    p = started()
    p.receive_data(raw)
    msg = p.next_message()
    cls = expected.pop("cls")
    assert type(msg) is cls
    assert msg.raw == raw
    for k, v in expected.items():
        assert getattr(msg, k) == v


@pytest.mark.parametrize("raw, error", [
    (typed(b"Q", b"SELECT 1"), "unterminated query string"),
    (typed(b"Q", b"SELECT\x001\x00"), "NUL byte inside"),
    (typed(b"P", b"s1\x00SELECT 1"), "unterminated string"),
    (typed(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09ab"), "truncated"),
    (typed(b"E", b"\x00\x00\x00\x00\x00\x01"), "trailing bytes"),
    (typed(b"D", b"Xname\x00"), "unknown target"),
    (b"Q" + struct.pack("!i", 2), "invalid message length 2"),
])
def test_malformed_typed_messages_are_remote_errors(raw, error):
    p = started()
    p.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=error):
        p.next_message()


def test_oversized_message_is_refused_before_it_is_buffered():
    p = started(max_message_size=1000)
    p.receive_data(b"Q" + struct.pack("!i", 5000))  # only the header has arrived
    with pytest.raises(RemoteProtocolError, match="over the 1000-byte limit") as exc:
        p.next_message()
    assert exc.value.sqlstate == "54000"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_give_messages_need_data_or_a_remote_error(data, startup_first):
    p = started() if startup_first else FrontendParser()
    p.receive_data(data)
    for _ in range(100):
        try:
            msg = p.next_message()
        except RemoteProtocolError:
            return
        if msg is NEED_DATA:
            return


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=8), st.data())
def test_splitting_the_stream_anywhere_gives_the_same_messages(payloads, data):
    stream = b"".join(typed(b"Q", p.replace(b"\x00", b"") + b"\x00") for p in payloads)
    whole = started()
    whole.receive_data(stream)
    expected = []
    while (msg := whole.next_message()) is not NEED_DATA:
        expected.append(msg)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    split = started()
    got = []
    for piece in pieces:
        split.receive_data(piece)
        while (msg := split.next_message()) is not NEED_DATA:
            got.append(msg)
    assert got == expected
