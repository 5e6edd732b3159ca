"""The local approval store: one SQLite file, for running without Kubernetes (demo, laptops, CI).

Proxies that share the file share the requests. ``dbguard approve NAME --as USER`` decides with
the same rules as the operator's webhooks (no self-approval, approver groups, final decisions,
expiry), but the identity of whoever runs the command is taken on trust: on one machine, the
file's permissions are the boundary. Use the Kubernetes store where approvers must be
authenticated.
"""

from __future__ import annotations

import datetime
import pathlib
import sqlite3

import orjson

from dbguard.approvals import decisions
from dbguard.approvals.store import NewRequest, Request, ThreadedStore, with_outcome

SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_requests (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    claimed_by TEXT,              -- the proxy that executed it; set once (the run-once guarantee)
    doc BLOB NOT NULL             -- {"metadata", "spec", "status"} as the ApprovalRequest resource
);
CREATE INDEX IF NOT EXISTS approval_requests_fingerprint ON approval_requests (fingerprint, created_at);
"""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class LocalStore(ThreadedStore):
    kind = "local"

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = str(path)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    # -- synchronous core (the CLI uses it directly) -------------------------------------------------

    def find_sync(self, fingerprint: str) -> list[Request]:
        with self._connect() as conn:
            rows = conn.execute("SELECT name, doc FROM approval_requests WHERE fingerprint = ? "
                                "ORDER BY created_at DESC, rowid DESC", (fingerprint,)).fetchall()
        return [Request(name, orjson.loads(doc)) for name, doc in rows]

    def get_sync(self, name: str) -> Request | None:
        with self._connect() as conn:
            row = conn.execute("SELECT doc FROM approval_requests WHERE name = ?", (name,)).fetchone()
        return Request(name, orjson.loads(row[0])) if row else None

    def list_sync(self) -> list[Request]:
        with self._connect() as conn:
            rows = conn.execute("SELECT name, doc FROM approval_requests ORDER BY created_at, rowid").fetchall()
        return [Request(name, orjson.loads(doc)) for name, doc in rows]

    def create_sync(self, new: NewRequest) -> Request:
        now = _now()
        name = new.name()
        doc = {"metadata": {"name": name, "creationTimestamp": _iso(now)}, "spec": new.to_spec(now),
               "status": {"phase": "Pending"}}
        with self._connect() as conn:
            conn.execute("INSERT INTO approval_requests (name, fingerprint, created_at, doc) VALUES (?, ?, ?, ?)",
                         (name, new.fingerprint, now.isoformat(), orjson.dumps(doc)))
        return Request(name, doc)

    def decide_sync(self, name: str, user: str, groups: tuple[str, ...], decision: str, reason: str = "") -> Request:
        """Apply one decision with the webhooks' rules; raises decisions.Refused."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT doc FROM approval_requests WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise decisions.Refused(f"no approval request named {name!r}")
                old = orjson.loads(row[0])
                old.setdefault("status", {})["phase"] = Request(name, old).phase()
                body = {**old, "spec": {**old["spec"], "decision": decision,
                                        **({"reason": reason} if reason else {})}}
                userinfo = {"username": user, "groups": list(groups)}
                now = _now()
                spec = decisions.stamp(old, body, userinfo, now)
                new = {**old, "spec": spec}
                decisions.check(old, new, userinfo, now)
                phase, decided_by, _ = decisions.phase_of({**new, "status": {}}, now)
                new["status"] = {**old.get("status", {}), "phase": phase}
                if decided_by:
                    new["status"].update(decidedBy=decided_by, decidedAt=_iso(now))
                conn.execute("UPDATE approval_requests SET doc = ? WHERE name = ?", (orjson.dumps(new), name))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return Request(name, new)

    def claim_sync(self, name: str, proxy: str) -> bool:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")  # one writer at a time across processes: the check and the claim
            try:
                row = conn.execute("SELECT doc, claimed_by FROM approval_requests WHERE name = ?", (name,)).fetchone()
                if row is None or row[1] is not None or Request(name, orjson.loads(row[0])).phase() != "Approved":
                    conn.execute("ROLLBACK")
                    return False
                doc = orjson.loads(row[0])
                doc["status"] = {**doc.get("status", {}), "phase": "Executed",
                                 "execution": {"at": _iso(_now()), "proxy": proxy}}
                conn.execute("UPDATE approval_requests SET doc = ?, claimed_by = ? WHERE name = ? "
                             "AND claimed_by IS NULL", (orjson.dumps(doc), proxy, name))
                conn.execute("COMMIT")
                return True
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def finish_sync(self, name: str, *, rows: int | None, error: str | None, ledger_entry: int | None) -> None:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT doc FROM approval_requests WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return
            doc = orjson.loads(row[0])
            doc["status"]["execution"] = with_outcome((doc.get("status") or {}).get("execution") or {}, rows=rows,
                                                      error=error, ledger_entry=ledger_entry)
            conn.execute("UPDATE approval_requests SET doc = ? WHERE name = ?", (orjson.dumps(doc), name))
            conn.execute("COMMIT")

    def approve_hint(self, name: str, namespace: str = "") -> str:
        return f"dbguard approve {name} --store {self.path} --as APPROVER --group GROUP --reason '...'"
