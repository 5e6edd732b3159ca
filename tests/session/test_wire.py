"""Start-up, authentication, TLS and hostile wire input, with raw sockets and real clients."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import warnings

import psycopg
import pytest

from dbguard.pgwire import messages as m
from tests.fix_postgres import MD5_PASSWORD, Postgres
from tests.fix_proxy import Proxy, start_proxy
from tests.hostile.wire import Client


class Raw(Client):
    """A minimal raw frontend, to send exactly the bytes a test needs; over TCP or a Unix socket."""

    def __init__(self, port: int | None = None, *, unix_path: str = "") -> None:
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(unix_path)
            self.buf = b""
        else:
            super().__init__(port)

    recv_message = Client.recv

    def closed(self) -> bool:
        try:
            self.sock.settimeout(5)
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, TimeoutError):
            return False


def parse(name: str, sql: str) -> bytes:
    """A Parse message without parameter types."""
    body = name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0)
    return b"P" + struct.pack("!i", 4 + len(body)) + body


def fatal_of(raw: Raw) -> dict[str, str]:
    t, p = raw.recv_message()
    assert t == "E", (t, p)
    return m.decode_error_fields(p)


def still_serving(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_wrong_token_is_refused_with_28p01(proxy: Proxy):
    with pytest.raises(psycopg.OperationalError, match="token authentication failed"):
        psycopg.connect(proxy.dsn(password="wrong-token-123"))
    with pytest.raises(psycopg.OperationalError, match="token authentication failed"):
        psycopg.connect(proxy.dsn(user="bob", password="alice-dev-token"))  # someone else's token
    events = [e for e in proxy.events() if e["kind"] == "connection"]
    assert events and events[-1]["authenticated"] is False
    assert "wrong-token" not in proxy.events_path.read_text() and "wrong-token" not in proxy.log()


def test_upstream_password_never_reaches_client_events_or_logs(proxy: Proxy):
    still_serving(proxy)
    for text in (proxy.events_path.read_text(), proxy.log()):
        assert "app-secret-pw" not in text


@pytest.mark.parametrize("params, message", [
    ({"user": "alice", "database": "app", "options": "-c standard_conforming_strings=off"}, "options"),
    ({"user": "alice", "database": "app", "replication": "database"}, "replication"),
    ({"user": "alice", "database": "app", "client_encoding": "SJIS"}, "client_encoding must be UTF8"),
    ({"user": "alice", "database": "postgres"}, 'database "postgres" is not served'),
])
def test_unsafe_startup_parameters_get_a_fatal_error(proxy: Proxy, params: dict, message: str):
    raw = Raw(proxy.port)
    raw.send(m.encode_startup(params))
    fields = fatal_of(raw)
    assert fields["S"] == "FATAL" and message in fields["M"]
    assert raw.closed()
    still_serving(proxy)


def test_oversized_startup_packet_closes_only_that_connection(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.send(struct.pack("!i", 10_001) + b"\x00" * 100)
    fields = fatal_of(raw)
    assert fields["C"] == "08P01" and "invalid startup packet length" in fields["M"]
    assert raw.closed()
    assert "invalid startup packet length" in proxy.log()
    still_serving(proxy)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x09\x00"])
def test_garbage_bytes_close_that_connection_never_the_proxy(proxy: Proxy, garbage: bytes):
    raw = Raw(proxy.port)
    raw.send(garbage)
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.closed()
    still_serving(proxy)


def test_oversized_message_after_login_is_fatal_54000(pg: Postgres, tmp_path):
    proxy = start_proxy(pg, tmp_path, "--max-message-size", "4096")
    try:
        raw = Raw(proxy.port)
        raw.login()
        raw.send(m.encode_query("SELECT '" + "x" * 5000 + "'"))
        fields = fatal_of(raw)
        assert fields["C"] == "54000" and "4096-byte limit" in fields["M"]
        still_serving(proxy)
    finally:
        proxy.stop()


def test_login_timeout_closes_a_silent_client(pg: Postgres, tmp_path):
    proxy = start_proxy(pg, tmp_path, "--login-timeout", "0.5")
    try:
        raw = Raw(proxy.port)
        fields = fatal_of(raw)  # nothing sent at all
        assert "login timeout" in fields["M"]
        assert raw.closed()
    finally:
        proxy.stop()


def test_truncated_frame_then_disconnect_is_harmless(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.login()
    raw.send(b"Q\x00\x00\x01\x00SELECT")  # promises 256 bytes, sends 6
    raw.close()
    still_serving(proxy)


def test_function_call_and_unknown_messages_are_refused_and_connection_survives(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.login()
    raw.send(b"F" + struct.pack("!i", 14) + struct.pack("!ihhh", 1255, 0, 0, 0))
    replies = raw.until_ready()
    fields = m.decode_error_fields(dict(replies)["E"])
    assert fields["C"] == "0A000" and "FunctionCall" in fields["M"]
    raw.send(b"y" + struct.pack("!i", 4))
    replies = raw.until_ready()
    assert "unknown or unexpected message type 'y'" in m.decode_error_fields(dict(replies)["E"])["M"]
    raw.send(m.encode_query("SELECT 1"))
    assert [t for t, _ in raw.until_ready()] == ["T", "D", "C", "Z"]


def test_unknown_statement_and_portal_names_are_errors_not_pass_through(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.login()
    raw.send(m.encode_bind(statement="never_parsed") + m.encode_sync())
    replies = raw.until_ready()
    assert m.decode_error_fields(dict(replies)["E"])["C"] == "26000"
    raw.send(b"E" + struct.pack("!i", 13) + b"nope\x00" + struct.pack("!i", 0) + m.encode_sync())
    replies = raw.until_ready()
    assert m.decode_error_fields(dict(replies)["E"])["C"] == "34000"
    raw.send(m.encode_query("SELECT 1"))
    assert [t for t, _ in raw.until_ready()][-1] == "Z"


def test_server_reported_standard_conforming_strings_off_closes_the_session(pg: Postgres, proxy: Proxy):
    # A function can flip the setting where the parser cannot see it; ParameterStatus is the backstop.
    pg.psql("CREATE OR REPLACE FUNCTION public.sneaky() RETURNS int LANGUAGE sql "
            "AS $$ SELECT 1 FROM set_config('standard_conforming_strings', 'off', false) $$")
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.Error, match="standard_conforming_strings=off, which dbguard cannot judge"):
                conn.execute("SELECT public.sneaky()")
                conn.execute("SELECT 1")
            assert conn.closed or conn.broken
        still_serving(proxy)
    finally:
        pg.psql("DROP FUNCTION public.sneaky()")


def test_md5_upstream_authentication_works(pg: Postgres, tmp_path):
    url = f"postgresql://md5user:{MD5_PASSWORD}@127.0.0.1:{pg.port}/app?sslmode=disable"
    proxy = start_proxy(pg, tmp_path, upstream=url)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
    finally:
        proxy.stop()


def test_upstream_down_gives_the_client_a_clear_error(pg: Postgres, tmp_path):
    proxy = start_proxy(pg, tmp_path, upstream="postgresql://app:x@127.0.0.1:1/app?sslmode=disable")
    try:
        with pytest.raises(psycopg.OperationalError, match="cannot reach the database server"):
            psycopg.connect(proxy.dsn())
    finally:
        proxy.stop()


def test_workload_identity_mode_needs_no_password(pg: Postgres, tmp_path):
    proxy = start_proxy(pg, tmp_path, "--workload-identity", "system:serviceaccount:shop:api",
                        "--workload-group", "developers")
    try:
        with psycopg.connect(proxy.dsn(password=""), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DROP TABLE customers")
        users = {e["identity"]["user"] for e in proxy.events() if e["kind"] == "decision"}
        assert users == {"system:serviceaccount:shop:api"}
    finally:
        proxy.stop()


# --- TLS toward the client ---------------------------------------------------------------------------


def test_without_a_certificate_ssl_is_declined_cleanly(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.send(m.encode_ssl_request())
    assert raw.sock.recv(1) == b"N"
    raw.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(sslmode="require"))
    with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
        assert conn.info.pgconn.ssl_in_use is False


def test_gssenc_request_is_answered_n(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.send(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE))
    assert raw.sock.recv(1) == b"N"


@pytest.fixture
def tls_files(tmp_path):
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_toward_the_client_and_require_tls(pg: Postgres, tmp_path, tls_files):
    cert, key = tls_files
    proxy = start_proxy(pg, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--require-tls")
    try:
        with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(cert))) as conn:
            assert conn.info.pgconn.ssl_in_use
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="requires TLS"):
            psycopg.connect(proxy.dsn(sslmode="disable"))
        # CVE-2021-23214: bytes piggybacked on the SSLRequest must not be read as plaintext.
        raw = Raw(proxy.port)
        raw.send(m.encode_ssl_request() + m.encode_query("SELECT 1"))
        fields = fatal_of(raw)
        assert "unencrypted data after SSLRequest" in fields["M"]
        # TLS 1.1 and below are refused.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated on purpose: it must be refused
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(m.encode_ssl_request())
        assert s.recv(1) == b"S"
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s).do_handshake()
    finally:
        proxy.stop()


def test_reparsing_an_existing_statement_name_cannot_swap_the_judged_text(proxy: Proxy, pg: Postgres):
    """Parse s1 (allowed), then Parse s1 again with other text: the server keeps the first text, so
    dbguard must not judge a later Bind on the second."""
    raw = Raw(proxy.port)
    raw.login()
    raw.send(parse("s1", "UPDATE orders SET status = 'x' WHERE id = 1") + m.encode_sync())
    assert [t for t, _ in raw.until_ready()] == ["1", "Z"]
    raw.send(parse("s1", "SELECT 1") + m.encode_sync())
    replies = raw.until_ready()
    assert m.decode_error_fields(dict(replies)["E"])["C"] == "42P05"
    raw.send(m.encode_query("DEALLOCATE s1"))
    raw.until_ready()
    raw.send(parse("s1", "SELECT 1") + m.encode_sync())  # after DEALLOCATE the name is free again
    assert [t for t, _ in raw.until_ready()] == ["1", "Z"]


def test_invalid_utf8_is_refused_and_the_connection_survives(proxy: Proxy):
    raw = Raw(proxy.port)
    raw.login()
    body = b"SELECT '\xff'\x00"
    raw.send(b"Q" + struct.pack("!i", 4 + len(body)) + body)
    replies = raw.until_ready()
    fields = m.decode_error_fields(dict(replies)["E"])
    assert fields["C"] == "08P01" and "not valid UTF-8" in fields["M"]
    raw.send(m.encode_query("SELECT 1"))
    assert [t for t, _ in raw.until_ready()] == ["T", "D", "C", "Z"]
