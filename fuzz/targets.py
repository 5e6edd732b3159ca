"""Fuzz targets: one function per target, ``bytes -> None``, raising only when dbguard is wrong.

They do not import atheris, so the same functions run under atheris (``python -m fuzz``), under
hypothesis (tests/hostile/test_fuzz.py, when atheris is not installed) and as regression tests
(replaying saved inputs). A target fails with ``AssertionError`` when an invariant is broken and
lets any exception dbguard does not document escape: both are crashes to the fuzzer.

``pgwire``  the sans-IO wire code: ``FrontendParser`` (start-up packets and every typed message,
            size caps, any chunking), ``BackendRelay`` / ``BackendStartupReader`` and
            ``decode_error_fields`` (what the server sends); with rows watched, the compiled DataRow
            masker and its Python twin must agree on every run of rows (output or refusal).
``analyze`` the statement analyzer: ``analyze.analyze``, ``recorded_text`` and the session's
            ``FactsCache`` paths must raise nothing but ``AnalysisError`` for any text, agree with
            each other, and a cache hit under a normalized key must give the facts a fresh
            analysis gives.
"""

from __future__ import annotations

import contextlib
import struct

import orjson

from dbguard import analyze
from dbguard.analyze import facts as F
from dbguard.masking import rows as mask_rows
from dbguard.masking.rules import ColumnMask
from dbguard.pgwire import (
    NEED_DATA,
    BackendRelay,
    BackendStartupReader,
    FrontendParser,
    Phase,
    RemoteProtocolError,
)
from dbguard.pgwire import messages as m
from dbguard.pgwire.backend import MAX_BACKEND_CONTROL_MESSAGE, MAX_DATA_ROW, WATCHED
from dbguard.pgwire.frontend import DEFAULT_MAX_MESSAGE, MAX_STARTUP_PACKET
from dbguard.session.guard import FactsCache

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")

# -- pgwire ----------------------------------------------------------------------------------------
#
# Input layout: two header bytes, then the stream.
#   byte 0, bit 0: start in the typed phase (a StartupMessage was already read)
#           bits 1-2: the size cap: 64 MiB (the default), 4096, 64 or 5 bytes
#           bit 3: backend mode (BackendRelay / BackendStartupReader / decode_error_fields)
#           bit 4: backend mode: also watch rows (masking)
#           bit 5: repeat the stream 64 times (long streams reach the parser's buffer compaction)
#   byte 1: chunk size - 1 for feeding the stream in pieces (255: all at once)
# Seeds from real traffic start with b"\x00\xff".

CAPS = (DEFAULT_MAX_MESSAGE, 4096, 64, 5)
SQLSTATES_OF_PARSER = frozenset({"08P01", "54000", "0A000"})
_STARTUP_TYPES = (m.StartupMessage, m.SSLRequest, m.GSSENCRequest, m.CancelRequest)


