"""Estimated impact of a held statement: the planner's row estimate from EXPLAIN (never ANALYZE).

Cheap and safe: EXPLAIN plans without executing, on a separate short-lived connection with the
proxy's upstream credentials, under a one-second statement_timeout, inside a transaction that is
rolled back. Any failure just leaves the estimate out.
"""

from __future__ import annotations

import logging

import psycopg

from dbguard.config import UpstreamSettings

log = logging.getLogger(__name__)
TIMEOUT_MS = 1000


async def estimated_rows(upstream: UpstreamSettings, statement: str, params: tuple[str | None, ...]) -> int | None:
    """Callers pass one analyzed statement only. It is still sent with the extended protocol (one
    statement per message, whatever the text says) in a READ ONLY transaction that is rolled back."""
    try:
        async with await psycopg.AsyncConnection.connect(**upstream.conninfo("dbguard-estimate")) as conn:
            await conn.set_read_only(True)
            async with conn.transaction(force_rollback=True):
                await conn.execute(f"SET LOCAL statement_timeout = {TIMEOUT_MS}", prepare=False)
                # prepare=True: a server-side prepared statement holds exactly one command, so no
                # text can smuggle a second one past EXPLAIN (psycopg would otherwise use the simple
                # protocol for a query without parameters, which runs every statement in it).
                cur = await conn.execute(("EXPLAIN (FORMAT JSON) " + statement).encode(), list(params),
                                         prepare=True)
                plan = (await cur.fetchone())[0]
        node = plan[0]["Plan"]
        if node.get("Node Type") == "ModifyTable" and node.get("Plans"):
            node = node["Plans"][0]  # the rows it changes are the rows its input finds (it returns none itself)
        return int(node["Plan Rows"])
    except (psycopg.Error, KeyError, IndexError, TypeError, ValueError) as exc:
        log.info("no row estimate for a held statement: %s", exc)
        return None
