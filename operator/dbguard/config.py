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
    max_connections: int = 1000  # per proxy
    shutdown_grace: float = 30.0  # seconds SIGTERM waits for sessions to finish


@dataclasses.dataclass(slots=True, kw_only=True)
class IdentitySettings:
    mode: str = "token"  # token: static token file, password = token | workload: one fixed identity
    tokens_file: str = ""
    workload_user: str = ""  # e.g. system:serviceaccount:shop:api
    workload_groups: tuple[str, ...] = ()


@dataclasses.dataclass(slots=True, kw_only=True)
class LedgerSettings:
    path: str = ""  # SQLite file; "" = no ledger (decision events still go to --events)
    chain: str = ""  # this proxy's chain name; "" = HOST:PORT
    signing_key: str = ""  # Ed25519 private key (PEM) for signed checkpoints; "" = unsigned
    synchronous: str = "NORMAL"  # NORMAL: survives a killed process; FULL: also power loss


@dataclasses.dataclass(slots=True, kw_only=True)
class ProxySettings:
    listen: ListenSettings = dataclasses.field(default_factory=ListenSettings)
    upstream: UpstreamSettings = dataclasses.field(default_factory=UpstreamSettings)
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    identity: IdentitySettings = dataclasses.field(default_factory=IdentitySettings)
    policy_files: tuple[str, ...] = ()
    engine: str = "embedded"  # embedded | opa
    opa_url: str = ""
    events: str = "-"  # JSON-lines decision events: "-" for stdout or a file path
    ledger: LedgerSettings = dataclasses.field(default_factory=LedgerSettings)
    masking_key: str = ""  # file with the secret key of the `hash` masking strategy
