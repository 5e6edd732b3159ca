"""``dbguard proxy``: arguments, settings, start."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.parse

from dbguard.audit.events import EventSink
from dbguard.config import (
    IdentitySettings,
    LedgerSettings,
    LimitSettings,
    ListenSettings,
    OidcSettings,
    ProxySettings,
    UpstreamSettings,
)
from dbguard.errors import ConfigError

DESCRIPTION = """\
Serve PostgreSQL clients (psql, psycopg, asyncpg, JDBC, pgbench ...) and decide every statement
with the GuardrailPolicy files given: allowed statements go to the upstream server, refused ones
get an ERROR naming the rule (SQLSTATE 42501) and the connection stays usable.

Identity (exactly one; docs/identity.md). Gateway mode - the client sends a bearer token as its
password (use TLS) and logs in with the user name the token belongs to:
  --tokens FILE            a static token file (local use, demos, CI)
  --auth tokenreview       a Kubernetes token (e.g. `kubectl create token SA --audience dbguard`),
                           verified by the API server's TokenReview for --token-audience; the proxy's
                           credentials (--kubeconfig, $KUBECONFIG or in-cluster) need `create` on
                           tokenreviews (ClusterRole system:auth-delegator). Successful reviews are
                           reused for 60 s. A ServiceAccount may log in as NS:SA.
  --auth oidc              an OIDC ID token (RS256/ES256) from --oidc-issuer for --oidc-audience,
                           checked against the issuer's JWKS; the user is --oidc-username-claim (sub),
                           the groups --oidc-groups-claim (groups)
Sidecar mode - every local client is the pod's identity, no password asked:
  --workload-token-file F  the pod's projected ServiceAccount token (audience --token-audience),
                           verified by TokenReview at start (or the proxy exits) and whenever it
                           changes; if a new token cannot be verified the last identity holds until
                           its expiry, then new connections are refused
  --workload-identity USER a fixed identity taken on trust (local runs, tests)
