"""A real PostgreSQL for the whole test session (Debian's packages), started by the fixture.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user. The
cluster lives in a temporary directory with fsync off; its log is printed when a test fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

APP_PASSWORD = "app-secret-pw-7d1c"
MD5_PASSWORD = "md5-secret-pw-3a9e"


def pg_bindir() -> pathlib.Path:
    candidates = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found: run `make deps` (installs postgresql from Debian)")
    return candidates[0].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclasses.dataclass
class Postgres:
    datadir: pathlib.Path
    sockdir: pathlib.Path
    port: int
    bindir: pathlib.Path

    @property
    def app_url(self) -> str:
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.port}/app?sslmode=disable"

    @property
    def app_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=app user=app password={APP_PASSWORD} sslmode=disable"

    def psql(self, sql: str, *, db: str = "app", check: bool = True) -> str:
        """Run SQL as the superuser over the Unix socket; returns stdout."""
        cmd = _as_postgres([str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                            "-h", str(self.sockdir), "-p", str(self.port), "-d", db, "-c", sql])
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr}")
        return r.stdout

    def log_tail(self, lines: int = 60) -> str:
        log = self.datadir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


SCHEMA = (pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo-schema.sql").read_text()


def start_postgres(base: pathlib.Path) -> Postgres:
    bindir = pg_bindir()
    base.mkdir(parents=True, exist_ok=True)
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockdir, "postgres", "postgres")
        for parent in base.parents:  # the postgres user must be able to reach its directory
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
    subprocess.run(_as_postgres([str(bindir / "initdb"), "--no-sync", "-A", "trust", "-U", "postgres",
                                 "-E", "UTF8", "--locale=C", "-D", str(datadir)]),
                   check=True, capture_output=True)
    port = free_port()
    (datadir / "postgresql.auto.conf").write_text(
        f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sockdir}'\n"
        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
        "wal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\n"
        "password_encryption = 'scram-sha-256'\nlog_min_messages = warning\n")
    (datadir / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all md5user 127.0.0.1/32 md5\n"
        "host all all 127.0.0.1/32 scram-sha-256\n")
    if os.geteuid() == 0:
        for p in (datadir / "postgresql.auto.conf", datadir / "pg_hba.conf"):
            shutil.chown(p, "postgres", "postgres")
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(datadir / "server.log"),
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True)
    pg = Postgres(datadir=datadir, sockdir=sockdir, port=port, bindir=bindir)
    pg.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'", db="postgres")
    pg.psql("SET password_encryption = 'md5'; "
            f"CREATE ROLE md5user LOGIN PASSWORD '{MD5_PASSWORD}'", db="postgres")
    pg.psql("CREATE DATABASE app OWNER app", db="postgres")
    pg.psql("GRANT ALL ON SCHEMA public TO app; GRANT CONNECT ON DATABASE app TO md5user", db="app")
    return pg


def stop_postgres(pg: Postgres) -> None:
    subprocess.run(_as_postgres([str(pg.bindir / "pg_ctl"), "-D", str(pg.datadir), "-m", "immediate", "stop"]),
                   check=False, capture_output=True)


def reset_schema(pg: Postgres) -> None:
    """Fresh demo tables, owned by the app role."""
    pg.psql("DROP TABLE IF EXISTS orders, customers CASCADE; DROP TABLE IF EXISTS t_scratch;"
            "SET ROLE app;" + SCHEMA)


@contextlib.contextmanager
def throwaway_postgres(prefix: str, start: Callable[[pathlib.Path], Postgres] | None = None) -> Iterator[Postgres]:
    """A PostgreSQL cluster in a fresh temporary directory, removed with it afterwards."""
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    pg = (start or start_postgres)(base)
    try:
        yield pg
    finally:
        stop_postgres(pg)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with throwaway_postgres("dbguard-pg-") as pg:
        yield pg


@pytest.fixture
def pg(postgres: Postgres, request: pytest.FixtureRequest) -> Postgres:
    """The session PostgreSQL with the demo schema reset; prints the server log if the test fails."""
    reset_schema(postgres)
    yield postgres
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- PostgreSQL log (tail) ----\n" + postgres.log_tail())


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM (the graceful path the code under test must handle), then SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
