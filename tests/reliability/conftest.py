"""Fixtures of the reliability tests: one PostgreSQL of their own, sized for 1,000 clients.

The shared session PostgreSQL (tests.fix_postgres) allows 300 connections and must never be
restarted under other tests; these tests hold 1,000 server connections at once and restart the
server mid-transaction, so they get a dedicated cluster (max_connections = 1100, via ALTER SYSTEM).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.fix_postgres import Postgres, reset_schema, throwaway_postgres
from tests.reliability.harness import keygen, start_big_postgres

SOAK_ROWS = 1000


@pytest.fixture(scope="package")
def big_postgres() -> Iterator[Postgres]:
    with throwaway_postgres("dbguard-reliability-pg-", start_big_postgres) as pg:
        yield pg


@pytest.fixture
def big_pg(big_postgres: Postgres, request: pytest.FixtureRequest) -> Postgres:
    """The dedicated server with the demo schema and a ``soak`` table (one row per client), reset."""
    reset_schema(big_postgres)
    big_postgres.psql("DROP TABLE IF EXISTS soak, ticks; SET ROLE app;"
                      "CREATE TABLE soak (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);"
                      f"INSERT INTO soak SELECT g, 0 FROM generate_series(1, {SOAK_ROWS}) g;"
                      "CREATE TABLE ticks (id int NOT NULL, client int NOT NULL)")
    yield big_postgres
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- PostgreSQL log (tail) ----\n" + big_postgres.log_tail())


@pytest.fixture
def keys(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    return keygen(tmp_path)
