"""Assemble a Proxy from settings: identity, policy engine and decider, event sink."""

from __future__ import annotations

import pathlib
import secrets
import socket
import sqlite3
from typing import TYPE_CHECKING

from dbguard.audit.events import EventSink
from dbguard.audit.ledger_process import LedgerProcess, LedgerStartError
from dbguard.config import ProxySettings
from dbguard.errors import ConfigError
from dbguard.identity import configure as identity_configure
from dbguard.session.server import Proxy

if TYPE_CHECKING:
    from dbguard.masking.guard import MaskGuard
    from dbguard.policy.spec import Policy


def build_engine(settings: ProxySettings, policies: list[Policy], *, push: bool = True):  # noqa: ANN201
    """(bundle, engine): compile the policies and load them into the configured engine (raises
    ConfigError). ``push=False`` leaves an OPA server as it is until ``engine.push(bundle)``."""
    from dbguard.policy import compile as policy_compile

    bundle = policy_compile.compile_policies(policies)
    if settings.engine == "opa":
        from dbguard.policy import opa_server

        return bundle, opa_server.OpaServerEngine(bundle, settings.opa_url, push=push)
    from dbguard.policy import embedded

    return bundle, embedded.EmbeddedEngine(bundle)


def build_decider(settings: ProxySettings, policies: list[Policy]):  # noqa: ANN201 - the policy package's Decider
    from dbguard.policy import decider

    bundle, engine = build_engine(settings, policies)
    return decider.Decider(bundle, engine, timeout_s=settings.limits.policy_timeout)


def build_ledger(settings: ProxySettings) -> LedgerProcess | None:
    """The ledger's writer process over SQLite or the PostgreSQL sink (audit.ledger_process)."""
    if not settings.ledger.path:
        return None
    from cryptography.hazmat.primitives import serialization

    from dbguard.audit import cli as audit_cli
    from dbguard.audit import postgres_sink

    key = None
    if settings.ledger.signing_key:
        try:
            key = audit_cli.load_private_key(settings.ledger.signing_key)
        except (OSError, ValueError, SystemExit) as exc:
            raise ConfigError(f"--ledger-signing-key: {exc}") from exc
    chain = settings.ledger.chain or f"{socket.gethostname()}:{settings.listen.port}"
    postgres = postgres_sink.is_postgres_url(settings.ledger.path)
    config = {"store": "postgres" if postgres else "sqlite", "target": settings.ledger.path, "chain": chain,
              "synchronous": settings.ledger.synchronous,
              "key": key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption()).hex() if key is not None else None}
    try:
        return LedgerProcess(config, name=f"postgresql sink ({chain})" if postgres else settings.ledger.path)
    except (LedgerStartError, OSError) as exc:
        where = ": the PostgreSQL sink is unusable" if postgres else f" {settings.ledger.path}"
        raise ConfigError(f"--ledger{where}: {exc}") from exc


def build_masking(settings: ProxySettings, policies: list[Policy]) -> MaskGuard | None:
    """The masking rules of the policies, or None when no policy masks anything."""
    from dbguard.masking.catalog import Catalog
    from dbguard.masking.guard import MaskGuard
    from dbguard.masking.rules import MaskPolicy

    policy = MaskPolicy(policies)
    if not policy:
        return None
    uses_hash = any(rule.strategy == "hash" for p in policies for rule in p.masking)
    if settings.masking_key:
        try:
            key = pathlib.Path(settings.masking_key).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"--masking-key: {exc.strerror}: {settings.masking_key}") from exc
        if len(key) < 16:
            raise ConfigError("--masking-key: the key must be at least 16 bytes")
    elif uses_hash:
        raise ConfigError("a masking rule uses the hash strategy: give its secret key with --masking-key FILE "
                          "(the same key on every proxy, so hashed values line up)")
    else:
        key = secrets.token_bytes(32)  # unused: no rule hashes
    return MaskGuard(policy, Catalog(settings.upstream, policy.column_names, read_comments=policy.uses_comments), key)


