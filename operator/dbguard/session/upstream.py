"""Connecting and authenticating to the governed PostgreSQL server.

The proxy holds the real credentials; clients never see them. SCRAM-SHA-256 (via scramp), md5 and
cleartext are answered; TLS is negotiated per ``sslmode``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import struct
from collections.abc import Callable

import scramp

from dbguard.config import UpstreamSettings
from dbguard.pgwire import messages
from dbguard.pgwire.backend import BackendStartupReader

log = logging.getLogger("dbguard.upstream")

_I32 = struct.Struct("!i")


class UpstreamError(Exception):
    """The upstream refused us or could not be reached; ``fields`` are from its ErrorResponse."""

    def __init__(self, message: str, *, sqlstate: str = "08006", fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.fields = fields or {}


class UpstreamProtocol(asyncio.Protocol):
    """Transport callbacks for the server side; start-up messages queue up, then bytes go to ``on_data``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = BackendStartupReader()
        self._arrived = asyncio.Event()
        self.lost: BaseException | None = None
        self.closed = False
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self.on_pause: Callable[[bool], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
        else:
            self.reader.receive_data(data)
            self._arrived.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.lost = exc
        self._arrived.set()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    async def next_message(self) -> tuple[str, bytes]:
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            if self.closed:
                raise UpstreamError("the server closed the connection during start-up")
            self._arrived.clear()
            await self._arrived.wait()

    async def read_ssl_answer(self) -> bytes:
        while True:
            buf = self.reader._buf  # noqa: SLF001 - one byte, before any framing
            if buf:
                answer = bytes(buf[:1])
                del buf[:1]
                if buf:
                    raise UpstreamError("the server sent data before the TLS handshake", sqlstate="08P01")
                return answer
            if self.closed:
                raise UpstreamError("the server closed the connection during TLS negotiation")
            self._arrived.clear()
            await self._arrived.wait()


class UpstreamConnection:
    """An authenticated server connection, ready for queries."""

    def __init__(self, transport: asyncio.Transport, protocol: UpstreamProtocol) -> None:
        self.transport = transport
        self.protocol = protocol
        self.parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.status = "I"


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    if settings.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=settings.sslrootcert or None)
        ctx.check_hostname = settings.sslmode == "verify-full"
    else:  # require / prefer: encryption without verification, as libpq does
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _open(settings: UpstreamSettings) -> tuple[asyncio.Transport, UpstreamProtocol]:
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_connection(UpstreamProtocol, settings.host, settings.port)
    except OSError as exc:
        raise UpstreamError(
            f"cannot reach the database server at {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    if settings.sslmode == "disable":
        return transport, protocol
    transport.write(messages.encode_ssl_request())
    answer = await protocol.read_ssl_answer()
    if answer == b"S":
        tls = await loop.start_tls(
            transport, protocol, _ssl_context(settings), server_hostname=settings.host
        )
        protocol.transport = tls  # type: ignore[assignment]
        return tls, protocol  # type: ignore[return-value]
    if answer == b"N":
        if settings.sslmode != "prefer":
            transport.close()
            raise UpstreamError(f"the server does not support TLS but sslmode is {settings.sslmode}")
        return transport, protocol
    transport.close()
    raise UpstreamError(f"unexpected answer {answer!r} to SSLRequest")


async def connect(settings: UpstreamSettings, params: dict[str, str]) -> UpstreamConnection:
    """Open, authenticate and wait for the first ReadyForQuery."""
    try:
        return await asyncio.wait_for(_connect(settings, params), settings.connect_timeout)
    except TimeoutError as exc:
        raise UpstreamError(
            f"timed out after {settings.connect_timeout:g}s connecting to the database server"
        ) from exc


async def _connect(settings: UpstreamSettings, params: dict[str, str]) -> UpstreamConnection:
    transport, protocol = await _open(settings)
    conn = UpstreamConnection(transport, protocol)
    try:
        startup = {"user": settings.user, "database": settings.database, **params}
        transport.write(messages.encode_startup(startup))
        await _authenticate(conn, settings)
        while True:
            kind, payload = await protocol.next_message()
            if kind == "S":
                name, value, _ = payload.split(b"\x00", 2)
                conn.parameters[name.decode()] = value.decode()
            elif kind == "K":
                conn.process_id, conn.secret_key = struct.unpack("!ii", payload[:8])
            elif kind == "Z":
                conn.status = payload.decode("ascii")
                break
            elif kind == "E":
                _raise_error(payload)
            elif kind == "N":
                continue
            else:
                raise UpstreamError(f"unexpected message {kind!r} from the server during start-up", sqlstate="08P01")
    except BaseException:
        transport.close()
        raise
    return conn


def _raise_error(payload: bytes) -> None:
    fields = messages.decode_error_fields(payload)
    raise UpstreamError(
        f"the database server refused the proxy: {fields.get('M', 'unknown error')}",
        sqlstate=fields.get("C", "08006"),
        fields=fields,
    )


async def _authenticate(conn: UpstreamConnection, settings: UpstreamSettings) -> None:
    protocol = conn.protocol
    write = conn.transport.write
    scram: scramp.ScramClient | None = None
    while True:
        kind, payload = await protocol.next_message()
        if kind == "E":
            _raise_error(payload)
        if kind != "R":
            raise UpstreamError(f"unexpected message {kind!r} from the server during authentication", sqlstate="08P01")
        (code,) = _I32.unpack_from(payload, 0)
        if code == 0:  # AuthenticationOk
            return
        if code == 3:  # cleartext
            write(messages.encode_password(settings.password.encode() + b"\x00"))
        elif code == 5:  # md5
            salt = payload[4:8]
            inner = hashlib.md5((settings.password + settings.user).encode()).hexdigest()  # noqa: S324 - protocol
            outer = hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324 - protocol
            write(messages.encode_password(b"md5" + outer.encode() + b"\x00"))
        elif code == 10:  # SASL
            mechanisms = [m.decode() for m in payload[4:].split(b"\x00") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise UpstreamError(f"the server offers no supported SASL mechanism: {mechanisms}", sqlstate="28000")
            scram = scramp.ScramClient(["SCRAM-SHA-256"], settings.user, settings.password)
            write(messages.encode_sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode()))
        elif code == 11 and scram is not None:  # SASLContinue
            scram.set_server_first(payload[4:].decode())
            write(messages.encode_password(scram.get_client_final().encode()))
        elif code == 12 and scram is not None:  # SASLFinal
            try:
                scram.set_server_final(payload[4:].decode())
            except scramp.ScramException as exc:
                raise UpstreamError("the server's SCRAM signature is wrong", sqlstate="28000") from exc
        else:
            raise UpstreamError(f"unsupported authentication request {code} from the server", sqlstate="28000")


async def send_cancel(settings: UpstreamSettings, process_id: int, secret_key: int) -> None:
    """Forward a CancelRequest for one server backend."""
    transport, _ = await _open(settings)
    try:
        transport.write(messages.encode_cancel_request(process_id, secret_key))
        await asyncio.sleep(0)
    finally:
        transport.close()
