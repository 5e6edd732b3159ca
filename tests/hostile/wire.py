"""A raw frontend for hostile tests: sends exactly the bytes a test builds, reads typed replies."""

from __future__ import annotations

import socket
import struct
import time

from dbguard.pgwire import messages as m

TOKEN = "alice-dev-token"


def frame(code: bytes, payload: bytes) -> bytes:
    return code + struct.pack("!i", len(payload) + 4) + payload


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return frame(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", len(types))
                 + b"".join(struct.pack("!I", t) for t in types))


def bind(portal: str, statement: str, params: tuple[bytes | None, ...] = (), formats: tuple[int, ...] = ()) -> bytes:
    body = [portal.encode() + b"\x00", statement.encode() + b"\x00", struct.pack("!h", len(formats)),
            b"".join(struct.pack("!h", f) for f in formats), struct.pack("!h", len(params))]
    body += [struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p for p in params]
    body.append(struct.pack("!h", 0))
    return frame(b"B", b"".join(body))


def describe(kind: str, name: str) -> bytes:
    return frame(b"D", kind.encode() + name.encode() + b"\x00")


def close(kind: str, name: str) -> bytes:
    return frame(b"C", kind.encode() + name.encode() + b"\x00")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", portal.encode() + b"\x00" + struct.pack("!i", max_rows))


SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")


class Closed(ConnectionError):
    """The peer closed the connection."""


class Client:
    """One TCP connection to the proxy (or any PostgreSQL-speaking server) on loopback."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed("the server closed the connection")
        self.buf += chunk

    def recv(self) -> tuple[str, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!i", self.buf[1:5])[0]:
            self._fill()
        length = struct.unpack("!i", self.buf[1:5])[0]
        t, payload, self.buf = chr(self.buf[0]), self.buf[5 : 1 + length], self.buf[1 + length :]
        return t, payload

    def until_ready(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            t, p = self.recv()
            out.append((t, p))
            if t == "Z":
                return out

    def login(self, user: str = "alice", token: str = TOKEN) -> list[tuple[str, bytes]]:
        self.send(m.encode_startup({"user": user, "database": "app"}))
        t, p = self.recv()
        assert (t, struct.unpack("!i", p[:4])[0]) == ("R", 3), (t, p)
        self.send(m.encode_password(token.encode() + b"\x00"))
        return self.until_ready()

    def read_to_eof(self, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Every message until the server closes the connection (fails after ``timeout``)."""
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                out.append(self.recv())
            except (Closed, ConnectionResetError):
                return out
            except TimeoutError as exc:
                raise AssertionError(f"still open after {timeout}s; got {out}") from exc

    def is_closed(self, timeout: float = 5.0) -> bool:
        try:
            self.read_to_eof(timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def errors(replies: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [m.decode_error_fields(p) for t, p in replies if t == "E"]


def one_query(port: int, sql: str = "SELECT 42") -> list[tuple[str, bytes]]:
    """A fresh login and one Query: proves the proxy still serves new clients."""
    c = Client(port)
    try:
        c.login()
        c.send(m.encode_query(sql))
        return c.until_ready()
    finally:
        c.close()
