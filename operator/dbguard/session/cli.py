"""``dbguard proxy``: arguments, settings, start."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dbguard.audit.events import EventSink
from dbguard.config import (
    IdentitySettings,
    LedgerSettings,
    LimitSettings,
    ListenSettings,
    ProxySettings,
    UpstreamSettings,
)
from dbguard.errors import ConfigError

DESCRIPTION = """\
Serve PostgreSQL clients (psql, psycopg, asyncpg, JDBC, pgbench ...) and decide every statement
with the GuardrailPolicy files given: allowed statements go to the upstream server, refused ones
get an ERROR naming the rule (SQLSTATE 42501) and the connection stays usable.

Identity: with --tokens, clients log in with any user name listed in the token file and send
their token as the password; with --workload-identity (sidecar mode) every local client is that
identity. The upstream credentials stay in the proxy: put the password in the URL, in
--upstream-password-file, or in $DBGUARD_UPSTREAM_PASSWORD.

Masking: the policies' masking rules mask result columns per identity (docs/masking.md); SQL that
could pull a masked value out another way is refused. Audit: with --ledger every connection,
decision and outcome is chained into a tamper-evident ledger, writes and refusals durably before
they run (docs/ledger.md; query it with `dbguard audit`).

examples:
  dbguard proxy --listen 127.0.0.1:6432 \\
      --upstream postgresql://app@127.0.0.1:5432/shop --upstream-password-file /run/secrets/pg \\
      --policy examples/policy.yaml --tokens examples/tokens.yaml
  dbguard proxy ... --policy examples/policy.yaml --policy examples/masking.yaml \\
      --ledger /var/lib/dbguard/ledger.db --ledger-signing-key /run/secrets/ledger.key
  psql "host=127.0.0.1 port=6432 dbname=shop user=alice password=alice-dev-token"
"""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 6432), metavar="HOST:PORT",
                   help="address to accept clients on (default 127.0.0.1:6432)")
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="postgresql://user[:password]@host:port/dbname[?sslmode=...] of the governed server")
    p.add_argument("--upstream-password-file", metavar="FILE", help="file holding the upstream password")
    p.add_argument("--policy", action="append", default=[], required=True, metavar="FILE",
                   help="GuardrailPolicy YAML file (repeatable)")
    ident = p.add_mutually_exclusive_group(required=True)
    ident.add_argument("--tokens", metavar="FILE", help="static token file: the client's password is its token")
    ident.add_argument("--workload-identity", metavar="USER",
                       help="sidecar mode: every client is this identity (e.g. system:serviceaccount:ns:sa)")
    p.add_argument("--workload-group", action="append", default=[], metavar="GROUP",
                   help="group of the workload identity (repeatable)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate for TLS toward clients")
    p.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    p.add_argument("--require-tls", action="store_true", help="refuse clients that do not use TLS")
    p.add_argument("--engine", choices=("embedded", "opa"), default="embedded",
                   help="policy engine: embedded Rego (default) or an OPA server (--opa-url)")
    p.add_argument("--opa-url", default="", metavar="URL", help="OPA server, e.g. http://127.0.0.1:8181")
    p.add_argument("--policy-timeout", type=float, default=0.2, metavar="SECONDS",
                   help="deadline for one policy evaluation; past it the statement is refused (default 0.2)")
    p.add_argument("--events", default="-", metavar="FILE",
                   help="where decision events go as JSON lines for log shippers: - for stdout (default), "
                        "a file, or none")
    p.add_argument("--ledger", default="", metavar="FILE|URL",
                   help="the hash-chained audit ledger: a SQLite file (WAL; one proxy) or a postgresql:// URL "
                        "of a database apart from the governed one (a cluster of proxies, one chain each). "
                        "Writes and refusals are committed to it before they run or are answered")
    p.add_argument("--ledger-chain", default="", metavar="NAME",
                   help="this proxy's chain in the ledger (default HOST:PORT)")
    p.add_argument("--ledger-signing-key", default="", metavar="PEM",
                   help="Ed25519 private key that signs checkpoints (dbguard audit keygen)")
    p.add_argument("--ledger-synchronous", default="NORMAL", choices=("NORMAL", "FULL"),
                   help="NORMAL survives a killed proxy; FULL also a power loss (default NORMAL)")
    p.add_argument("--masking-key", default="", metavar="FILE",
                   help="secret key of the hash masking strategy (at least 16 bytes; the same on every proxy)")
    p.add_argument("--metrics-listen", type=_host_port, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--max-message-size", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest client message accepted (default 64 MiB)")
    p.add_argument("--login-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to finish start-up and authentication (default 10)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    password = None
    if args.upstream_password_file:
        try:
            with open(args.upstream_password_file) as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"--upstream-password-file: {exc.strerror}") from exc
    elif os.environ.get("DBGUARD_UPSTREAM_PASSWORD"):
        password = os.environ["DBGUARD_UPSTREAM_PASSWORD"]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.require_tls and not args.tls_cert:
        raise ConfigError("--require-tls needs --tls-cert and --tls-key")
    if args.engine == "opa" and not args.opa_url:
        raise ConfigError("--engine opa needs --opa-url")
    return ProxySettings(
        listen=ListenSettings(host=args.listen[0], port=args.listen[1], tls_cert=args.tls_cert or "",
                              tls_key=args.tls_key or "", require_tls=args.require_tls),
        upstream=UpstreamSettings.from_url(args.upstream, password=password),
        limits=LimitSettings(max_message_size=args.max_message_size, login_timeout=args.login_timeout,
                             policy_timeout=args.policy_timeout),
        identity=IdentitySettings(mode="token" if args.tokens else "workload", tokens_file=args.tokens or "",
                                  workload_user=args.workload_identity or "",
                                  workload_groups=tuple(args.workload_group)),
        policy_files=tuple(args.policy),
        engine=args.engine,
        opa_url=args.opa_url,
        events=args.events,
        ledger=LedgerSettings(path=args.ledger, chain=args.ledger_chain, signing_key=args.ledger_signing_key,
                              synchronous=args.ledger_synchronous),
        masking_key=args.masking_key,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        from dbguard.session import app
        proxy = app.build_proxy(settings)
    except ConfigError as exc:
        print(f"dbguard proxy: {exc}", file=sys.stderr)
        return 2
    try:
        if args.metrics_listen:
            from dbguard import metrics
            metrics.serve(proxy, *args.metrics_listen)
        import uvloop
        uvloop.run(proxy.serve_forever())
    except OSError as exc:
        print(f"dbguard proxy: cannot listen on {settings.listen.host}:{settings.listen.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["DESCRIPTION", "EventSink", "add_arguments", "run", "settings_from_args"]
