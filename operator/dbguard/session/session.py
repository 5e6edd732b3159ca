"""One client connection: start-up, authentication, then every message judged and relayed.

Refusals are executed *by the server*: the proxy sends it a Bind to a statement name that cannot
exist (``dbguard.refused.N``), and replaces the server's "does not exist" ErrorResponse with its
own. The server thus enters exactly the state PostgreSQL semantics require (failed transaction
block, rolled-back implicit transaction, discard until Sync), responses stay in order behind
pipelined statements, and the client's transaction status always matches the server's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import logging
import secrets
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from dbguard.analyze import facts as F
from dbguard.approvals.flow import approval_decision, mixed_rules, rows_from_tags
from dbguard.approvals.store import expand_formats, params_as_text
from dbguard.audit.events import Done, EventKind, ReadShape, iso_time
from dbguard.audit.writer import LedgerUnavailable, Waiter
from dbguard.errors import Refusal
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal
from dbguard.masking.catalog import IdentityMasks
from dbguard.masking.copy import CopyPlan, mask_copy_row
from dbguard.masking.rows import CatalogOutdated, MaskPlan, mask_data_row, parse_row_description, plan_for
from dbguard.masking.rules import MaskSet
from dbguard.masking.strategies import redact_detail
from dbguard.pgwire import NEED_DATA, BackendRelay, FrontendParser, RemoteProtocolError
from dbguard.pgwire import messages as m
from dbguard.pgwire.backend import HOLD, MAX_DATA_ROW
from dbguard.policy.decision import Decision, PolicyAction
from dbguard.session import upstream
from dbguard.session.completions import CompletionTracker, Pending, redact_message
from dbguard.session.guard import Guard, Verdict, read_only, refusal_for_analysis_error
from dbguard.session.rowmarks import RowMarks
from dbguard.sqlstate import SqlState

if TYPE_CHECKING:
    from dbguard.session.server import Proxy

log = logging.getLogger("dbguard.session")

REFUSED_PREFIX = "dbguard.refused."
_NOT_UTF8 = Refusal(sqlstate=SqlState.PROTOCOL_VIOLATION, rule="dbguard:encoding",
                    message="dbguard refused the statement: it is not valid UTF-8")
_DDL_COMMANDS = frozenset({"CREATE", "ALTER", "DROP", "COMMENT", "REFRESH", "SECURITY LABEL"})
_SHAPE_MEMO: dict[tuple, tuple] = {}  # (id(facts), id(decisions)...) -> (facts, decisions, JSON members)
# Startup parameters forwarded to the server. Anything else is refused: `options` could carry
# `-c standard_conforming_strings=off`, `replication` opens a replication connection.
FORWARDED_PARAMS = frozenset({"application_name", "client_encoding", "DateStyle", "TimeZone",
                              "extra_float_digits", "IntervalStyle", "datestyle", "timezone"})
IGNORED_PARAMS = frozenset({"user", "database"})


def _keepalive(sock: Any) -> None:
    """TCP keepalive on a client socket: a client that vanished without closing (a half-open
    connection) is noticed after about two minutes of silence, and its session and server
    connection are released, instead of being held until the server or the kernel gives up."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _outcome(d: Decision) -> str:
    """What a decision did, as GuardrailPolicy status counts it: allow, deny, requireApproval, or
    dryrun / warn for a rule that would have stopped the statement under that enforcement."""
    if d.enforced is PolicyAction.DENY:
        return "deny"
    if d.enforced is PolicyAction.REQUIRE_APPROVAL:
        return "requireApproval"
    if d.action is not PolicyAction.ALLOW:
        return d.enforcement.value
    return "allow"


HOLD_INPUT_LIMIT = 1 << 20  # bytes a client may send while a statement of its waits for an approval


