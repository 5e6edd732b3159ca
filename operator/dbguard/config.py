"""Settings as nested dataclasses with documented defaults (kopf style); one test pins them."""

from __future__ import annotations

import dataclasses
import urllib.parse

from dbguard.errors import ConfigError


@dataclasses.dataclass(slots=True, kw_only=True)
class UpstreamSettings:
    """The governed PostgreSQL server and the credentials only the proxy holds."""

    host: str = "127.0.0.1"
    port: int = 5432
    database: str = "postgres"
    user: str = "postgres"
    password: str = dataclasses.field(default="", repr=False)  # never printed
    sslmode: str = "prefer"  # disable | prefer | require | verify-ca | verify-full
    sslrootcert: str = ""
    connect_timeout: float = 10.0  # seconds to connect and authenticate upstream

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None) -> UpstreamSettings:
        """Parse ``postgresql://user[:password]@host[:port]/db?sslmode=...``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError("--upstream must be a postgresql:// URL")
        query = urllib.parse.parse_qs(parts.query)
        unknown = set(query) - {"sslmode", "sslrootcert", "connect_timeout"}
        if unknown:
            raise ConfigError(f"--upstream: unsupported URL parameter(s) {sorted(unknown)}")
        settings = cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            database=urllib.parse.unquote(parts.path.lstrip("/")) or "postgres",
            user=urllib.parse.unquote(parts.username or "postgres"),
            password=password if password is not None else urllib.parse.unquote(parts.password or ""),
        )
        if "sslmode" in query:
            settings.sslmode = query["sslmode"][0]
        if settings.sslmode not in ("disable", "prefer", "require", "verify-ca", "verify-full"):
            raise ConfigError(f"--upstream: unknown sslmode {settings.sslmode!r}")
        if "sslrootcert" in query:
            settings.sslrootcert = query["sslrootcert"][0]
        if "connect_timeout" in query:
            settings.connect_timeout = float(query["connect_timeout"][0])
        return settings

    def redacted_url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}?sslmode={self.sslmode}"

    def conninfo(self, application_name: str) -> dict[str, object]:
        """psycopg keyword arguments for the proxy's own side connections (catalog, estimates)."""
        info: dict[str, object] = {"host": self.host, "port": self.port, "dbname": self.database, "user": self.user,
                                   "password": self.password, "sslmode": self.sslmode,
                                   "connect_timeout": max(1, int(self.connect_timeout)),
                                   "application_name": application_name}
        if self.sslrootcert:
            info["sslrootcert"] = self.sslrootcert
        return info


@dataclasses.dataclass(slots=True, kw_only=True)
class ListenSettings:
    host: str = "127.0.0.1"  # loopback by default: exposing a proxy is a deliberate choice
    port: int = 6432
    tls_cert: str = ""  # PEM; with tls_key enables SSLRequest -> 'S'
    tls_key: str = ""
    require_tls: bool = False  # refuse clients that do not negotiate TLS


@dataclasses.dataclass(slots=True, kw_only=True)
class LimitSettings:
    max_message_size: int = 64 * 1024 * 1024  # bytes; larger client messages close the connection (54000)
    login_timeout: float = 10.0  # seconds from connect to ReadyForQuery
    policy_timeout: float = 0.2  # seconds for one policy evaluation; past it the statement is refused
    max_connections: int = 2000  # client connections per proxy (0: no limit); more get 53300 at start-up
    max_connections_per_identity: int = 0  # authenticated connections per identity (0: no limit)
    shutdown_grace: float = 30.0  # seconds SIGTERM waits for sessions to finish


