"""The backend relay streams results through and replaces only watched messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard.pgwire import BackendRelay, RemoteProtocolError


def typed(code: bytes, payload: bytes) -> bytes:
    return code + struct.pack("!i", len(payload) + 4) + payload


STREAM = (typed(b"T", b"\x00\x01a\x00" + b"\x00" * 18) + typed(b"D", b"\x00\x01\x00\x00\x00\x03abc")
          + typed(b"C", b"SELECT 1\x00") + typed(b"E", b"SERROR\x00Mboom\x00\x00") + typed(b"Z", b"I"))


def test_passes_bytes_through_unchanged_and_reports_watched_messages():
    seen = []
    relay = BackendRelay(lambda t, p: seen.append((chr(t), p)))
    assert relay.feed(STREAM) == STREAM
    assert [t for t, _ in seen] == ["C", "E", "Z"]
    assert seen[-1] == ("Z", b"I")


def test_replaces_a_watched_message():
    relay = BackendRelay(lambda t, p: b"<replaced>" if t == ord("E") else None)
    out = relay.feed(STREAM)
    assert out == STREAM.replace(typed(b"E", b"SERROR\x00Mboom\x00\x00"), b"<replaced>")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_output(data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(STREAM)), max_size=6)))
    relay = BackendRelay(lambda t, p: b"!" if t == ord("E") else None)
    out = b"".join(relay.feed(STREAM[a:b]) for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True))
    assert out == BackendRelay(lambda t, p: b"!" if t == ord("E") else None).feed(STREAM)


def test_large_data_rows_stream_through_without_being_held():
    relay = BackendRelay(lambda t, p: None)
    big = typed(b"D", b"x" * 1_000_000)
    assert relay.feed(big[:1000]) == big[:1000]  # forwarded before the message is complete
    assert relay.feed(big[1000:]) == big[1000:]


def test_invalid_length_from_the_server_is_an_error():
    with pytest.raises(RemoteProtocolError):
        BackendRelay(lambda t, p: None).feed(b"Z\x00\x00\x00\x01I")
