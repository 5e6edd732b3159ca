"""The listener: accepts clients, owns what sessions share, forwards cancels, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import secrets
import signal
import ssl
from typing import Any

from dbguard.audit.events import EventKind, EventSink
from dbguard.config import ProxySettings
from dbguard.identity.authenticator import Authenticator
from dbguard.masking.guard import MaskGuard
from dbguard.metrics import ProxyStats
from dbguard.policy.reload import PolicyReloader
from dbguard.session import upstream
from dbguard.session.guard import FactsCache
from dbguard.session.session import ClientSession

log = logging.getLogger("dbguard.proxy")


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


class Proxy:
    """Shared state of one proxy process."""

    def __init__(self, settings: ProxySettings, *, decider: Any, events: EventSink,
                 tokens: Authenticator | None, masking: MaskGuard | None = None, workload: Any = None) -> None:
        self.settings = settings
        self.decider = decider
        self.events = events
        self.tokens = tokens  # gateway mode: the client's password is a token this verifies
        self.workload = workload  # sidecar mode (dbguard.identity.workload): every client is this identity
        self.facts_cache = FactsCache()
        self.stats = ProxyStats()
        self.masking: MaskGuard | None = masking
        self.sessions: set[ClientSession] = set()
        self.cancel_keys: dict[tuple[int, int], tuple[ClientSession, int, int]] = {}
        self.tls_context = (make_tls_context(settings.listen.tls_cert, settings.listen.tls_key)
                            if settings.listen.tls_cert else None)
        self.server: asyncio.AbstractServer | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self.reloader: Any = None
        self.identity_sessions: collections.Counter[str] = collections.Counter()  # authenticated sessions by user
        self.approvals: Any = None  # dbguard.approvals.flow.Approvals when an approval store is configured
        self.row_evidence: Any = None  # dbguard.audit.row_evidence.RowEvidence with --row-evidence
        self._reload_task: asyncio.Task | None = None

    def register_cancel(self, session: ClientSession, server_pid: int, server_key: int) -> tuple[int, int]:
        """Hand the client a key of our own: it never learns the server's, and cannot cancel other clients."""
        while True:
            key = (secrets.randbelow(2**31 - 1) + 1, secrets.randbits(31))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = (session, server_pid, server_key)
                return key

    def forward_cancel(self, pid: int, secret: int) -> None:
        entry = self.cancel_keys.get((pid, secret))
        if entry is None:
            log.info("cancel request with an unknown key ignored")
            return
        session, server_pid, server_key = entry
        session.cancel_hold()  # a statement waiting for an approval stops waiting...
        # ...and the server gets the cancel too: earlier statements of a pipeline may be running (an idle
        # backend ignores it).
        task = asyncio.get_running_loop().create_task(
            upstream.send_cancel(self.settings.upstream, server_pid, server_key))
        task.add_done_callback(lambda t: t.exception() and log.warning("cancel forwarding failed: %s", t.exception()))

    def _new_session(self) -> ClientSession:
        return ClientSession(self)

    def _flush_events(self) -> None:
        self.events.flush()
        self._flusher = asyncio.get_running_loop().call_later(0.1, self._flush_events)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.settings.listen
        if self.row_evidence is not None:  # the slot exists before the first client: no write escapes it
            await self.row_evidence.setup()  # ConfigError: the server or the role cannot give row evidence
        self.server = await loop.create_server(self._new_session, listen.host, listen.port, reuse_address=True)
        self._flusher = loop.call_later(0.1, self._flush_events)
        if self.row_evidence is not None:
            self.row_evidence.start()
        self.events.emit(EventKind.POLICY, {"event": "loaded", "revision": self.decider.revision,
                                            "policies": [p.name for p in self.decider.bundle.policies]}, flush=True)
        if self.settings.policy_reload_interval > 0 and self.settings.policy_files:
            self.reloader = PolicyReloader(self, interval_s=self.settings.policy_reload_interval)
            self._reload_task = loop.create_task(self.reloader.run())
        addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.server.sockets)
        log.info("dbguard proxy listening on %s, upstream %s", addrs, self.settings.upstream.redacted_url())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def drain(self) -> None:
        """Stop accepting; give sessions the grace period to finish; then close what is left."""
        if self.server is not None:
            self.server.close()
        deadline = asyncio.get_running_loop().time() + self.settings.limits.shutdown_grace
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s._fatal("57P01", "dbguard is shutting down")  # noqa: SLF001
        if self._flusher is not None:
            self._flusher.cancel()
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self.approvals is not None:
            await self.approvals.drain()  # outcomes of approved statements reach their requests
        if self.row_evidence is not None:
            await self.row_evidence.stop()  # a last round: what the sessions changed, before the ledger closes
        await asyncio.get_running_loop().run_in_executor(None, self.events.close)  # commits what is queued
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self.start()
        # What start() built (the SQL parser, policies, the upstream pool) lives as long as the
        # process. A full collection walks every tracked object, stalling all sessions for as long
        # as it takes (~20-35 ms with the ledger on, whose reads outlive a young collection and
        # are promoted); frozen objects are left out of it (~1 ms).
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.drain()))
        await self._stopped.wait()