@dataclasses.dataclass(slots=True, kw_only=True)
class OidcSettings:
    """``--auth oidc``: ID tokens (JWT) checked against the issuer's JWKS (docs/identity.md)."""

    issuer: str = ""  # must equal the tokens' iss; keys found via ISSUER/.well-known/openid-configuration
    audience: str = ""  # must be in the tokens' aud (the client ID they were issued for)
    jwks_url: str = ""  # skip discovery and fetch the keys from here
    username_claim: str = "sub"  # claim naming the user (sub, email, preferred_username ...)
    groups_claim: str = "groups"  # claim listing the groups (list of strings, or one string)
    username_prefix: str = ""  # prepended to the user name, e.g. "oidc:" to keep namespaces apart
    leeway: float = 30.0  # seconds of clock skew allowed on exp / nbf / iat
    fetch_timeout: float = 5.0  # seconds for one discovery or JWKS request
    jwks_min_refresh: float = 10.0  # seconds between key fetches triggered by an unknown kid (rate limit)
    jwks_max_age: float = 3600.0  # seconds before keys are fetched again anyway


@dataclasses.dataclass(slots=True, kw_only=True)
class IdentitySettings:
    # token: static token file, password = token | workload: one fixed identity (sidecar, on trust) |
    # tokenreview: password = Kubernetes token, verified by TokenReview | oidc: password = OIDC ID token |
    # workload-token: sidecar identity proven by the pod's projected ServiceAccount token (TokenReview)
    mode: str = "token"
    tokens_file: str = ""
    workload_user: str = ""  # e.g. system:serviceaccount:shop:api
    workload_groups: tuple[str, ...] = ()
    workload_token_file: str = ""  # projected ServiceAccount token, e.g. /var/run/secrets/dbguard/token
    token_audience: str = "dbguard"  # audience Kubernetes tokens must be issued for (TokenReview spec.audiences)
    kubeconfig: str = ""  # "" = $KUBECONFIG, else in-cluster config, else ~/.kube/config
    review_timeout: float = 5.0  # seconds for one TokenReview; past it the login is refused (57P03)
    review_cache_ttl: float = 60.0  # seconds a successful TokenReview is reused (never past the token's exp)
    review_cache_size: int = 10_000  # tokens remembered (by SHA-256), least recently used dropped first
    oidc: OidcSettings = dataclasses.field(default_factory=OidcSettings)


@dataclasses.dataclass(slots=True, kw_only=True)
class LedgerSettings:
    path: str = ""  # SQLite file; "" = no ledger (decision events still go to --events)
    chain: str = ""  # this proxy's chain name; "" = HOST:PORT
    signing_key: str = ""  # Ed25519 private key (PEM) for signed checkpoints; "" = unsigned
    synchronous: str = "NORMAL"  # NORMAL: survives a killed process; FULL: also power loss
    row_evidence: str = ""  # "" off; "on": logical decoding with the upstream credentials; or a postgresql:// URL
    row_evidence_slot: str = ""  # "" = dbguard_<hash of the chain>
    row_evidence_interval: float = 0.2  # seconds decoded changes may wait to be recorded together


@dataclasses.dataclass(slots=True, kw_only=True)
class ProxySettings:
    listen: ListenSettings = dataclasses.field(default_factory=ListenSettings)
    upstream: UpstreamSettings = dataclasses.field(default_factory=UpstreamSettings)
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    identity: IdentitySettings = dataclasses.field(default_factory=IdentitySettings)
    policy_files: tuple[str, ...] = ()
    policy_reload_interval: float = 2.0  # seconds between checks of the policy files (0: never reload)
    approvals: str = ""  # approval store: "kubernetes[:NAMESPACE]" or a SQLite file ("" = none: refuse)
    approval_notify_url: str = ""  # Slack-compatible webhook called when a request is created
    access: str = ""  # the DatabaseAccess this proxy serves (names approval requests)
    engine: str = "embedded"  # embedded | opa
    opa_url: str = ""
    events: str = "-"  # JSON-lines decision events: "-" for stdout or a file path
    ledger: LedgerSettings = dataclasses.field(default_factory=LedgerSettings)
    masking_key: str = ""  # file with the secret key of the `hash` masking strategy