A token that is not valid gets FATAL 28P01; when it cannot be verified now (API server or issuer
unreachable, 5 s timeout, RBAC missing) the login fails closed with FATAL 57P03 (try again later).
The upstream credentials stay in the proxy: put the password in the URL, in
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
  dbguard proxy ... --auth tokenreview --tls-cert tls.crt --tls-key tls.key
  PGPASSWORD=$(kubectl create token reports --audience dbguard) \\
      psql "host=dbguard.shop port=6432 dbname=shop user=shop:reports sslmode=verify-full"
  dbguard proxy ... --auth oidc --oidc-issuer https://idp.example.com --oidc-audience dbguard \\
      --oidc-username-claim email --oidc-username-prefix oidc:
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
    ident.add_argument("--auth", choices=("tokenreview", "oidc"),
                       help="gateway mode: the password is a Kubernetes token (TokenReview) or an OIDC ID token")
    ident.add_argument("--workload-token-file", metavar="FILE",
                       help="sidecar mode: every client is the ServiceAccount of this projected token "
                            "(verified by TokenReview, re-read when it changes)")
    ident.add_argument("--workload-identity", metavar="USER",
                       help="sidecar mode: every client is this identity, on trust (e.g. system:serviceaccount:ns:sa)")
    p.add_argument("--workload-group", action="append", default=[], metavar="GROUP",
                   help="group of the --workload-identity (repeatable)")
    p.add_argument("--token-audience", default=None, metavar="AUD",
                   help="audience Kubernetes tokens must be issued for (--auth tokenreview, --workload-token-file; "
                        "default dbguard)")
    p.add_argument("--kubeconfig", default=None, metavar="FILE",
                   help="credentials for TokenReview (default $KUBECONFIG, else in-cluster, else ~/.kube/config)")
    p.add_argument("--oidc-issuer", default=None, metavar="URL", help="--auth oidc: the issuer (the tokens' iss)")
    p.add_argument("--oidc-audience", default=None, metavar="AUD", help="--auth oidc: required in the tokens' aud")
    p.add_argument("--oidc-jwks-url", default=None, metavar="URL",
                   help="--auth oidc: fetch keys here instead of via ISSUER/.well-known/openid-configuration")
    p.add_argument("--oidc-username-claim", default=None, metavar="CLAIM", help="--auth oidc: user name claim (sub)")
    p.add_argument("--oidc-groups-claim", default=None, metavar="CLAIM", help="--auth oidc: groups claim (groups)")
    p.add_argument("--oidc-username-prefix", default=None, metavar="PREFIX",
                   help="--auth oidc: prepended to user names, e.g. oidc: (default none)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate for TLS toward clients")
    p.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    p.add_argument("--require-tls", action="store_true", help="refuse clients that do not use TLS")
    p.add_argument("--engine", choices=("embedded", "opa"), default="embedded",
                   help="policy engine: embedded Rego (default) or an OPA server (--opa-url)")
    p.add_argument("--opa-url", default="", metavar="URL", help="OPA server, e.g. http://127.0.0.1:8181")
    p.add_argument("--approvals", default="", metavar="STORE",
                   help="where require-approval rules put their requests: 'kubernetes[:NAMESPACE]' "
                        "(ApprovalRequest resources, approved with kubectl patch) or a SQLite FILE (approved with "
                        "`dbguard approve`); without it such statements are refused")
    p.add_argument("--approval-notify-url", default="", metavar="URL",
                   help="Slack-compatible webhook called when an approval request is created (default: off)")
    p.add_argument("--access", default="", metavar="NAME",
                   help="the DatabaseAccess this proxy serves (set by the sidecar injector; names requests)")
    p.add_argument("--policy-reload-interval", type=float, default=2.0, metavar="SECONDS",
                   help="re-read the policy files this often and switch to a changed revision without dropping "
                        "connections (a mounted ConfigMap); 0 turns it off (default 2)")
    p.add_argument("--policy-timeout", type=float, default=0.2, metavar="SECONDS",
                   help="deadline for one policy evaluation; past it the statement is refused (default 0.2)")
    p.add_argument("--events", default="-", metavar="FILE",
                   help="where decision events go as JSON lines for log shippers: - for stdout (default), "
                        "a file, or none")
    p.add_argument("--ledger", default="", metavar="FILE|URL",
                   help="the hash-chained audit ledger: a SQLite file (WAL; one proxy) or a postgresql:// URL "
                        "of a database apart from the governed one (a cluster of proxies, one chain each). "
                        "Writes and refusals are committed to it before they run or are answered. "
                        "env:VAR reads the location from an environment variable, keeping a URL's password out "
                        "of the process list")
    p.add_argument("--ledger-chain", default="", metavar="NAME",
                   help="this proxy's chain in the ledger (default HOST:PORT)")
    p.add_argument("--ledger-signing-key", default="", metavar="PEM",
                   help="Ed25519 private key that signs checkpoints (dbguard audit keygen)")
    p.add_argument("--ledger-synchronous", default="NORMAL", choices=("NORMAL", "FULL"),
                   help="NORMAL survives a killed proxy; FULL also a power loss (default NORMAL)")
    p.add_argument("--row-evidence", default="off", metavar="on|off|URL",
                   help="row-level evidence for the columns policies list in spec.audit.rows: which rows each "
                        "write changed, old and new values, read from logical decoding (wal_level=logical). "
                        "on: with the upstream credentials; or a postgresql:// URL (or env:VAR) of a role with "
                        "REPLICATION. A marker joins each write's transaction; see docs/ledger.md (default off)")
    p.add_argument("--row-evidence-slot", default="", metavar="NAME",
                   help="the replication slot to stream (default: dbguard_ and a hash of the ledger chain, one per "
                        "proxy). Name one slot on several proxies (a gateway's replicas) to share it: whichever "
                        "streams it records every proxy's rows, the others stand by. A slot nobody reads keeps WAL "
                        "on the server: drop it when the proxies are retired")
    p.add_argument("--row-evidence-interval", type=float, default=0.2, metavar="SECONDS",
                   help="how long decoded changes may wait to be recorded together (default 0.2)")
    p.add_argument("--masking-key", default="", metavar="FILE",
                   help="secret key of the hash masking strategy (at least 16 bytes; the same on every proxy)")
    p.add_argument("--metrics-listen", type=_host_port, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--max-message-size", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest client message accepted (default 64 MiB)")
    p.add_argument("--max-connections", type=int, default=2000, metavar="N",
                   help="client connections this proxy accepts at once; more are refused with SQLSTATE 53300 "
                        "(default 2000; 0 for no limit; each holds one server connection)")
    p.add_argument("--max-connections-per-identity", type=int, default=0, metavar="N",
                   help="connections one identity may hold at once (53300 past it; default 0: no limit) - keeps one "
                        "runaway agent or app from taking the server's connections")
    p.add_argument("--login-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to finish start-up and authentication (default 10)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


_OIDC_FLAGS = ("oidc_issuer", "oidc_audience", "oidc_jwks_url", "oidc_username_claim", "oidc_groups_claim",
               "oidc_username_prefix")


def identity_settings(args: argparse.Namespace) -> IdentitySettings:
    """The identity flags, checked: exactly one mode, and only the options that mode reads."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if args.tokens:
        mode = "token"
    elif args.auth:
        mode = args.auth
    elif args.workload_token_file:
        mode = "workload-token"
    else:
        mode = "workload"
    if mode != "oidc":
        for name in _OIDC_FLAGS:
            if getattr(args, name) is not None:
                raise ConfigError(f"{flag(name)} needs --auth oidc")
    elif not args.oidc_issuer or not args.oidc_audience:
        raise ConfigError("--auth oidc needs --oidc-issuer URL and --oidc-audience AUD")
    if mode not in ("tokenreview", "workload-token"):
        for name in ("token_audience", "kubeconfig"):
            if getattr(args, name) is not None:
                raise ConfigError(f"{flag(name)} needs --auth tokenreview or --workload-token-file")
    if args.workload_group and mode != "workload":
        raise ConfigError("--workload-group goes with --workload-identity (other modes take groups from the token)")
    if mode in ("tokenreview", "oidc") and not args.tls_cert and args.listen[0] not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("dbguard.proxy").warning(
            "--auth %s without --tls-cert: clients send their bearer tokens in clear text", mode)
    oidc = OidcSettings()
    for name in _OIDC_FLAGS:
        if getattr(args, name) is not None:
            setattr(oidc, name.removeprefix("oidc_"), getattr(args, name))
    return IdentitySettings(mode=mode, tokens_file=args.tokens or "", workload_user=args.workload_identity or "",
                            workload_groups=tuple(args.workload_group),
                            workload_token_file=args.workload_token_file or "",
                            token_audience=args.token_audience if args.token_audience is not None else "dbguard",
                            kubeconfig=args.kubeconfig or "", oidc=oidc)


def _from_env(value: str, flag: str) -> str:
    """``env:NAME`` -> the variable's value (secrets stay out of the process list)."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    found = os.environ.get(name, "")
    if not found:
        raise ConfigError(f"{flag} {value}: the environment variable {name} is not set")
    return found


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    password = None
    if args.upstream_password_file:
        try:
            with open(args.upstream_password_file) as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"--upstream-password-file: {exc.strerror}") from exc
    elif os.environ.get("DBGUARD_UPSTREAM_PASSWORD") and not urllib.parse.urlsplit(args.upstream).password:
        # As libpq does with PGPASSWORD: a password written in the URL itself wins over the environment.
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
                             policy_timeout=args.policy_timeout, max_connections=args.max_connections,
                             max_connections_per_identity=args.max_connections_per_identity),
        identity=identity_settings(args),
        policy_files=tuple(args.policy),
        policy_reload_interval=args.policy_reload_interval,
        approvals=args.approvals,
        approval_notify_url=args.approval_notify_url,
        access=args.access,
        engine=args.engine,
        opa_url=args.opa_url,
        events=args.events,
        ledger=LedgerSettings(path=_from_env(args.ledger, "--ledger"), chain=args.ledger_chain,
                              signing_key=args.ledger_signing_key,
                              synchronous=args.ledger_synchronous,
                              row_evidence="" if args.row_evidence == "off" else _from_env(args.row_evidence,
                                                                                          "--row-evidence"),
                              row_evidence_slot=args.row_evidence_slot,
                              row_evidence_interval=args.row_evidence_interval),
        masking_key=args.masking_key,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        if urllib.parse.urlsplit(args.upstream).password:
            logging.getLogger("dbguard.proxy").warning(
                "the upstream password is in the --upstream URL, where the process list shows it; use "
                "--upstream-password-file or $DBGUARD_UPSTREAM_PASSWORD")
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
    except ConfigError as exc:  # found at start: row evidence the server cannot give
        print(f"dbguard proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dbguard proxy: cannot listen on {settings.listen.host}:{settings.listen.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["DESCRIPTION", "EventSink", "add_arguments", "run", "settings_from_args"]