def build_approvals(settings: ProxySettings, events: EventSink):  # noqa: ANN201 - approvals.flow.Approvals | None
    """The approval store and flow, or None (require-approval statements are then refused)."""
    if not settings.approvals:
        return None
    from dbguard.approvals import flow, notify

    if settings.approvals == "kubernetes" or settings.approvals.startswith("kubernetes:"):
        from dbguard.approvals.kube import KubeStore

        try:
            store = KubeStore(settings.approvals.partition(":")[2], kubeconfig=settings.identity.kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the client raises several kinds for a missing configuration
            raise ConfigError(f"--approvals kubernetes: no Kubernetes API configuration: {exc}") from exc
    else:
        from dbguard.approvals.local import LocalStore

        try:
            store = LocalStore(settings.approvals)
        except sqlite3.Error as exc:
            raise ConfigError(f"--approvals {settings.approvals}: {exc}") from exc
    notifier = notify.Notifier(settings.approval_notify_url) if settings.approval_notify_url else None
    proxy_id = settings.ledger.chain or f"{socket.gethostname()}:{settings.listen.port}"
    return flow.Approvals(store, proxy_id=proxy_id, access=settings.access, events=events,
                          upstream=settings.upstream, notifier=notifier)


def build_row_evidence(settings: ProxySettings, policies: list[Policy], events: EventSink,
                       masking: MaskGuard | None):  # noqa: ANN201 - audit.row_evidence.RowEvidence | None
    """Row-level evidence of the policies' spec.audit.rows, or None (then writes are recorded without it)."""
    import logging

    from dbguard.config import UpstreamSettings

    watched = sorted({ref for p in policies for ref in p.audit_rows})
    if not settings.ledger.row_evidence:
        if watched:
            logging.getLogger("dbguard.proxy").warning(
                "policies ask for row evidence on %s, but --row-evidence is off: writes are recorded without the "
                "rows they changed", ", ".join(watched))
        return None
    if not watched:
        raise ConfigError("--row-evidence: no policy lists columns in spec.audit.rows")
    from dbguard.audit.row_evidence import RowEvidence, marker_key
    from dbguard.masking.strategies import mask_text

    source = settings.ledger.row_evidence
    if source != "on" and not source.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--row-evidence {source!r}: expected on, off or a postgresql:// URL")
    upstream = settings.upstream if source == "on" else UpstreamSettings.from_url(source)
    mask = None
    if masking is not None:
        guard = masking

        def mask(schema: str, table: str, column: str):  # noqa: ANN202 - a text -> text function or None
            found = guard.policy.strictest(schema, table, column)
            if found is None:
                return None
            return lambda text: mask_text(found.strategy, found.opts, text, guard.hash_key) \
                if found.strategy != "null" else None

    chain = settings.ledger.chain or f"{socket.gethostname()}:{settings.listen.port}"
    return RowEvidence(upstream, chain=chain, watch=watched, events=events,
                       slot=settings.ledger.row_evidence_slot, interval=settings.ledger.row_evidence_interval,
                       mask=mask, shared=bool(settings.ledger.row_evidence_slot),
                       key=marker_key(settings.upstream.password))


def build_proxy(settings: ProxySettings) -> Proxy:
    identity = identity_configure.from_settings(settings.identity)  # a workload token is verified here
    from dbguard.policy import spec

    policies = spec.load_policies(list(settings.policy_files))
    decider = build_decider(settings, policies)
    masking = build_masking(settings, policies)
    events = EventSink.open(settings.events, ledger=build_ledger(settings))
    approvals = build_approvals(settings, events)
    proxy = Proxy(settings, decider=decider, events=events, tokens=identity.authenticator, masking=masking,
                  workload=identity.workload)
    proxy.approvals = approvals
    proxy.row_evidence = build_row_evidence(settings, policies, events, masking)
    return proxy
