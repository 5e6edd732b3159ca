"""Helpers for ledger tests: the audit CLI, a signing key pair, a proxy writing a signed ledger."""

from __future__ import annotations

import pathlib
import secrets
import subprocess
import sys

import pytest

from tests.fix_postgres import Postgres
from tests.fix_proxy import Proxy, start_proxy


def audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbguard", "audit", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def keys(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    priv, pub = tmp_path / "ledger.key", tmp_path / "ledger.pub"
    r = audit("keygen", "--private-key", str(priv), "--public-key", str(pub))
    assert r.returncode == 0, r.stderr
    return priv, pub


def ledger_proxy(pg: Postgres, tmp_path: pathlib.Path, priv: pathlib.Path,
                 *extra: str) -> tuple[Proxy, pathlib.Path]:
    db = tmp_path / "ledger.db"
    proxy = start_proxy(pg, tmp_path, "--ledger", str(db), "--ledger-signing-key", str(priv),
                        "--ledger-chain", "proxy-a", *extra)
    return proxy, db


LEDGER_PASSWORD = "ledger-secret"


@pytest.fixture
def ledger_db(pg: Postgres) -> str:
    """A PostgreSQL database apart from the governed one, owned by a role that only the ledger uses."""
    name = f"ledger_{secrets.token_hex(4)}"
    pg.psql(f"DO $$ BEGIN CREATE ROLE ledger LOGIN PASSWORD '{LEDGER_PASSWORD}'; "
            "EXCEPTION WHEN duplicate_object THEN ALTER ROLE ledger LOGIN; END $$", db="postgres")
    pg.psql(f"CREATE DATABASE {name} OWNER ledger", db="postgres")
    yield f"postgresql://ledger:{LEDGER_PASSWORD}@127.0.0.1:{pg.port}/{name}?sslmode=disable"
    pg.psql(f"DROP DATABASE {name} WITH (FORCE)", db="postgres")