class ClientSession(asyncio.Protocol):
    """asyncio protocol for one client; owns its upstream connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.transport: asyncio.Transport | None = None
        self.parser = FrontendParser(max_message_size=self.settings.limits.max_message_size)
        self.session_id = secrets.token_hex(8)
        self.client_addr = ""
        self.principal: Principal | None = None
        self.params: dict[str, str] = {}
        self.guard: Guard | None = None
        self.upstream: upstream.UpstreamConnection | None = None
        self.relay = BackendRelay(self._on_backend_message)
        self.state = "startup"  # startup -> password -> connecting -> ready -> closed
        self.tls = False
        self.key = (0, 0)  # (process id, secret) the client sees; mapped to the server's
        self._busy = False  # a message is waiting for an async step; further input waits
        self._out = bytearray()  # bytes for the server, written once per batch of input
        self._discard_until_sync = False
        self._in_batch = False  # extended-protocol messages seen since the last Sync
        self._statements: dict[str, tuple[F.StatementFacts, ...]] = {}  # protocol-level prepared statements
        # portal -> (statements, statement number, a read's decision entry deferred to its completion)
        self._portals: dict[str, tuple[tuple[F.StatementFacts, ...], int, tuple[datetime.datetime, ReadShape] | None]] = {}
        self.completions = CompletionTracker()
        self._finished: list[Pending] = []  # completed statements not yet recorded
        self._stmt_no = 0  # decisions in this session; completion entries name theirs
        self._decided: tuple[int, tuple[datetime.datetime, ReadShape] | None] = (0, None)  # the latest decision's number, deferral
        self._read_shapes: dict[tuple[str, str, bytes], ReadShape] = {}  # (protocol, statement, shape) -> its ReadShape
        self._markers: dict[str, tuple[Refusal, int]] = {}  # refusal name -> (refusal, sync number)
        self._refusals = 0
        self._syncs_sent = 0  # Query and Sync messages sent: each earns one ReadyForQuery
        self._rfq_seen = 0
        self._login_timer: asyncio.TimerHandle | None = None
        self._client_paused = False
        self._event_prefix = b""
        self._cut_after: bytes | None = None  # a FATAL relayed in the server's stream: nothing follows it
        # masking (only for identities with masks): see dbguard.masking
        self.mask_set: MaskSet | None = None
        self._masks: IdentityMasks | None = None  # resolved against the catalog at the latest statement
        self._describes: collections.deque[tuple[str | None, bool, int]] = collections.deque()  # portal, ours, sync
        self._portal_plans: dict[str, MaskPlan] = {}
        self._query_plan: MaskPlan | None = None  # the simple-protocol result being relayed
        self._copy_plans: collections.deque[tuple[CopyPlan, int]] = collections.deque()  # COPY TO, in order
        self._copy_active: CopyPlan | None = None  # the COPY OUT being relayed
        self._portal_copies: dict[str, CopyPlan] = {}  # portal -> plan of the COPY TO STDOUT it runs
        self._copy_rows = 0
        self._active_plan: MaskPlan | None = None  # the plan of the result being relayed, once looked up
        self._holding: bytearray | None = None  # server output held while the catalog is read again
        self._held_once = False  # the current RowDescription was already held for a catalog read
        self._counted_as = ""  # the identity this session counts against (--max-connections-per-identity)
        # approvals (dbguard.approvals.flow): the claimed request of the statement being forwarded
        self._approved_next = ""
        self._approval_note = b""  # the approval outcome, added to the statement's decision entry
        self._param_types: dict[str, tuple[int, ...]] = {}
        self._approved_stmts: dict[int, str] = {}  # statement number -> request, until its completion
        self._executes_sent: set[int] = set()  # approved statements whose Execute went to the server
        self._hold_cancel: asyncio.Event | None = None  # set while a held statement's approval is resolved
        self._awaiting_decision = False  # a statement waits for a decision now (hold mode; the metrics gauge)
        # row evidence (dbguard.session.rowmarks): a marker goes into the transaction before each write
        self._rowmarks: RowMarks | None = None
        self._tx_status = "I"  # as of the latest ReadyForQuery
        self._mark_rt = 0  # the round trip of the latest marker
        self._idle_rt = 0  # the latest ReadyForQuery that said "idle": no transaction
        self._batch_mark = False  # a marker ran in this extended batch's transaction (until Sync or COMMIT ...)
        self._idle_waiters: list[asyncio.Future[None]] = []  # steps waiting for every round trip to be answered

    # -- transport callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        _keepalive(transport.get_extra_info("socket"))
        self._login_timer = asyncio.get_running_loop().call_later(self.settings.limits.login_timeout, self._login_timeout)
        self.proxy.sessions.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._teardown()

    def data_received(self, data: bytes) -> None:
        if self.state in ("closed", "gone"):
            return  # lingering after a FATAL: discard
        self.parser.receive_data(data)
        if not self._busy:
            self._process()
        elif self.parser.buffered > HOLD_INPUT_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # read during a hold to notice a client that leaves; not without bound

    def pause_writing(self) -> None:  # the client reads slowly: stop reading from the server
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.protocol.closed:
            self.upstream.transport.resume_reading()

    # -- helpers ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fatal(self, sqlstate: str, message: str, *, log_level: int = logging.WARNING) -> None:
        """FATAL error to this one client, then close it: for what the protocol cannot recover from."""
        if self.state in ("closed", "gone"):
            return
        log.log(log_level, "session %s (%s): closing: %s", self.session_id, self.client_addr, message)
        self.proxy.events.emit(EventKind.REFUSAL, {"session": self.session_id, "client_addr": self.client_addr,
                                                    "identity": self.principal.to_dict() if self.principal else None,
                                                    "rule": "dbguard:protocol", "sqlstate": sqlstate,
                                                    "reason": message, "fatal": True}, flush=True)
        if self._cut_after is None:  # else it was already relayed in place
            self._send(m.encode_error(sqlstate=sqlstate, message=message, severity="FATAL"))
        self._close(linger=True)

    def _close(self, *, linger: bool = False) -> None:
        """Close the client connection; with ``linger``, half-close first so a FATAL just sent is read.

        Closing a socket that still holds unread client bytes makes the kernel send RST, and the
        client may lose the error that explains why; so the write side is shut and input is
        discarded until the client hangs up (or two seconds pass).
        """
        self.state = "closed"
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if linger and transport.can_write_eof():
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):
                    transport.close()
                else:
                    asyncio.get_running_loop().call_later(2.0, transport.close)
            else:
                transport.close()
        self._teardown()

    def _teardown(self) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self.state != "gone":
            leftover = self._finished + self.completions.drain()
            self._finished = []
            if leftover:
                self._record_completions(leftover)
            self._drop_portals(list(self._portals))
            if self.principal is not None:
                self.proxy.events.emit(EventKind.DISCONNECT, {"session": self.session_id, "user": self.principal.user})
            self.state = "gone"
        self.proxy.sessions.discard(self)
        for waiter in self._idle_waiters:
            waiter.cancel()
        self._idle_waiters.clear()
        if self._counted_as:
            held = self.proxy.identity_sessions
            held[self._counted_as] -= 1
            if held[self._counted_as] <= 0:
                del held[self._counted_as]
            self._counted_as = ""
        self.proxy.cancel_keys.pop(self.key, None)
        if self.upstream is not None:
            self.upstream.protocol.on_lost = None
            self.upstream.transport.close()

    def _login_timeout(self) -> None:
        self._login_timer = None
        if self.state not in ("ready", "closed", "gone"):
            self._fatal(SqlState.CONNECTION_FAILURE.value,
                        f"login timeout: no complete start-up within {self.settings.limits.login_timeout:g}s")

    def _run_async(self, step: Awaitable[None]) -> None:
        """Stop taking input until ``step`` finishes; then resume where we were."""
        self._busy = True
        if self.transport is not None:
            self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(step)
        task.add_done_callback(self._async_done)

    def _async_done(self, task: asyncio.Task) -> None:
        self._busy = False
        if task.cancelled():
            return self._close()
        exc = task.exception()
        if exc is not None:
            log.exception("session %s: internal error", self.session_id, exc_info=exc)
            return self._fatal("XX000", f"dbguard internal error: {type(exc).__name__}")
        if self.state in ("closed", "gone"):
            return None
        if self.transport is not None:
            self.transport.resume_reading()
        self._process()
        return None

    # -- input loop ------------------------------------------------------------------------------

    def _process(self) -> None:
        try:
            while not self._busy and self.state not in ("closed", "gone"):
                msg = self.parser.next_message()
                if msg is NEED_DATA:
                    break
                if self.state == "ready":
                    self._on_message(msg)
                else:
                    self._on_startup_message(msg)
        except RemoteProtocolError as exc:
            self._flush()
            self._fatal(exc.sqlstate, f"protocol violation: {exc}")
            return
        self._flush()

    def _flush(self) -> None:
        if self._out and self.upstream is not None:
            self.upstream.transport.write(bytes(self._out))
            self._out.clear()

    # -- start-up ------------------------------------------------------------------------------

    def _on_startup_message(self, msg: object) -> None:
        if isinstance(msg, m.SSLRequest):
            return self._start_tls()
        if isinstance(msg, m.GSSENCRequest):
            self._send(b"N")
            return None
        if isinstance(msg, m.CancelRequest):
            self.proxy.forward_cancel(msg.process_id, msg.secret_key)
            return self._close()
        if isinstance(msg, m.StartupMessage):
            return self._on_startup(msg)
        if isinstance(msg, m.PasswordMessage) and self.state == "password":
            return self._on_password(msg)
        raise RemoteProtocolError(f"unexpected message {type(msg).__name__} during start-up")

    def _start_tls(self) -> None:
        ctx: ssl.SSLContext | None = self.proxy.tls_context
        if self.tls or ctx is None:
            self._send(b"N")
            return
        if self.parser.buffered:
            # CVE-2021-23214: bytes sent before the handshake could be injected by a man in the middle.
            raise RemoteProtocolError("received unencrypted data after SSLRequest")
        self._send(b"S")
        self._run_async(self._tls_handshake(ctx))

    async def _tls_handshake(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, ctx, server_side=True)  # type: ignore[arg-type]
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            log.warning("session %s (%s): TLS handshake failed: %s", self.session_id, self.client_addr, exc)
            self._close()
            return
        self.transport = new  # type: ignore[assignment]
        self.tls = True

    def _on_startup(self, msg: m.StartupMessage) -> None:
        params = msg.params
        cap = self.settings.limits.max_connections
        if cap and len(self.proxy.sessions) > cap:  # this session is already counted
            self.proxy.stats.refusals["dbguard:too-many-connections"] += 1
            return self._fatal("53300", f"sorry, too many clients already through this dbguard proxy (limit {cap})")
        if "replication" in params:
            return self._fatal("0A000", "replication connections are not allowed through dbguard")
        unknown = sorted(set(params) - FORWARDED_PARAMS - IGNORED_PARAMS)
        if unknown:
            return self._fatal("0A000", f"startup parameter(s) not allowed through dbguard: {', '.join(unknown)}")
        enc = params.get("client_encoding")
        if enc is not None and not F.is_utf8(enc):
            return self._fatal("0A000", f"client_encoding must be UTF8 through dbguard (asked: {enc})")
        if self.settings.listen.require_tls and not self.tls:
            return self._fatal("28000", "this dbguard proxy requires TLS (sslmode=require)")
        database = params.get("database") or params.get("user", "")
        if database != self.settings.upstream.database:
            return self._fatal("3D000", f'database "{database}" is not served by this proxy '
                                        f'(it serves "{self.settings.upstream.database}")')
        self.params = params
        if self.proxy.workload is not None:  # sidecar mode: every client is the pod's identity
            self.state = "connecting"
            return self._run_async(self._login(None))
        self.state = "password"
        self._send(m.encode_auth_request(3))  # AuthenticationCleartextPassword: the password is the token
        return None

    def _on_password(self, msg: m.PasswordMessage) -> None:
        token = msg.data.rstrip(b"\x00").decode("utf-8", "replace")
        self.state = "connecting"
        self._run_async(self._login(token))  # verifying may be network I/O (TokenReview, JWKS)

    async def _login(self, token: str | None) -> None:
        """Establish the client's identity (from its token, or the workload's), then connect upstream."""
        requested = self.params.get("user", "")
        try:
            if token is None:
                principal = await self.proxy.workload.current()
                principal = dataclasses.replace(principal, end_user=self.params.get("application_name", ""))
            elif self.proxy.tokens is None:
                raise authenticator.Rejected("this proxy accepts no tokens")
            else:
                principal = await self.proxy.tokens.authenticate(token)
                if not authenticator.login_matches(requested, principal):
                    raise authenticator.Rejected(f'the token belongs to "{principal.user}"')
        except authenticator.AuthenticationError as exc:
            if self.state != "connecting":
                return None  # the client is gone (login timeout) while we were asking
            self.proxy.events.emit(EventKind.CONNECTION, {
                "session": self.session_id, "client_addr": self.client_addr, "user": requested,
                "authenticated": False, "sqlstate": str(exc.sqlstate), "reason": exc.reason}, flush=True)
            if isinstance(exc, authenticator.Unavailable):
                what = "the workload identity" if token is None else f'the token of user "{requested}"'
                return self._fatal(str(exc.sqlstate), f"cannot verify {what} now: {exc.reason}")
            return self._fatal(str(exc.sqlstate), f'token authentication failed for user "{requested}": {exc.reason}')
        if self.state != "connecting":
            return None
        cap = self.settings.limits.max_connections_per_identity
        held = self.proxy.identity_sessions
        if cap and held[principal.user] >= cap:
            self.proxy.stats.refusals["dbguard:too-many-connections"] += 1
            self.proxy.events.emit(EventKind.CONNECTION, {
                "session": self.session_id, "client_addr": self.client_addr, "user": principal.user,
                "authenticated": True, "sqlstate": "53300", "reason": "per-identity connection limit"}, flush=True)
            return self._fatal("53300", f'too many connections for "{principal.user}" through this dbguard proxy '
                                        f"(limit {cap} per identity)")
        held[principal.user] += 1
        self._counted_as = principal.user
        self.principal = principal
        return await self._open_upstream()

    async def _open_upstream(self) -> None:
        forwarded = {k: v for k, v in self.params.items() if k in FORWARDED_PARAMS}
        forwarded["client_encoding"] = "UTF8"
        try:
            conn = await upstream.connect(self.settings.upstream, forwarded)
        except upstream.UpstreamError as exc:
            log.warning("session %s: upstream connection failed: %s", self.session_id, exc)
            return self._fatal(exc.sqlstate if exc.sqlstate.startswith(("08", "28", "3D", "53", "57")) else "08006",
                               str(exc))
        if self.state != "connecting":
            conn.transport.close()
            return None
        self.upstream = conn
        conn.protocol.on_lost = self._on_upstream_lost
        conn.protocol.on_pause = self._on_upstream_pause
        rest = conn.protocol.reader.take_rest()
        conn.protocol.on_data = self._on_upstream_data
        assert self.principal is not None
        if self.proxy.masking is not None:
            self.mask_set = self.proxy.masking.for_principal(self.principal)
            if self.mask_set is not None:
                self.relay.watch_rows(self._mask_rows)
                self.relay.watch_also(b"N")  # notices may quote values too
        if self.proxy.row_evidence is not None and self.proxy.row_evidence.active:
            self._rowmarks = RowMarks(self.proxy.row_evidence.chain, self.session_id, self._rfq_seen,
                                      self.proxy.row_evidence.key)
            self.relay.watch_also(b"123")  # the client's ParseComplete/BindComplete are counted (see rowmarks)
        self.guard = Guard(decider=self.proxy.decider, cache=self.proxy.facts_cache, principal=self.principal,
                           session={"database": self.settings.upstream.database, "user": self.params.get("user", ""),
                                    "application_name": self.params.get("application_name", ""),
                                    "client_addr": self.client_addr.rsplit(":", 1)[0], "protocol": "simple",
                                    "in_transaction": False})
        self.key = self.proxy.register_cancel(self, conn.process_id, conn.secret_key)
        self._event_prefix = orjson.dumps({
            "session": self.session_id, "identity": self.principal.to_dict(),
            "database": self.settings.upstream.database, "client_addr": self.client_addr})[1:-1]
        out = [m.encode_auth_request(0)]
        out += [m.encode_parameter_status(k, v) for k, v in conn.parameters.items()]
        out.append(m.encode_backend_key_data(*self.key))
        out.append(m.encode_ready_for_query(conn.status))
        self._send(b"".join(out))
        self.state = "ready"
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.proxy.events.emit(EventKind.CONNECTION, {
            "session": self.session_id, "client_addr": self.client_addr, "identity": self.principal.to_dict(),
            "database": self.settings.upstream.database, "application_name": self.params.get("application_name", ""),
            "tls": self.tls, "authenticated": True})
        self.proxy.stats.connections += 1
        if rest:
            self._on_upstream_data(rest)
        return None

    # -- server -> client --------------------------------------------------------------------------

    def _on_upstream_data(self, data: bytes) -> None:
        if self._cut_after is not None:
            return None  # closing: the FATAL was the last thing relayed
        if self._holding is not None:
            self._holding += data  # waiting for the catalog (see _hold_for_catalog)
            return None
        try:
            out = self.relay.feed(data)
        except RemoteProtocolError as exc:
            return self._fatal("08P01", f"the database server sent a malformed message: {exc}")
        if self._cut_after is not None:
            out = out[:out.find(self._cut_after) + len(self._cut_after)]
        if out:
            self._send(out)
        if self._finished:
            finished, self._finished = self._finished, []
            self._record_completions(finished)
        return None

    def _on_upstream_lost(self, exc: BaseException | None) -> None:
        if self.state in ("closed", "gone"):
            return
        self._fatal("08006", "the database server closed the connection", log_level=logging.INFO)

    def _on_upstream_pause(self, paused: bool) -> None:  # the server reads slowly: stop reading the client
        if self.transport is None:
            return
        if paused:
            self._client_paused = True
            self.transport.pause_reading()
        elif self._client_paused:
            self._client_paused = False
            if not self._busy:
                self.transport.resume_reading()

    def _on_backend_message(self, type_code: int, payload: bytes) -> bytes | None:
        marks = self._rowmarks
        if marks is not None:
            if marks.feed(type_code, payload):
                if not marks.active and self.mask_set is None:
                    self.relay.watch_less()  # DataRows pass untouched again
                return b""  # a row marker's answer: not for the client
            if type_code in (0x31, 0x32, 0x33):  # ParseComplete, BindComplete, CloseComplete: the client's
                return None
            if (type_code == 0x44 or type_code == 0x4E) and self.mask_set is None:
                return None
            if type_code == 0x45 and marks.error_skips_query() and self.upstream is not None:
                # The marker before a simple Query failed: the server now skips the Query and waits
                # for a Sync. Ours takes the Query's place (its ReadyForQuery answers the Query).
                log.warning("session %s: a row-evidence marker failed; the statement did not run", self.session_id)
                self.upstream.transport.write(m.encode_sync())
        if type_code == 0x44:  # 'D' DataRow: watched only when this identity has masks
            return self._mask_row(payload)
        if type_code == 0x64:  # 'd' CopyData of a COPY OUT (masking only)
            return self._mask_copy_row(payload)
        if type_code == 0x48 or type_code == 0x63:  # 'H' CopyOutResponse, 'c' CopyDone (masking only)
            return self._on_copy_out(type_code, payload)
        self._active_plan = None  # any other message may end the result the plan was for
        if type_code == 0x43:  # 'C' CommandComplete
            self.completions.command_complete(payload[:-1].decode("ascii", "replace"))
            self._query_plan = None
            return None
        if type_code == 0x54 or type_code == 0x6E:  # 'T' RowDescription, 'n' NoData (masking only)
            return self._on_row_description(type_code, payload)
        if type_code == 0x5A:  # 'Z' ReadyForQuery
            status = chr(payload[0]) if payload else "I"
            self._rfq_seen += 1
            self._tx_status = status
            if status == "I":
                self._idle_rt = self._rfq_seen
            if marks is not None:
                marks.ready(self._rfq_seen)
            if self._idle_waiters and self._rfq_seen >= self._syncs_sent:
                for waiter in self._idle_waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                self._idle_waiters.clear()
            finished = self.completions.ready(self._rfq_seen)
            if finished:
                self._finished += finished  # recorded once the reply is on its way to the client
            if self.guard is not None:
                self.guard.update(in_transaction=status != "I")
            if status == "I":
                self._drop_portals(list(self._portals))  # portals do not outlive their transaction
                self._portal_plans.clear()
                self._portal_copies.clear()
            while self._describes and self._describes[0][2] <= self._rfq_seen:
                self._describes.popleft()  # skipped after an error
            while self._copy_plans and self._copy_plans[0][1] <= self._rfq_seen:
                self._copy_plans.popleft()  # a COPY that failed before its output began
            if self._markers:
                for name in [n for n, (_, sync_no) in self._markers.items() if sync_no <= self._rfq_seen]:
                    del self._markers[name]
            return None
        if type_code == 0x45 and self._markers:  # 'E': is it one of our refusals coming back?
            text = payload.decode("utf-8", "replace")
            for name, (refusal, _) in list(self._markers.items()):
                if f'"{name}"' in text:
                    del self._markers[name]
                    return m.encode_error(sqlstate=str(refusal.sqlstate), message=refusal.message,
                                          detail=refusal.detail, hint=refusal.hint)
        if type_code == 0x45:
            fields = m.decode_error_fields(payload)
            if fields.get("S") in ("ERROR", "FATAL", "PANIC"):
                self.completions.error(fields.get("C", ""), fields.get("M", ""))
            if self.mask_set is not None:
                return m.encode_error_fields(b"E", _masked_fields(fields))
            return None
        if type_code == 0x4E:  # 'N' NoticeResponse: watched only when this identity has masks
            return m.encode_error_fields(b"N", _masked_fields(m.decode_error_fields(payload)))
        if type_code == 0x73 or type_code == 0x49:  # 's' PortalSuspended, 'I' EmptyQueryResponse
            self.completions.command_complete("")
            return None
        if type_code == 0x53:  # 'S' ParameterStatus: the last line of defence for parser/server agreement
            name, _, rest = payload.partition(b"\x00")
            value = rest.split(b"\x00", 1)[0].decode("utf-8", "replace")
            if (name == b"standard_conforming_strings" and value != "on") or (
                name == b"client_encoding" and not F.is_utf8(value)
            ):
                log.error("session %s: server reports %s=%s; closing", self.session_id, name.decode(), value)
                # The FATAL takes the ParameterStatus's place, ahead of the ReadyForQuery: the client
                # reads it as the answer to the statement that changed the setting (a FATAL that
                # arrives while the client is idle is dropped by libpq). Nothing after it is relayed.
                message = (f"dbguard closed the session: the server now reads SQL with {name.decode()}={value}, "
                           "which dbguard cannot judge safely")
                self._cut_after = m.encode_error(sqlstate="42501", message=message, severity="FATAL")
                asyncio.get_running_loop().call_soon(self._fatal, "42501", message)
                return self._cut_after
        return None

    def _on_row_description(self, type_code: int, payload: bytes) -> bytes | None:
        front = self._describes[0] if self._describes else None
        plan: MaskPlan | None = None  # no masks resolved yet: rows under it close the session, never pass
        try:
            if type_code == 0x6E:  # NoData: no rows to mask
                plan = MaskPlan((), ())
            elif self._masks is not None:
                plan = plan_for(parse_row_description(payload), self._masks)
        except CatalogOutdated as exc:
            if self._held_once:
                # Still unknown after a fresh read: created in this client's own open transaction,
                # where no other connection can see it. Nothing can tell whether to mask it.
                self._held_once = False
                return self._fatal_in_stream(
                    "55000", f"dbguard closed the session: {exc}, and it is not visible outside this session's "
                             "open transaction (commit the DDL first); dbguard will not pass columns it cannot judge")
            # A column added since the snapshot (DDL outside dbguard): hold the results, read the
            # catalog again, then judge this RowDescription afresh.
            log.info("session %s: %s; refreshing the catalog", self.session_id, exc)
            self._held_once = True
            self._hold_for_catalog()
            return HOLD
        self._held_once = False
        if front is not None and front[2] == self._rfq_seen + 1:  # the answer to a Describe
            self._describes.popleft()
            portal, ours, _ = front
            if portal is not None:
                self._portal_plans[portal] = plan
            return b"" if ours else None
        self._query_plan = plan  # a simple Query's result
        return None

    def _row_plan(self) -> MaskPlan | None:
        """The plan of the result whose rows are arriving (looked up at its first row)."""
        plan = self._active_plan
        if plan is None:
            current = self.completions.current()
            if current is not None and not current.until_ready:
                plan = self._portal_plans.get(current.portal)
            else:
                plan = self._query_plan
            self._active_plan = plan
            if plan and current is not None:
                current.masked = tuple(dict.fromkeys(current.masked + plan.columns))  # for the ledger
        return plan

    def _mask_row(self, payload: bytes) -> bytes | None:
        plan = self._row_plan()
        if plan is None:
            return self._fatal_in_stream("XX000", "dbguard closed the session: it cannot tell which columns of "
                                                  "this result are masked, and will not pass them unmasked")
        if not plan:
            return None
        assert self.proxy.masking is not None
        self.proxy.stats.masked_rows += 1
        return mask_data_row(payload, plan, self.proxy.masking.hash_key)

    def _mask_rows(self, data: bytes, pos: int, end: int) -> tuple[bytes | None, int]:
        """The relay's rows callback: a run of DataRows masked in one call (see BackendRelay.watch_rows)."""
        if self._rowmarks is not None and self._rowmarks.active:
            return None, pos  # a row marker's DataRow may be among them: one by one (the DataRow callback)
        plan = self._row_plan()
        if plan is None:
            return None, pos  # the DataRow callback closes the session
        assert self.proxy.masking is not None
        out, after, rows = plan.rows(data, pos, end, MAX_DATA_ROW, self.proxy.masking.hash_key)
        if plan:
            self.proxy.stats.masked_rows += rows
        return out, after

    def _hold_for_catalog(self) -> None:
        self._holding = bytearray()
        if self.upstream is not None:
            self.upstream.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._release_after_refresh())

    async def _release_after_refresh(self) -> None:
        assert self.proxy.masking is not None and self.mask_set is not None
        try:
            await self.proxy.masking.catalog.refresh()
            snap = self.proxy.masking.catalog.snapshot
            assert snap is not None
            self._masks = self.proxy.masking.catalog.resolve(self.mask_set, snap)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the held result must not be released
            self._holding = None
            self._fatal("55000", f"dbguard closed the session: it cannot read the catalog to mask this result: {exc}")
            return
        held, self._holding = bytes(self._holding or b""), None
        if self.state in ("closed", "gone"):
            return
        if self.upstream is not None:
            self.upstream.transport.resume_reading()
        self._on_upstream_data(held)

    def _on_copy_out(self, type_code: int, payload: bytes) -> bytes | None:
        if type_code == 0x63:  # CopyDone
            self._copy_active = None
            return None
        current = self.completions.current()
        plan: CopyPlan | None = None
        if current is not None and not current.until_ready:  # an Execute: its portal's plan
            plan = self._portal_copies.get(current.portal)
        elif self._copy_plans and self._copy_plans[0][1] == self._rfq_seen + 1:
            plan = self._copy_plans.popleft()[0]
        if plan is None:
            return self._fatal_in_stream("XX000", "dbguard closed the session: it cannot tell which columns of "
                                                  "this COPY are masked, and will not pass them unmasked")
        if plan and payload[:1] == b"\x01":  # binary overall format
            return self._fatal_in_stream("42501", "dbguard closed the session: binary COPY of masked columns")
        self._copy_active, self._copy_rows = plan, 0
        if plan and current is not None:
            current.masked = tuple(dict.fromkeys(current.masked + plan.columns))
        return None

    def _mask_copy_row(self, payload: bytes) -> bytes | None:
        plan = self._copy_active
        if plan is None:
            return self._fatal_in_stream("XX000", "dbguard closed the session: COPY data outside a COPY it judged")
        self._copy_rows += 1
        if not plan or (plan.header and self._copy_rows == 1):
            return None
        self.proxy.stats.masked_rows += 1
        row = mask_copy_row(payload, plan)
        return b"d" + struct.pack("!i", len(row) + 4) + row

    def _fatal_in_stream(self, sqlstate: str, message: str) -> bytes:
        """Close the session with a FATAL relayed in place of the current server message."""
        log.error("session %s: %s", self.session_id, message)
        self._cut_after = m.encode_error(sqlstate=sqlstate, message=message, severity="FATAL")
        asyncio.get_running_loop().call_soon(self._fatal, sqlstate, message)
        return self._cut_after

    async def _mask_check(self, sql: str, portal: str | None = None) -> Refusal | None:
        """Refuse what could carry a masked value to the client in a form dbguard cannot mask."""
        assert self.proxy.masking is not None and self.mask_set is not None
        try:
            self._masks, reason, copies = await self.proxy.masking.check(self.mask_set, sql)
        except (psycopg.Error, OSError) as exc:
            log.error("session %s: masking catalog unavailable: %s", self.session_id, exc)
            return Refusal(sqlstate=SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE, rule="dbguard:masking-unavailable",
                           message="dbguard refused the statement: it cannot read the catalog it needs to mask "
                                   "this identity's columns right now")
        if reason is None:
            if portal is not None:  # extended protocol: the portal's Execute produces the COPY
                if copies:
                    self._portal_copies[portal] = copies[0]
                else:
                    self._portal_copies.pop(portal, None)
            else:  # simple protocol: the Query's COPY statements produce output in order
                sync_no = self._syncs_sent + 1
                self._copy_plans.extend((plan, sync_no) for plan in copies)
            return None
        return Refusal(sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule="dbguard:mask-lineage",
                       message=f"dbguard refused the statement: {reason}",
                       hint="masked columns may be selected as plain columns; they are masked in the result")

    # -- client -> server --------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal, *, sync: bool) -> None:
        """Make the server fail in place of the refused message (see the module docstring)."""
        self._refusals += 1
        self.proxy.stats.refusals[refusal.rule] += 1
        name = f"{REFUSED_PREFIX}{self.session_id}.{self._refusals}"
        # The marker is dropped when the ReadyForQuery of the Sync that closes this batch arrives.
        self._markers[name] = (refusal, self._syncs_sent + 1)
        if self._rowmarks is not None:
            self._rowmarks.client_parse_or_bind(self._syncs_sent + 1)
        self._out += m.encode_bind(statement=name)
        if sync:
            self._out += m.encode_sync()
            self._syncs_sent += 1
        else:
            self._discard_until_sync = True

    def _emit_refusal(self, refusal: Refusal, statement: str = "",
                      extra: dict[str, Any] | None = None) -> Waiter | None:
        assert self.principal is not None
        fields: dict[str, Any] = {"session": self.session_id, "identity": self.principal.to_dict(),
                                  "database": self.settings.upstream.database, "client_addr": self.client_addr,
                                  "rule": refusal.rule, "sqlstate": str(refusal.sqlstate), "reason": refusal.message,
                                  "statement": statement[:4096]}
        if extra:
            fields.update(extra)
        return self.proxy.events.emit(EventKind.REFUSAL, fields, flush=True, durable=True)

    def _after_commit(self, future: Waiter | None, then: Callable[[Refusal | None], None]) -> None:
        """Run ``then`` once the ledger has committed (at once without a ledger).

        ``then`` gets a refusal when the ledger could not commit: what must be recorded is refused.
        """
        if future is None:
            then(None)
            return
        self._run_async(self._await_commit(future, then))

    async def _await_commit(self, future: Waiter | None,
                            then: Callable[[Refusal | None], None]) -> None:
        if future is None:
            then(None)
            self._flush()
            return
        try:
            await asyncio.wrap_future(future)
        except LedgerUnavailable as exc:
            log.error("session %s: ledger unavailable, refusing: %s", self.session_id, exc)
            self.proxy.stats.ledger_refusals += 1
            then(Refusal(sqlstate=SqlState.IO_ERROR, rule="dbguard:ledger-unavailable",
                         message="dbguard refused the statement: the audit ledger cannot record it right now"))
        else:
            then(None)
        self._flush()

    def _on_message(self, msg: object) -> None:
        if self._discard_until_sync and not isinstance(msg, m.Sync | m.Terminate):
            return None  # PostgreSQL does the same after an error in an extended-protocol batch
        handler = _DISPATCH.get(type(msg))
        if handler is None:
            name = getattr(msg, "type_code", type(msg).__name__)
            return self._refuse_protocol(SqlState.PROTOCOL_VIOLATION,
                                         f"dbguard refused an unknown or unexpected message type {name!r}")
        return handler(self, msg)

    def _on_execute(self, msg: m.Execute) -> None:
        self._in_batch = True
        portal = self._portals.get(msg.portal)
        if portal is None:
            return self._refuse_protocol(SqlState.INVALID_CURSOR_NAME,
                                         f"dbguard refused Execute: portal {msg.portal!r} was not bound through dbguard")
        _, stmt, deferred = portal
        if self._approved_stmts and stmt in self._approved_stmts:
            self._executes_sent.add(stmt)  # its outcome now comes with its completion
        if deferred is not None:  # the first Execute writes the read's decision; later pieces add completions
            self._portals[msg.portal] = (portal[0], stmt, None)
        self.completions.expect(Pending(stmt, self._syncs_sent + 1, False, deferred, portal=msg.portal))
        if self._rowmarks is not None:
            if self._wants_mark(portal[0]):
                self._send_mark(stmt, self._syncs_sent + 1, before_query=False)
                self._batch_mark = True
            if any(f.kind == "TransactionStmt" for f in portal[0]):
                self._batch_mark = False  # COMMIT / ROLLBACK / BEGIN: perhaps another transaction from here
        self._out += msg.raw
        return None

    def _on_sync(self, msg: m.Sync) -> None:
        self._discard_until_sync = False
        self._in_batch = False
        self._batch_mark = False
        self._syncs_sent += 1
        self._out += msg.raw

    def _on_describe(self, msg: m.Describe) -> None:
        self._in_batch = True
        known = self._statements if msg.kind == "S" else self._portals
        sql_cursor = msg.kind == "P" and self.guard is not None and msg.name in self.guard.sql_cursors
        if msg.name not in known and not sql_cursor:
            state = SqlState.INVALID_SQL_STATEMENT_NAME if msg.kind == "S" else SqlState.INVALID_CURSOR_NAME
            what = "prepared statement" if msg.kind == "S" else "portal"
            return self._refuse_protocol(state, f"dbguard refused Describe: {what} {msg.name!r} is unknown to dbguard")
        if self.mask_set is not None:
            self._describes.append((msg.name if msg.kind == "P" else None, False, self._syncs_sent + 1))
        self._out += msg.raw
        return None

    def _on_close(self, msg: m.Close) -> None:
        self._in_batch = True
        if msg.kind == "S":
            self._statements.pop(msg.name, None)
            self._param_types.pop(msg.name, None)
        else:
            self._drop_portals([msg.name])
        self._out += msg.raw

    def _on_passthrough(self, msg: m.FrontendMessage) -> None:
        self._out += msg.raw

    def _on_terminate(self, msg: m.Terminate) -> None:
        self._out += msg.raw
        self._flush()
        self._close()

    def _on_function_call(self, msg: m.FunctionCall) -> None:
        self._refuse_protocol(SqlState.FEATURE_NOT_SUPPORTED,
                              "dbguard refused a FunctionCall message: the fast-path function "
                              "interface bypasses SQL; call the function with SELECT")

    def _refuse_protocol(self, sqlstate: SqlState, message: str) -> None:
        refusal = Refusal(sqlstate=sqlstate, message=message, rule="dbguard:protocol")
        sync = not self._in_batch
        if not sync:
            self._discard_until_sync = True  # at once: what follows in this batch is dropped meanwhile
        self._after_commit(self._emit_refusal(refusal), lambda failed: self._refuse(failed or refusal, sync=sync))

    # simple protocol

    def _decode(self, sql: bytes) -> str | None:
        try:
            return sql.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _on_query(self, msg: m.Query) -> None:
        assert self.guard is not None
        if self._in_batch and self._rowmarks is not None:
            # After an error in the batch the server skips this Query without a word, so whether it
            # earns a ReadyForQuery is unknown until the Sync: the round trips could not be counted,
            # and a marker's failure could not be answered in place.
            return self._refuse_protocol(SqlState.PROTOCOL_VIOLATION,
                                         "dbguard refused a simple Query sent inside an extended-protocol batch: "
                                         "send Sync first (row evidence counts each round trip)")
        self.guard.update(protocol="simple")
        sql = self._decode(msg.sql)
        if sql is None:
            return self._refuse_and_log(_NOT_UTF8,
                                        "", sync=True)
        try:
            statements, normalized = self.proxy.facts_cache.literal_independent(sql)
        except F.AnalysisError as exc:
            return self._refuse_and_log(refusal_for_analysis_error(exc), sql, sync=True)
        if not statements:  # empty or only comments: the server answers EmptyQueryResponse
            self._syncs_sent += 1
            self._out += msg.raw
            return None
        now = datetime.datetime.now(datetime.UTC)
        if self._rowmarks is not None and self._rfq_seen < self._syncs_sent and any(map(_may_write, statements)):
            # A write's marker goes just before its Query, and if the marker fails the server skips
            # everything up to a Sync: with earlier Queries still unanswered, wait for them first.
            return self._run_async(self._query_slow(msg, statements, normalized, now, sql, wait_idle=True))
        verdict = self.guard.judge_fast(statements, now) if self.mask_set is None else None
        if verdict is None or (verdict.refusal is not None and self._approval_for(verdict) is not None):
            return self._run_async(self._query_slow(msg, statements, normalized, now, sql))
        return self._apply_query(msg, verdict, normalized, now)

    def _send_mark(self, stmt: int, sync_no: int, *, before_query: bool) -> None:
        """A row-evidence marker for statement ``stmt`` goes upstream just before it."""
        assert self._rowmarks is not None
        self._out += self._rowmarks.mark(stmt, sync_no, before_query=before_query)
        self.relay.watch_also(b"DN", for_now=True)  # its DataRow, its notices
        self._mark_rt = sync_no

    async def _until_idle(self) -> None:
        """Until the server has answered every round trip sent so far."""
        while self._rfq_seen < self._syncs_sent:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wants_mark(self, statements: tuple[F.StatementFacts, ...], counted: int = 0) -> bool:
        """Whether a row-evidence marker goes before these statements: before every one that may change
        rows (trigger and cascade changes of watched tables are then attributed too), unless the marker
        would change how they run. It would for statements that must come first in their transaction
        (SET TRANSACTION, BEGIN ISOLATION LEVEL ...), that refuse to run in one (VACUUM, CREATE
        DATABASE ...), and for procedures and DO blocks outside an explicit transaction (they may
        COMMIT): their changes are recorded unattributed (docs/ledger.md). Once a marker ran in the
        transaction, nothing can come first any more, so every later statement that may write gets
        one: no change is ever credited to an earlier statement. Not into a failed transaction.
        ``counted``: round trips of these statements already counted in ``_syncs_sent``."""
        idle = self._rfq_seen >= self._syncs_sent - counted
        if idle and self._tx_status == "E":
            return False
        if not any(_may_write(f) for f in statements):
            return False
        if (idle and self._tx_status == "T" and self._mark_rt > self._idle_rt) or self._batch_mark:
            return True  # a marker already ran in this transaction: nothing is first any more
        in_block = idle and self._tx_status == "T"
        for f in statements:
            if f.kind in _MARKABLE or (not _may_write(f) and f.kind not in _FIRST_IN_TRANSACTION):
                continue
            if in_block and f.kind not in _FIRST_IN_TRANSACTION:
                continue  # CALL, DO, CREATE TABLE AS, DECLARE, FETCH ... inside an explicit transaction
            return False
        return True

    async def _query_slow(self, msg: m.Query, statements: tuple[F.StatementFacts, ...], normalized: str,
                          now: datetime.datetime, sql: str = "", *, wait_idle: bool = False) -> None:
        assert self.guard is not None
        if wait_idle:
            await self._until_idle()
        verdict = await self.guard.judge(statements, now)
        held = self._approval_for(verdict) if verdict.refusal is not None else None
        if verdict.refusal is not None and self.proxy.approvals is not None and mixed_rules(verdict.decisions):
            verdict = dataclasses.replace(verdict, refusal=dataclasses.replace(
                verdict.refusal, hint="these statements need approvals under different rules: send them one "
                                      "at a time, and each gets its own approval request"))
        if (held is not None or verdict.refusal is None) and self.mask_set is not None:
            # Before any approval is claimed: a statement masking refuses must not use one up.
            refusal = await self._mask_check(sql)  # the text itself: $$ bodies and COPY options matter
            if refusal is not None:
                await self._refuse_and_log_now(refusal, self.proxy.facts_cache.recorded_text(normalized), sync=True)
                return
        if held is not None:
            verdict = await self._approve(verdict, held, sql, ())
        future = self._emit_decision(verdict, self.proxy.facts_cache.recorded_text(normalized), "simple", now)
        await self._await_commit(future, lambda failed: self._finish_query(msg, verdict, failed))

    def _apply_query(self, msg: m.Query, verdict: Verdict, normalized: str, now: datetime.datetime) -> None:
        future = self._emit_decision(verdict, self.proxy.facts_cache.recorded_text(normalized), "simple", now)
        if future is None:
            return self._finish_query(msg, verdict, None)  # a read: nothing to wait for
        return self._after_commit(future, lambda failed: self._finish_query(msg, verdict, failed))

    def _finish_query(self, msg: m.Query, verdict: Verdict, failed: Refusal | None) -> None:
        refusal = failed or verdict.refusal
        if refusal is not None:
            self._approval_not_run(refusal)
            return self._refuse(refusal, sync=True)
        self._send_warnings(verdict)
        self._remember(verdict.statements)
        self._syncs_sent += 1
        stmt, deferred = self._decided
        self._decided = (0, None)
        self._approval_ran(stmt)
        self.completions.expect(Pending(stmt, self._syncs_sent, True, deferred))
        if self._rowmarks is not None and self._wants_mark(verdict.statements, counted=1):
            self._send_mark(stmt, self._syncs_sent, before_query=True)
        self._out += msg.raw
        return None

    def _remember(self, statements: tuple[F.StatementFacts, ...]) -> None:
        """Track what forwarded statements do to prepared statements, at SQL and protocol level."""
        assert self.guard is not None
        self.guard.remember(statements)
        for f in statements:
            if f.kind == "DeallocateStmt":
                if f.prepared_name:
                    self._statements.pop(f.prepared_name, None)
                else:
                    self._statements = {k: v for k, v in self._statements.items() if k == ""}
            elif f.kind == "DiscardStmt":
                self._statements = {k: v for k, v in self._statements.items() if k == ""}
            if f.command in _DDL_COMMANDS and self.proxy.masking is not None:
                self.proxy.masking.catalog.stale = True  # masking reads the catalog again before its next check

    # -- approvals -------------------------------------------------------------------------------

    def _approval_for(self, verdict: Verdict) -> Decision | None:
        if self.proxy.approvals is None:
            return None
        return approval_decision(verdict.decisions)

    async def _approve(self, verdict: Verdict, decision: Decision, statement: str, params: tuple[str | None, ...],
                       *, formats: tuple[int, ...] = (), types: tuple[int, ...] = ()) -> Verdict:
        """Resolve a statement ``decision`` holds: run it under a claimed approval, or refuse naming the request."""
        assert self.principal is not None and self.proxy.approvals is not None
        # SQL-level EXECUTE runs a body prepared earlier: the request (and its fingerprint) must carry
        # that body, or an approval of "EXECUTE p" would run whatever p means later.
        bodies = [f.text for f in verdict.judged if f not in verdict.statements]
        if bodies:
            statement = "".join(f"/* dbguard: prepared earlier: {b} */\n" for b in bodies) + statement
        self._hold_cancel = asyncio.Event()

        def notice(text: str) -> None:  # hold mode only: the statement now waits for a decision
            self._awaiting_decision = True
            self._send(m.encode_error(sqlstate="01000", message=text, severity="NOTICE", notice=True))

        if self.transport is not None:
            self.transport.resume_reading()  # a paused transport would not report a client that leaves
        try:
            outcome = await self.proxy.approvals.resolve(
                decision=decision, principal=self.principal, database=self.settings.upstream.database,
                statement=statement, params=params, operation=verdict.judged[0].command if verdict.judged else "",
                session_id=self.session_id, notice=notice, cancelled=self._hold_cancel,
                closed=lambda: self.state in ("closed", "gone"), formats=formats, types=types,
                estimable=len(verdict.statements) == 1 and not bodies)
        except LedgerUnavailable:
            self.proxy.stats.ledger_refusals += 1
            return dataclasses.replace(verdict, refusal=Refusal(
                sqlstate=SqlState.IO_ERROR, rule="dbguard:ledger-unavailable",
                message="dbguard refused the statement: the audit ledger cannot record it right now"))
        except Exception as exc:  # noqa: BLE001 - a store that cannot answer means no approval (fail closed)
            log.warning("session %s: approval store failed: %s", self.session_id, exc)  # details stay in the log
            return dataclasses.replace(verdict, refusal=Refusal(
                sqlstate=SqlState.INSUFFICIENT_PRIVILEGE, rule=decision.rule,
                message=f"dbguard: approval required by rule {decision.rule}, and the approval store cannot be "
                        f"reached ({type(exc).__name__})"))
        finally:
            self._hold_cancel = None
            self._awaiting_decision = False
            if self.transport is not None and self.state not in ("closed", "gone"):
                self.transport.pause_reading()  # still busy until this step ends
        if outcome.run and self.state in ("closed", "gone"):
            self.proxy.approvals.finished(outcome.request, None, "not executed: the client went away")
            return dataclasses.replace(verdict, refusal=Refusal(sqlstate=SqlState.QUERY_CANCELED, rule=decision.rule,
                                                                message="the client went away"))
        self._approval_note = orjson.dumps({"request": outcome.request, "outcome": outcome.state})
        if outcome.run:
            self._approved_next = outcome.request
            return dataclasses.replace(verdict, refusal=None)
        return dataclasses.replace(verdict, refusal=Refusal(sqlstate=outcome.sqlstate, rule=decision.rule,
                                                            message=outcome.message, hint=outcome.hint))

    def holding(self) -> bool:
        """A statement of this session waits for an approval now (hold mode)."""
        return self._awaiting_decision

    def cancel_hold(self) -> bool:
        """A cancel request while a statement waits for approval ends the wait."""
        if self._hold_cancel is None:
            return False
        self._hold_cancel.set()
        return True

    def _approval_ran(self, stmt: int) -> None:
        """The claimed statement is forwarded as statement ``stmt``: report its outcome on completion."""
        if self._approved_next:
            self._approved_stmts[stmt] = self._approved_next
            self._approved_next = ""

    def _approval_not_run(self, refusal: Refusal) -> None:
        if self._approved_next and self.proxy.approvals is not None:
            self.proxy.approvals.finished(self._approved_next, None, f"not executed: {refusal.message}")
            self._approved_next = ""

    async def _refuse_and_log_now(self, refusal: Refusal, statement: str, *, sync: bool) -> None:
        """_refuse_and_log from inside an async step: wait for the ledger here, so the refusal takes its
        place in the stream before the step ends and the next message is processed."""
        if not sync:
            self._discard_until_sync = True
        await self._await_commit(self._emit_refusal(refusal, statement),
                                 lambda failed: self._refuse(failed or refusal, sync=sync))

    def _refuse_and_log(self, refusal: Refusal, statement: str, *, sync: bool) -> None:
        if not sync:
            self._discard_until_sync = True
        self._after_commit(self._emit_refusal(refusal, statement),
                           lambda failed: self._refuse(failed or refusal, sync=sync))

    def _send_warnings(self, verdict: Verdict) -> None:
        for text in verdict.warnings:
            self._send(m.encode_error(sqlstate="01000", message=text, severity="WARNING", notice=True))

    def _emit_decision(self, verdict: Verdict, statement: str, protocol: str,
                       now: datetime.datetime) -> Waiter | None:
        refusal = verdict.refusal
        counts = self.proxy.stats.decisions
        by_policy = self.proxy.stats.policy_outcomes
        for d in verdict.decisions:
            counts[(d.enforced, d.rule)] += 1  # the enum itself: .value costs a lookup per statement
            by_policy[(d.policy, _outcome(d))] += 1
        if not self.proxy.events.active:  # --events none and no ledger: nothing would read the entry
            self._stmt_no += 1
            self._decided = (self._stmt_no, None)
            self._approval_note = b""
            return None
        # The facts and decisions of a statement shape repeat: serialize them once per shape.
        decisions = verdict.decisions
        key = (id(verdict.judged), id(decisions[0])) if len(decisions) == 1 else \
            (id(verdict.judged), *map(id, decisions))
        memo = _SHAPE_MEMO.get(key)
        if memo is None or memo[0] is not verdict.judged or refusal is not None:
            shape = orjson.dumps({
                "statements": [{"command": f.command, "fingerprint": f.fingerprint,
                                "actions": [a.to_dict() for a in f.actions], "flags": [x.value for x in f.flags]}
                               for f in verdict.judged],
                "decisions": [d.to_dict() for d in verdict.decisions],
                "outcome": "refused" if refusal is not None else "forwarded",
                "rule": refusal.rule if refusal is not None else "",
                "sqlstate": str(refusal.sqlstate) if refusal is not None else "",
                "reason": refusal.message if refusal is not None else "",
            })[1:-1]
            reads = all(map(read_only, verdict.judged))
            if refusal is None:
                if len(_SHAPE_MEMO) > 10_000:
                    _SHAPE_MEMO.clear()
                _SHAPE_MEMO[key] = (verdict.judged, verdict.decisions, shape, reads)
        else:
            shape, reads = memo[2], memo[3]
        self._stmt_no += 1
        note, self._approval_note = self._approval_note, b""  # the approval request it ran under, or waits for
        if refusal is None and reads:
            # A read's entry waits for its completion (rows, duration, error) and is written once,
            # from what every read of this shape in this session shares, serialized once.
            read_shape = self._read_shapes.get((protocol, statement, shape)) if not note else None
            if read_shape is None:
                body = b'"protocol":"' + protocol.encode() + b'","statement":' + orjson.dumps(statement[:4096])
                read_shape = ReadShape(self._event_prefix, body + (b',"approval_request":' + note if note else b"")
                                       + b"," + shape)
                if not note:
                    if len(self._read_shapes) >= 256:
                        self._read_shapes.clear()
                    self._read_shapes[(protocol, statement, shape)] = read_shape
            self._decided = (self._stmt_no, (now, read_shape))
            return None
        members = (b'"stmt":%d,"protocol":"' % self._stmt_no + protocol.encode() + b'","statement":'
                   + orjson.dumps(statement[:4096]))
        if note:
            members += b',"approval_request":' + note
        self._decided = (self._stmt_no, None)
        return self.proxy.events.emit_fragments(EventKind.DECISION, iso_time(now), self._event_prefix, members,
                                                shape, flush=refusal is not None, durable=True)

    def _drop_portals(self, names: list[str]) -> None:
        """Forget portals; a read bound but never executed still gets its decision recorded."""
        for name in names:
            portal = self._portals.pop(name, None)
            if (portal is not None and portal[1] in self._approved_stmts and portal[1] not in self._executes_sent
                    and self.proxy.approvals is not None):
                self.proxy.approvals.finished(self._approved_stmts.pop(portal[1]), None,
                                              "not executed: the portal was closed before it ran")
            if portal is not None and portal[2] is not None:
                self.proxy.events.emit_read(Done(
                    portal[1], b'{"stmt":%d,"tags":[],"rows":0,"status":"not-executed"}' % portal[1], portal[2]))

    def _record_completions(self, finished: list[Pending]) -> None:
        now_iso = ""
        durations = self.proxy.stats.statements
        for p in finished:
            if not p.stmt:
                continue
            if p.ended and not p.interrupted:
                durations.observe(p.ended - p.started)
            if self._approved_stmts and p.stmt in self._approved_stmts and self.proxy.approvals is not None:
                self._executes_sent.discard(p.stmt)
                self.proxy.approvals.finished(self._approved_stmts.pop(p.stmt), rows_from_tags(p.tags),
                                              f"{p.error[0]}: {p.error[1]}" if p.error else None)
            if not self.proxy.events.active:
                continue
            if p.deferred is not None:
                self.proxy.events.emit_read(p)  # formatted by the ledger's writer
            else:
                now_iso = now_iso or iso_time(datetime.datetime.now(datetime.UTC))
                self.proxy.events.emit_fragments(EventKind.COMPLETION, now_iso, self._event_prefix,
                                                 b'"completion":' + p.json())

    # extended protocol

    def _on_parse(self, msg: m.Parse) -> None:
        self._in_batch = True
        if msg.name.startswith("dbguard."):
            return self._refuse_protocol(SqlState.INVALID_SQL_STATEMENT_NAME,
                                         "dbguard refused Parse: statement names starting with 'dbguard.' are reserved")
        assert self.guard is not None
        if msg.name and (msg.name in self._statements or msg.name in self.guard.sql_prepared):
            # The server would keep the existing statement and fail this Parse; if we recorded the
            # new text, a later Bind would be judged on text the server never runs.
            return self._refuse_protocol(SqlState.DUPLICATE_PREPARED_STATEMENT,
                                         f"dbguard refused Parse: prepared statement {msg.name!r} already exists")
        sql = self._decode(msg.sql)
        if sql is None:
            return self._refuse_and_log(_NOT_UTF8,
                                        "", sync=False)
        try:
            statements = self.proxy.facts_cache.exact(sql)
        except F.AnalysisError as exc:
            self._statements.pop(msg.name, None)
            return self._refuse_and_log(refusal_for_analysis_error(exc), sql, sync=False)
        self._statements[msg.name] = statements
        if self.proxy.approvals is not None:  # to show binary parameters of held statements as text
            if msg.param_types:
                self._param_types[msg.name] = msg.param_types
            else:
                self._param_types.pop(msg.name, None)
        if self._rowmarks is not None:
            self._rowmarks.client_parse_or_bind(self._syncs_sent + 1)
        self._out += msg.raw
        return None

    def _on_bind(self, msg: m.Bind) -> None:
        self._in_batch = True
        assert self.guard is not None
        statements = self._statements.get(msg.statement)
        if statements is None:
            return self._refuse_protocol(SqlState.INVALID_SQL_STATEMENT_NAME,
                                         f"dbguard refused Bind: prepared statement {msg.statement!r} was not "
                                         "parsed through dbguard")
        self.guard.update(protocol="extended")
        if not statements:
            self._portals[msg.portal] = (statements, 0, None)
            if self._rowmarks is not None:
                self._rowmarks.client_parse_or_bind(self._syncs_sent + 1)
            self._out += msg.raw
            return None
        now = datetime.datetime.now(datetime.UTC)
        verdict = self.guard.judge_fast(statements, now) if self.mask_set is None else None
        if verdict is None or (verdict.refusal is not None and self._approval_for(verdict) is not None):
            return self._run_async(self._bind_slow(msg, statements, now))
        return self._apply_bind(msg, verdict, now)

    async def _bind_slow(self, msg: m.Bind, statements: tuple[F.StatementFacts, ...], now: datetime.datetime) -> None:
        assert self.guard is not None
        verdict = await self.guard.judge(statements, now)
        held = self._approval_for(verdict) if verdict.refusal is not None else None
        text = statements[0].text if len(statements) == 1 else " ; ".join(f.text for f in statements)
        if (held is not None or verdict.refusal is None) and self.mask_set is not None:
            refusal = await self._mask_check(text, portal=msg.portal)  # before any approval is claimed
            if refusal is not None:
                self._portals.pop(msg.portal, None)
                await self._refuse_and_log_now(refusal, self.proxy.facts_cache.recorded_text(text), sync=False)
                return
        if held is not None:
            types = self._param_types.get(msg.statement, ())
            verdict = await self._approve(verdict, held, text, params_as_text(msg.params, msg.param_formats, types),
                                          formats=expand_formats(msg.param_formats, len(msg.params)),
                                          types=tuple(types[:len(msg.params)]))
            if verdict.refusal is not None:
                self._discard_until_sync = True
        await self._await_commit(self._emit_bind_decision(verdict, now),
                                 lambda failed: self._finish_bind(msg, verdict, failed))

    def _emit_bind_decision(self, verdict: Verdict, now: datetime.datetime) -> Waiter | None:
        texts = verdict.statements
        text = texts[0].text if len(texts) == 1 else " ; ".join(f.text for f in texts)
        return self._emit_decision(verdict, self.proxy.facts_cache.recorded_text(text), "extended", now)

    def _apply_bind(self, msg: m.Bind, verdict: Verdict, now: datetime.datetime) -> None:
        if verdict.refusal is not None:
            self._discard_until_sync = True
        future = self._emit_bind_decision(verdict, now)
        if future is None:
            return self._finish_bind(msg, verdict, None)
        return self._after_commit(future, lambda failed: self._finish_bind(msg, verdict, failed))

    def _finish_bind(self, msg: m.Bind, verdict: Verdict, failed: Refusal | None) -> None:
        refusal = failed or verdict.refusal
        if refusal is not None:
            self._portals.pop(msg.portal, None)
            self._approval_not_run(refusal)
            return self._refuse(refusal, sync=False)
        self._send_warnings(verdict)
        self._remember(verdict.statements)
        stmt, deferred = self._decided
        self._decided = (0, None)
        self._approval_ran(stmt)
        self._drop_portals([msg.portal])  # a Bind replaces a portal of the same name
        self._portals[msg.portal] = (verdict.statements, stmt, deferred)
        if self._rowmarks is not None:
            self._rowmarks.client_parse_or_bind(self._syncs_sent + 1)
        self._out += msg.raw
        if self.mask_set is not None:  # learn the portal's columns and formats: DataRows are masked by them
            self._portal_plans.pop(msg.portal, None)
            self._out += m.encode_describe("P", msg.portal)
            self._describes.append((msg.portal, True, self._syncs_sent + 1))
        return None


