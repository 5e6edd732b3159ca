"""TLS toward the client under attack: injected plaintext, renegotiation, old protocol versions.

CVE-2021-23214 class: a man in the middle answers nothing but appends plaintext behind the client's
SSLRequest (or sends it after the proxy's 'S'), hoping the server reads it as if it came over TLS.
Such bytes must be refused or fed to the TLS layer (where they fail), never processed.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import warnings

import psycopg
import pytest

from dbguard.pgwire import messages as m
from tests.fix_postgres import Postgres, reset_schema, wait_until
from tests.fix_proxy import Proxy, start_proxy
from tests.hostile import wire
from tests.hostile.certs import TlsFiles, make_tls_files

LOGIN = m.encode_startup({"user": "alice", "database": "app"}) + m.encode_password(wire.TOKEN.encode() + b"\x00")


@pytest.fixture(scope="module")
def tls(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> tuple[Proxy, TlsFiles]:
    reset_schema(postgres)
    base = tmp_path_factory.mktemp("tls")
    files = make_tls_files(base)
    proxy = start_proxy(postgres, base, "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    yield proxy, files
    proxy.stop()


def _ssl_request(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(m.encode_ssl_request())
    assert s.recv(1) == b"S"
    return s


def _client_context(files: TlsFiles, *, maximum: ssl.TLSVersion | None = None,
                    minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(files.ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated: that is the point
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    return ctx


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the proxy sends until it closes the connection (fails if it stays open)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the proxy kept the connection open; it sent {data!r}")


def _still_serving(proxy: Proxy, files: TlsFiles) -> None:
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(files.ca)), autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 42").fetchone() == (42,)


@pytest.mark.parametrize("injected", [
    pytest.param(LOGIN, id="startup and password"),
    pytest.param(m.encode_query("DROP TABLE customers"), id="a query"),
    pytest.param(LOGIN[:3], id="three bytes of a packet"),
])
def test_plaintext_piggybacked_on_sslrequest_is_refused_not_processed(tls, injected: bytes):
    proxy, files = tls
    c = wire.Client(proxy.port)
    c.send(m.encode_ssl_request() + injected)
    data = _read_all(c.sock)
    assert not data.startswith(b"S"), "the proxy began TLS with plaintext waiting behind the SSLRequest"
    assert data[:1] == b"E", data
    fields = m.decode_error_fields(data[5:])
    assert fields["S"] == "FATAL" and "unencrypted data after SSLRequest" in fields["M"]
    assert b"R\x00\x00\x00" not in data, "an authentication request means the plaintext was processed"
    _still_serving(proxy, files)


def test_plaintext_sent_after_the_proxy_said_s_is_read_as_tls_and_fails(tls):
    proxy, files = tls
    before = proxy.log().count("TLS handshake failed")
    s = _ssl_request(proxy.port)
    s.sendall(LOGIN + m.encode_query("DROP TABLE customers"))  # an injector that ignores the 'S'
    data = _read_all(s)
    # Whatever comes back is a TLS alert record (0x15) or nothing: never a plaintext reply.
    assert data[:1] in (b"", b"\x15"), data
    assert b"R\x00\x00\x00" not in data and b"Z\x00\x00\x00" not in data
    wait_until(lambda: proxy.log().count("TLS handshake failed") > before, timeout=5,
               what="the handshake failure to be logged")
    _still_serving(proxy, files)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_tls_1_2_and_1_3_clients_are_served(tls, version: ssl.TLSVersion):
    proxy, files = tls
    ctx = _client_context(files, minimum=version, maximum=version)
    with ctx.wrap_socket(_ssl_request(proxy.port), server_hostname="127.0.0.1") as tls_sock:
        assert tls_sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        tls_sock.sendall(LOGIN + m.encode_query("SELECT 1"))
        data = b""
        while b"SELECT 1\x00Z" not in data:  # CommandComplete, then ReadyForQuery
            chunk = tls_sock.recv(65536)
            assert chunk, data
            data += chunk


@pytest.mark.parametrize("version", [
    pytest.param(ssl.TLSVersion.TLSv1, id="TLSv1.0",
                 marks=pytest.mark.skipif(not ssl.HAS_TLSv1, reason="this OpenSSL cannot offer TLS 1.0")),
    pytest.param(ssl.TLSVersion.TLSv1_1, id="TLSv1.1",
                 marks=pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="this OpenSSL cannot offer TLS 1.1")),
])
def test_a_tls_1_0_or_1_1_client_is_refused(tls, version: ssl.TLSVersion):
    proxy, files = tls
    ctx = _client_context(files, minimum=version, maximum=version)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer the old version
    before = proxy.log().count("unsupported protocol")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(_ssl_request(proxy.port), server_hostname="127.0.0.1").do_handshake()
    # The refusal is the proxy's, not the client library's: it saw the old ClientHello and declined it.
    wait_until(lambda: proxy.log().count("unsupported protocol") > before, timeout=5,
               what="the proxy to log the refused protocol version")
    # Control: the same client, allowed TLS 1.2, is served.
    ok = _client_context(files, minimum=version, maximum=ssl.TLSVersion.TLSv1_2)
    ok.set_ciphers("DEFAULT:@SECLEVEL=0")
    with ok.wrap_socket(_ssl_request(proxy.port), server_hostname="127.0.0.1") as tls_sock:
        assert tls_sock.version() == "TLSv1.2"


def test_client_initiated_renegotiation_is_refused(tls):
    proxy, files = tls
    # openssl s_client speaks the SSLRequest preamble itself (-starttls postgres); "R" renegotiates.
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-starttls", "postgres",
                             "-tls1_2", "-CAfile", str(files.ca)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = b""
        assert proc.stdout is not None and proc.stdin is not None
        deadline = time.monotonic() + 10
        while b"Verify return code: 0" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert b"Verify return code: 0" in out, out.decode(errors="replace")
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (out + rest).decode(errors="replace")
    assert "RENEGOTIATING" in text
    assert "no renegotiation" in text, text[-2000:]
    _still_serving(proxy, files)


def test_a_second_sslrequest_inside_tls_is_declined(tls):
    proxy, files = tls
    ctx = _client_context(files)
    with ctx.wrap_socket(_ssl_request(proxy.port), server_hostname="127.0.0.1") as tls_sock:
        tls_sock.sendall(m.encode_ssl_request())
        assert tls_sock.recv(1) == b"N"  # no TLS inside TLS
        tls_sock.sendall(LOGIN + m.encode_query("SELECT 1"))
        data = b""
        while b"SELECT 1\x00Z" not in data:
            chunk = tls_sock.recv(65536)
            assert chunk, data
            data += chunk