def pgwire(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, step, stream = data[0], data[1] + 1, data[2:]
    if flags & 0x20:
        stream *= 64
        step *= 64
    if flags & 0x08:
        return _backend(stream, step, watch_rows=bool(flags & 0x10))
    typed = bool(flags & 0x01)
    cap = CAPS[(flags >> 1) & 0x03]
    whole = _frontend(stream, typed, cap, len(stream) or 1)
    if step < 256 or flags & 0x20:
        pieces = _frontend(stream, typed, cap, step)
        assert pieces == whole, f"chunks of {step} bytes decode differently from the whole stream"
    return None


def _frontend(stream: bytes, typed: bool, cap: int, step: int) -> tuple[list[object], tuple[str, str] | None]:
    parser = FrontendParser(max_message_size=cap)
    if typed:
        parser.receive_data(m.encode_startup({"user": "u", "database": "d"}))
        assert isinstance(parser.next_message(), m.StartupMessage)
    out: list[object] = []
    consumed = 0  # bytes of ``stream`` the returned messages account for
    fed = 0
    while fed < len(stream):
        chunk = stream[fed : fed + step]
        fed += len(chunk)
        parser.receive_data(chunk)
        assert parser.buffered == fed - consumed
        while True:
            phase = parser.phase
            try:
                msg = parser.next_message()
            except RemoteProtocolError as exc:
                assert exc.sqlstate in SQLSTATES_OF_PARSER, exc.sqlstate
                assert str(exc)
                return out, (type(exc).__name__, str(exc))
            if msg is NEED_DATA:
                _check_need_data(stream[consumed:fed], phase, cap)
                break
            consumed += _check_message(msg, stream[consumed:fed], phase, cap)
            out.append(msg)
            assert parser.buffered == fed - consumed
    return out, None


def _check_need_data(rest: bytes, phase: Phase, cap: int) -> None:
    """NEED_DATA only when no whole (and acceptable) packet is buffered."""
    if phase is Phase.STARTUP:
        if len(rest) >= 4:
            (length,) = _I32.unpack_from(rest)
            assert 8 <= length <= MAX_STARTUP_PACKET and len(rest) < length, "a whole start-up packet waits"
        return
    if len(rest) >= 5:
        (length,) = _I32.unpack_from(rest, 1)
        assert length >= 4 and length + 1 <= cap and len(rest) < length + 1, "a whole message waits"


def _check_message(msg: object, rest: bytes, phase: Phase, cap: int) -> int:
    """Check one decoded message against the bytes it came from; return how many bytes it took."""
    if phase is Phase.STARTUP:
        assert isinstance(msg, _STARTUP_TYPES), type(msg)
        (length,) = _I32.unpack_from(rest)
        assert 8 <= length <= MAX_STARTUP_PACKET
        if isinstance(msg, m.StartupMessage):
            assert msg.protocol >> 16 == 3
            for k, v in msg.params.items():
                assert k and "\x00" not in k and "\x00" not in v
            again = FrontendParser()
            again.receive_data(m.encode_startup(msg.params))
            assert again.next_message() == m.StartupMessage(protocol=m.PROTOCOL_VERSION_3, params=msg.params)
        elif isinstance(msg, m.SSLRequest):
            assert rest[:8] == m.encode_ssl_request()
        elif isinstance(msg, m.CancelRequest):
            assert rest[:16] == m.encode_cancel_request(msg.process_id, msg.secret_key)
        return length
    assert isinstance(msg, m.FrontendMessage), type(msg)
    raw = msg.raw
    assert rest.startswith(raw), "raw is not the bytes received"
    assert len(raw) >= 5 and _I32.unpack_from(raw, 1)[0] == len(raw) - 1
    assert len(raw) <= cap, f"a {len(raw)}-byte message passed the {cap}-byte cap"
    encoded = _encode(msg)
    if encoded is not None:
        assert encoded == raw, f"{type(msg).__name__} does not round-trip: {encoded!r} != {raw!r}"
    return len(raw)


def _cstr(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    assert b"\x00" not in b
    return b + b"\x00"


def _frame(code: bytes, payload: bytes) -> bytes:
    return code + _I32.pack(len(payload) + 4) + payload


def _encode(msg: object) -> bytes | None:
    """Re-encode a decoded message from its fields alone (None: the type keeps no fields)."""
    if isinstance(msg, m.Query):
        return _frame(b"Q", _cstr(msg.sql))
    if isinstance(msg, m.Parse):
        return _frame(b"P", _cstr(msg.name) + _cstr(msg.sql) + _I16.pack(len(msg.param_types))
                      + b"".join(_I32.pack(t) for t in msg.param_types))
    if isinstance(msg, m.Bind):
        parts = [_cstr(msg.portal), _cstr(msg.statement), _I16.pack(len(msg.param_formats)),
                 *(_I16.pack(f) for f in msg.param_formats), _I16.pack(len(msg.params))]
        parts += [_I32.pack(-1) if p is None else _I32.pack(len(p)) + p for p in msg.params]
        parts += [_I16.pack(len(msg.result_formats)), *(_I16.pack(f) for f in msg.result_formats)]
        return _frame(b"B", b"".join(parts))
    if isinstance(msg, m.Execute):
        return _frame(b"E", _cstr(msg.portal) + _I32.pack(msg.max_rows))
    if isinstance(msg, m.Describe | m.Close):
        assert msg.kind in ("S", "P")
        return _frame(b"D" if isinstance(msg, m.Describe) else b"C", msg.kind.encode() + _cstr(msg.name))
    if isinstance(msg, m.Sync | m.Flush | m.Terminate | m.CopyDone):
        code = {m.Sync: b"S", m.Flush: b"H", m.Terminate: b"X", m.CopyDone: b"c"}[type(msg)]
        return _frame(code, b"")
    if isinstance(msg, m.CopyFail):
        return _frame(b"f", _cstr(msg.message))
    if isinstance(msg, m.PasswordMessage):
        return _frame(b"p", msg.data)
    if isinstance(msg, m.UnknownMessage):
        assert msg.type_code not in "QPBEDCSHXpdcfF", f"known type {msg.type_code!r} decoded as unknown"
        return None
    assert isinstance(msg, m.CopyData | m.FunctionCall), type(msg)
    return None


def _frames(stream: bytes, watched: frozenset[int], cap: int) -> tuple[list[tuple[int, bytes]], bool]:
    """Reference framing of server output: whole frames, and whether a frame the relay must refuse follows."""
    frames = []
    pos = 0
    while len(stream) - pos >= 5:
        code = stream[pos]
        (length,) = _I32.unpack_from(stream, pos + 1)
        if length < 4 or (code in watched and length > cap):
            return frames, True
        if pos + 1 + length > len(stream):
            break
        frames.append((code, stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return frames, False


def _backend(stream: bytes, step: int, *, watch_rows: bool) -> None:
    watched = WATCHED | frozenset(b"TnDHdc") if watch_rows else WATCHED
    cap = MAX_DATA_ROW if watch_rows else MAX_BACKEND_CONTROL_MESSAGE
    frames, bad = _frames(stream, watched, cap)

    # BackendRelay: bytes through unchanged, except watched messages the callback replaces.
    def run(piece: int) -> tuple[bytes, list[tuple[int, bytes]], bool]:
        seen: list[tuple[int, bytes]] = []

        def on_watched(code: int, payload: bytes) -> bytes | None:
            seen.append((code, payload))
            if code == 0x45:  # ErrorResponse: parsed and rebuilt as the masking session does
                fields = m.decode_error_fields(payload)
                assert all(len(k) == 1 for k in fields)
                return m.encode_error_fields(b"E", fields)
            return b"" if code == 0x43 else None  # drop CommandComplete: replacements work

        relay = BackendRelay(on_watched)
        if watch_rows:
            relay.watch_rows()
        out = []
        try:
            for i in range(0, len(stream), piece):
                out.append(relay.feed(stream[i : i + piece]))
        except RemoteProtocolError:
            return b"".join(out), seen, True
        return b"".join(out), seen, False

    whole_out, whole_seen, whole_err = run(len(stream) or 1)
    assert whole_err == bad, "the relay accepted a frame it must refuse, or refused a good one"
    assert whole_seen == [f for f in frames if f[0] in watched]
    if not bad:
        expected = b"".join(b"" if c == 0x43 else _rebuilt(p) if c == 0x45 else _frame(bytes([c]), p)
                            for c, p in frames)
        rest = stream[sum(5 + len(p) for _, p in frames):]
        # what follows the whole frames: a pass-through message streams on, a watched one waits whole
        expected += rest if len(rest) >= 5 and rest[0] not in watched else b""
        assert whole_out == expected, "the relay changed bytes it was not asked to change"
    if step < len(stream):
        split_out, split_seen, split_err = run(step)
        assert split_err == whole_err and split_seen == whole_seen
        if not whole_err:
            assert split_out == whole_out, "the relay's output depends on how the server's bytes were split"

    if watch_rows:
        _row_maskers_agree(stream, [0, *(pos for pos, _ in _starts(frames))])

    # BackendStartupReader: whole messages up to 1 MiB each.
    reader = BackendStartupReader()
    reader.receive_data(stream)
    got = []
    try:
        while (msg := reader.next_message()) is not None:
            got.append(msg)
    except RemoteProtocolError:
        pass
    ref, _ = _frames(stream, frozenset(range(256)), MAX_BACKEND_CONTROL_MESSAGE)
    assert got == [(chr(c), p) for c, p in ref]


def _starts(frames: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for code, payload in frames:
        pos += 5 + len(payload)
        out.append((pos, code))
    return out


_FUZZ_STEPS = mask_rows.MaskPlan((
    (1, ColumnMask("email", (), "fuzz"), 25, False),
    (2, ColumnMask("partial", (("keepFirst", 1), ("keepLast", 2)), "fuzz"), 1043, True),
    (3, ColumnMask("hash", (), "fuzz"), 25, False),
    (5, ColumnMask("redact", (), "fuzz"), 23, True)), ()).compile(b"fuzz-key")


def _row_maskers_agree(stream: bytes, starts: list[int]) -> None:
    if mask_rows._mask_rows_c is None:
        return
    for pos in starts:
        for steps in (_FUZZ_STEPS, ()):
            answers = []
            for compiled in (True, False):
                try:
                    answers.append(mask_rows._mask_rows_c(stream, pos, len(stream), 1 << 20, steps,
                                                          mask_rows.MalformedRow) if compiled
                                   else mask_rows._mask_rows_py(stream, pos, len(stream), 1 << 20, steps))
                except mask_rows.MalformedRow as exc:
                    answers.append(str(exc))
            assert answers[0] == answers[1], "the compiled DataRow masker and its Python twin disagree"


def _rebuilt(payload: bytes) -> bytes:
    return m.encode_error_fields(b"E", m.decode_error_fields(payload))


# -- analyze ---------------------------------------------------------------------------------------
#
# Input layout: SQL texts separated by NUL bytes (a client cannot send a NUL inside SQL); invalid
# UTF-8 is replaced, as it never reaches the analyzer (the session refuses it first). Two texts in
# one input exercise the normalized-text cache: ``SELECT 1`` then ``SELECT 2`` share one key.

SQLSTATES_OF_ANALYZER = frozenset({"42601", "0A000", "54001"})

# Known analyzer bugs, each with a strict-xfail regression test; tolerated here so a fuzzing run is
# not spent re-finding them. Remove an entry when its regression test starts to pass (XPASS fails).
#   RecursionError: tests/hostile/test_regressions.py::
#       test_deeply_nested_sql_is_refused_with_an_analysis_error_not_a_recursion_error
KNOWN_ANALYZER_BUGS: tuple[type[BaseException], ...] = ()  # deep nesting is now AnalysisError 54001


class _Known(Exception):
    """A known bug was hit: the rest of this input is skipped."""


def _facts(sql: str) -> tuple[F.StatementFacts, ...] | F.AnalysisError:
    try:
        result = analyze.analyze(sql)
    except KNOWN_ANALYZER_BUGS as exc:
        raise _Known from exc
    except F.AnalysisError as exc:
        assert exc.sqlstate in SQLSTATES_OF_ANALYZER, exc.sqlstate
        assert exc.position is None or isinstance(exc.position, int)
        return exc
    assert isinstance(result, tuple)
    for f in result:
        assert isinstance(f, F.StatementFacts)
        orjson.dumps(f.to_dict())  # the policy input document must serialize
    return result


def _meaning(facts: tuple[F.StatementFacts, ...]) -> list[dict]:
    """What a policy decides on (the statement text and its fingerprint aside)."""
    return [{k: v for k, v in f.to_dict().items() if k != "fingerprint"} for f in facts]


def analyze_text(data: bytes) -> None:
    with contextlib.suppress(_Known):
        _analyze_texts(data.decode("utf-8", "replace").split("\x00")[:3])


def _analyze_texts(texts: list[str]) -> None:
    cache = FactsCache(size=8)
    for sql in texts:
        fresh = _facts(sql)
        again = _facts(sql)
        assert type(again) is type(fresh)
        if not isinstance(fresh, F.AnalysisError):
            assert again == fresh, "analyze is not deterministic"
        recorded = analyze.recorded_text(sql)
        assert isinstance(recorded, str)
        # The session's two paths: Query (keyed by normalized text) and Parse (keyed by the text).
        try:
            cached, key = cache.literal_independent(sql)
        except F.AnalysisError:
            assert isinstance(fresh, F.AnalysisError), "the Query path refused what analyze accepts"
        else:
            assert not isinstance(fresh, F.AnalysisError), "the Query path accepted what analyze refuses"
            assert isinstance(key, str)
            assert _meaning(cached) == _meaning(fresh), (
                f"a cache hit under {key!r} gives other facts than a fresh analysis of {sql!r}")
            assert isinstance(cache.recorded_text(key), str)
        try:
            exact = cache.exact(sql)
        except F.AnalysisError:
            assert isinstance(fresh, F.AnalysisError)
        else:
            assert exact == fresh


TARGETS = {"pgwire": pgwire, "analyze": analyze_text}