WITHHELD = ("dbguard withheld the text of a message a database function raised: it could carry values of "
            "columns masked for you")


def _masked_fields(fields: dict[str, str]) -> dict[str, str]:
    """An error or notice as an identity with masks may see it. The server quotes values in messages
    and details ("Key (ssn)=(123-45-6789) already exists.", 'invalid input syntax ...: "123-45-6789"');
    text a function RAISEs (a trigger a DBA wrote: ``RAISE NOTICE 'ssn %', NEW.ssn``) may hold
    values anywhere, so it is withheld whole."""
    if "at RAISE" in fields.get("W", ""):
        fields["M"] = WITHHELD
        fields.pop("D", None)
        fields.pop("H", None)
        return fields
    fields["M"] = redact_message(fields.get("M", ""))
    if "D" in fields:
        fields["D"] = redact_detail(fields["D"])
    if "H" in fields:
        fields["H"] = redact_message(fields["H"])
    return fields


# Statements a row-evidence marker may precede anywhere (in their own implicit transaction too).
_MARKABLE = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "CopyStmt", "TruncateStmt",
                       "SelectStmt", "ExecuteStmt", "ExplainStmt"})
# Statements that must come first in their transaction (SET TRANSACTION ...): no marker before them.
_FIRST_IN_TRANSACTION = frozenset({"TransactionStmt", "VariableSetStmt"})
# Statements that never change rows (a read-only statement aside).
_NO_ROWS = frozenset({"VariableSetStmt", "VariableShowStmt", "TransactionStmt", "DeallocateStmt", "DiscardStmt",
                      "ListenStmt", "UnlistenStmt", "NotifyStmt", "LockStmt", "PrepareStmt", "ClosePortalStmt"})


def _may_write(f: F.StatementFacts) -> bool:
    return not read_only(f) and f.kind not in _NO_ROWS


_DISPATCH = {
    m.Query: ClientSession._on_query,
    m.Parse: ClientSession._on_parse,
    m.Bind: ClientSession._on_bind,
    m.Execute: ClientSession._on_execute,
    m.Sync: ClientSession._on_sync,
    m.Describe: ClientSession._on_describe,
    m.Close: ClientSession._on_close,
    m.Flush: ClientSession._on_passthrough,
    m.CopyData: ClientSession._on_passthrough,
    m.CopyDone: ClientSession._on_passthrough,
    m.CopyFail: ClientSession._on_passthrough,
    m.Terminate: ClientSession._on_terminate,
    m.FunctionCall: ClientSession._on_function_call,
}
