#!/usr/bin/env python3
"""Does the 2 a.m. question return in under one second with 1,000,000 entries in the SQLite ledger?

The question: "who ran ``UPDATE customers SET balance = ...`` between 02:00 and 03:00 on 24 November?",
asked as ``dbguard audit search --table customers --column balance --op UPDATE --since ... --until ...``.

1. Builds a ledger of ``--entries`` entries (default 1,000,000) over 30 days through the real writer,
   ``SqliteLedger.append`` (hashing, index extraction, group commit, signed checkpoints exactly as the
   proxy does), or reuses one built earlier with the same entry count and generator. Entries have the
   proxy's shape (``session._emit_decision``/``_record_completions``): statement facts from the real
   analyzer, texts normalized to ``$n``, a read's decision carrying its completion, a write's decision
   followed by its own completion entry, connection and disconnect entries. The traffic: ~50 identities,
   mostly SELECTs on orders/customers, UPDATEs of several tables and columns (a billing service updates
   ``customers.balance`` around the clock), refusals by the demo policy's rules, and 20 planted balance
   UPDATEs by two identities between 02:00 and 03:00 on 2026-11-24. Background balance UPDATEs are kept
   out of that one hour, so the right answer is exactly the planted entries.
2. Asks the 2 a.m. question in-process (``search.search`` on a read-only connection, as the CLI opens it)
   and through the CLI in a subprocess (wall time, interpreter start included), a few times each, and
   checks every answer against counts kept while generating. Also times a one-hour ``--identity`` search,
   a whole-ledger ``--rule`` search, a one-day ``--table orders`` search and ``dbguard audit verify``.
3. Prints a table of the figures and whether the under-one-second goal is met; exits 1 on a wrong answer
   and 2 when the goal is missed.

The OS page cache is warm (the file was just written or read); dropping it needs root and is not done.

Usage: .venv/bin/python bench/ledger_search.py [--entries 1000000] [--dir /tmp/dbguard-bench-ledger]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import itertools
import os
import pathlib
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from dbguard.analyze import pgparse  # noqa: E402
from dbguard.audit import search, sqlite_sink  # noqa: E402

GENERATOR_VERSION = 2  # bump when the generated ledger changes: older files are rebuilt, not reused
SEED = 20261124
CHAIN = "bench-proxy-0"
START = datetime.datetime(2026, 10, 26, tzinfo=datetime.UTC)
DAYS = 30
PLANTED = 20
PLANTED_REFUSED = 3  # mallory's first tries are held by balance-change-needs-approval
PLANTED_USERS = ("mallory", "ops-breakglass")
WINDOW = ("2026-11-24 02:00", "2026-11-24 03:00")
PLANTED_HOUR = "2026-11-24T02:"  # background balance UPDATEs stay out of it
CHUNK = 50_000  # events generated, then appended; the writer is timed while the producer waits
GOAL_SECONDS = 1.0
POLICY = "shop-guardrails"
REVISION = "rev-7"

HUMANS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
          "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "wendy", "yusuf", "zoe", "amir", "bea",
          "chen", "dmitri", "elena", "farah", "goran", "hana", "ines", "jonas", "kofi", "lena", "mateo", "nora",
          "omar", "priya", "quinn", "rosa", "sven", "tariq", "uma", "vera")
DBAS = ("bob", "goran", "trent")


# -- statement templates ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Template:
    """One statement shape and the demo policy's verdict on it; make_shapes adds its real facts."""

    name: str
    sql: str  # {a} and {b} stand for constants; the ledger records them as $n anyway
    outcome: str = "forwarded"
    rule: str = ""
    reason: str = ""
    action: str = "allow"


TEMPLATES = [
    Template("sel_order", "SELECT id, amount, status FROM orders WHERE id = {a}"),
    Template("sel_orders_of", "SELECT id, amount, status, created_at FROM orders WHERE customer_id = {a} "
                              "ORDER BY created_at DESC LIMIT 20"),
    Template("sel_customer", "SELECT id, name, email FROM customers WHERE id = {a}"),
    Template("sel_customer_all", "SELECT * FROM customers WHERE id = {a}"),
    Template("sel_balance", "SELECT balance FROM customers WHERE id = {a}"),
    Template("sel_join", "SELECT o.id, o.amount, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
                         "WHERE o.created_at > now() - interval '{b} days'"),
    Template("sel_report", "SELECT status, count(*), sum(amount) FROM orders WHERE created_at > now() - "
                           "interval '{b} days' GROUP BY status"),
    Template("sel_product", "SELECT id, name, price, stock FROM products WHERE id = {a}"),
    Template("ins_order", "INSERT INTO orders (customer_id, amount, status) VALUES ({a}, {b}.00, 'new')"),
    Template("upd_order_status", "UPDATE orders SET status = 'shipped' WHERE id = {a}"),
    Template("upd_order_amount", "UPDATE orders SET amount = {b}.50 WHERE id = {a}"),
    Template("upd_customer_email", "UPDATE customers SET email = 'c{a}@example.com' WHERE id = {a}"),
    Template("upd_customer_phone", "UPDATE customers SET phone = '+1-555-{b}' WHERE id = {a}"),
    Template("upd_stock", "UPDATE products SET stock = stock - 1 WHERE id = {a}"),
    Template("upd_price", "UPDATE products SET price = {b}.99 WHERE id = {a}"),
    Template("upd_balance", "UPDATE customers SET balance = balance - {b}.00 WHERE id = {a}"),
    Template("upd_balance_held", "UPDATE customers SET balance = balance + {b}.00 WHERE id = {a}", "refused",
             "balance-change-needs-approval", "changing a customer balance needs an approval", "require-approval"),
    Template("del_unfiltered", "DELETE FROM sessions", "refused", "no-unfiltered-writes",
             "UPDATE and DELETE need a WHERE clause that filters rows", "deny"),
    Template("upd_unfiltered", "UPDATE orders SET status = 'cancelled'", "refused", "no-unfiltered-writes",
             "UPDATE and DELETE need a WHERE clause that filters rows", "deny"),
    Template("drop_table", "DROP TABLE orders", "refused", "no-drop-table",
             "dropping or truncating tables is not allowed through dbguard", "deny"),
    Template("agent_write", "UPDATE customers SET name = 'x' WHERE id = {a}", "refused", "agents-read-only",
             "AI agents have read-only access", "deny"),
    Template("planted", "UPDATE customers SET balance = {b}.00 WHERE id = {a}"),
    Template("planted_held", "UPDATE customers SET balance = {b}.00 WHERE id = {a}", "refused",
             "balance-change-needs-approval", "changing a customer balance needs an approval", "require-approval"),
]
BALANCE_UPDATES = {"upd_balance", "upd_balance_held"}  # kept out of the planted hour
BALANCE_FALLBACK = "upd_customer_email"

MIX_HUMAN = {"sel_order": 20, "sel_orders_of": 12, "sel_customer": 18, "sel_customer_all": 8, "sel_balance": 6,
             "sel_join": 8, "sel_product": 6, "ins_order": 4, "upd_order_status": 4, "upd_order_amount": 2,
             "upd_customer_email": 3, "upd_customer_phone": 2, "upd_price": 1, "upd_balance_held": 3,
             "del_unfiltered": 1.5, "upd_unfiltered": 1, "drop_table": 0.5}
MIX_DBA = {**MIX_HUMAN, "upd_balance": 3, "upd_balance_held": 0, "drop_table": 1}
ROLES: dict[str, tuple[tuple[str, ...], float, dict[str, float], str]] = {  # groups, share of traffic, mix, protocol
    "svc-api": (("services",), 30, {"sel_order": 30, "sel_orders_of": 25, "sel_customer": 25, "sel_product": 10,
                                   "ins_order": 8, "upd_order_status": 2}, "extended"),
    "svc-billing": (("services", "billing"), 8, {"sel_balance": 40, "sel_orders_of": 30, "upd_balance": 30},
                    "extended"),
    "svc-reporting": (("services", "analytics"), 10, {"sel_join": 60, "sel_report": 40}, "extended"),
    "svc-shipping": (("services",), 6, {"sel_order": 50, "upd_order_status": 40, "upd_stock": 10}, "extended"),
    "svc-crm": (("services",), 5, {"sel_customer": 50, "upd_customer_email": 30, "upd_customer_phone": 20},
                "extended"),
    "copilot": (("ai-agents",), 2, {"sel_customer": 40, "sel_order": 40, "sel_join": 15, "agent_write": 5}, "simple"),
}
HUMAN_SHARE = 39  # the other 39 % of traffic, spread over the humans
READ_ROWS = (0, 1, 1, 1, 1, 2, 3, 5, 8, 20)  # rows a read returns


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """A template's pre-serialized members (as the session memoizes them) and what the writer will index."""

    template: Template
    statement: bytes  # b'"statement":"..."': the text with constants replaced by $n, as the ledger keeps it
    shape: bytes
    touches: tuple[tuple[str, str, str, str], ...]  # (operation, schema, name, col), as writer.touches
    write: bool  # not a plain read: durable, and its completion is an entry of its own
    tag: str  # the command tag's verb


def make_shapes() -> dict[str, Shape]:
    shapes = {}
    for t in TEMPLATES:
        sql = t.sql.format(a=1, b=1)
        facts = pgparse.analyze(sql)
        decision = {"action": t.action, "enforced": t.action if t.outcome == "refused" else "allow", "rule": t.rule,
                    "policy": POLICY, "reason": t.reason, "enforcement": "deny", "revision": REVISION,
                    "approval": None}
        shape = orjson.dumps({
            "statements": [{"command": f.command, "fingerprint": f.fingerprint,
                            "actions": [a.to_dict() for a in f.actions], "flags": [x.value for x in f.flags]}
                           for f in facts],
            "decisions": [decision for _ in facts],
            "outcome": t.outcome, "rule": t.rule, "sqlstate": "42501" if t.outcome == "refused" else "",
            "reason": t.reason})[1:-1]
        touches = tuple((a.operation, a.schema, a.name, col) for f in facts for a in f.actions
                        for col in (a.columns or ("",)))
        write = t.outcome == "refused" or not all(a.operation == "SELECT" for f in facts for a in f.actions)
        statement = b'"statement":' + orjson.dumps(pgparse.cache_key(sql))
        shapes[t.name] = Shape(t, statement, shape, touches, write, facts[0].command)
    return shapes


# -- the questions ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Question:
    label: str
    query: search.Query
    cli: tuple[str, ...]
    goal: bool = False  # the 2 a.m. question itself


def questions() -> list[Question]:
    since, until = WINDOW
    return [
        Question("2 a.m.: UPDATE customers.balance, 1 h", search.Query(
            table="customers", column="balance", operation="UPDATE", since=since, until=until),
            ("--table", "customers", "--column", "balance", "--op", "UPDATE", "--since", since, "--until", until),
            goal=True),
        Question("--identity alice, 1 h", search.Query(
            user="alice", since="2026-11-24 14:00", until="2026-11-24 15:00"),
            ("--identity", "alice", "--since", "2026-11-24 14:00", "--until", "2026-11-24 15:00")),
        Question("--rule no-drop-table, 30 days", search.Query(rule="no-drop-table"),
                 ("--rule", "no-drop-table")),
        Question("--table orders, 1 day", search.Query(
            table="orders", since="2026-11-23 00:00", until="2026-11-24 00:00"),
            ("--table", "orders", "--since", "2026-11-23 00:00", "--until", "2026-11-24 00:00")),
    ]


def matcher(q: search.Query) -> Callable[[str, str, str, tuple[tuple[str, str, str, str], ...]], bool]:
    """The search's meaning, restated independently, to count the right answer while generating."""
    since = search.parse_time(q.since) if q.since else ""
    until = search.parse_time(q.until) if q.until else ""
    schema, _, name = q.table.rpartition(".")
    op = q.operation.upper()

    def touched(touches: tuple[tuple[str, str, str, str], ...]) -> bool:
        return any((not name or t[2] == name) and (not schema or t[1] in (schema, ""))
                   and (not q.column or t[3] in (q.column, "*")) and (not op or t[0] == op) for t in touches)

    def match(when: str, user: str, rule: str, touches: tuple[tuple[str, str, str, str], ...]) -> bool:
        return ((not since or when >= since) and (not until or when < until) and (not q.user or user == q.user)
                and (not q.rule or rule == q.rule) and (not (name or q.column or op) or touched(touches)))

    return match


# -- building the ledger ----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Session:
    user: str
    sid: str
    prefix: bytes  # b'"session":...,"identity":...,"database":...,"client_addr":...' as the session builds it
    protocol: str
    stmt: int = 0  # decisions so far: completion entries name theirs


class Generator:
    """Yields (event bytes, durable) in time order, one entry per time slot, and counts the answers.

    Entries are what the proxy writes (session._emit_decision, _record_completions): a read's decision
    carries its completion; a write's or a refusal's decision is durable, and a forwarded write's
    completion is the entry in the next free slot; sessions open with a connection entry and end with a
    disconnect entry.
    """

    def __init__(self, entries: int, qs: list[Question]) -> None:
        self.n = entries
        self.rng = random.Random(SEED)
        self.shapes = make_shapes()
        self.span_us = DAYS * 86_400_000_000
        self.start_us = int(START.timestamp()) * 1_000_000
        lo, hi = (self._slot_at(search.parse_time(t)) for t in WINDOW)
        if hi - lo < PLANTED * 4:
            raise SystemExit(f"--entries {entries} leaves too few slots in the planted hour: use at least 100000")
        planted = sorted(self.rng.sample(range(lo + 2, hi - 2), PLANTED))  # inside the hour whatever the jitter
        self.planted = {slot: k for k, slot in enumerate(planted)}
        self.users: list[str] = []
        weights: list[float] = []
        self.roles: dict[str, tuple[tuple[str, ...], list[str], list[float], str]] = {}
        for user, (groups, share, mix, protocol) in ROLES.items():
            self._add_role(user, groups, mix, protocol)
            self.users.append(user)
            weights.append(share)
        for user in HUMANS:
            dba = user in DBAS
            self._add_role(user, ("dba",) if dba else ("developers",), MIX_DBA if dba else MIX_HUMAN, "simple")
            self.users.append(user)
            weights.append(HUMAN_SHARE / len(HUMANS))
        self._add_role("ops-breakglass", ("dba", "breakglass"), {"sel_balance": 1}, "simple")
        self.cum_weights = list(_accumulate(weights))
        self.sessions: dict[str, Session | None] = {}
        self.completions: collections.deque[tuple[Session, Shape, int]] = collections.deque()
        self.matchers = [(q.label, matcher(q.query)) for q in qs]
        self.expected = {q.label: 0 for q in qs}
        self._sec = (-1, "")

    def _add_role(self, user: str, groups: tuple[str, ...], mix: dict[str, float], protocol: str) -> None:
        names = [n for n, w in mix.items() if w > 0]
        self.roles[user] = (groups, names, list(_accumulate(mix[n] for n in names)), protocol)

    def _slot_at(self, iso: str) -> int:
        us = int(datetime.datetime.fromisoformat(iso).timestamp() * 1_000_000) - self.start_us
        return us * self.n // self.span_us

    def _time(self, slot: int) -> str:
        step = self.span_us // self.n
        us = self.start_us + slot * self.span_us // self.n + self.rng.randrange(max(1, step))
        sec, micro = divmod(us, 1_000_000)
        if self._sec[0] != sec:
            stamp = datetime.datetime.fromtimestamp(sec, datetime.UTC).isoformat()[:19]
            self._sec = (sec, stamp)
        return f"{self._sec[1]}.{micro:06d}+00:00"

    def _session(self, user: str, when: str, *, stay: bool = False) -> tuple[Session, bytes | None]:
        """The user's session, and the connection/disconnect entry this slot becomes instead.

        ``stay``: this slot must be a statement (a planted one): open a session quietly if there is none.
        """
        session = self.sessions.get(user)
        if session is None:
            groups, _, _, protocol = self.roles[user]
            sid = f"{self.rng.getrandbits(64):016x}"
            identity = {"user": user, "groups": list(groups), "source": "static", "workload": "", "end_user": ""}
            addr = f"10.0.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}:{self.rng.randrange(30000, 60000)}"
            prefix = orjson.dumps({"session": sid, "identity": identity, "database": "shop",
                                   "client_addr": addr})[1:-1]
            session = self.sessions[user] = Session(user, sid, prefix, protocol)
            event = orjson.dumps({"time": when, "kind": "connection", "session": sid, "client_addr": addr,
                                  "identity": identity, "database": "shop", "application_name": "psql",
                                  "tls": True, "authenticated": True})
            return session, None if stay else event
        if stay:
            return session, None
        if self.rng.random() < (0.002 if user.startswith("svc-") else 0.01):
            self.sessions[user] = None
            return session, orjson.dumps({"time": when, "kind": "disconnect", "session": session.sid, "user": user})
        return session, None

    def _completion(self, shape: Shape, stmt: int, rows: int) -> bytes:
        tag = f"INSERT 0 {rows}" if shape.tag == "INSERT" else f"{shape.tag} {rows}"
        return b'"completion":' + orjson.dumps({
            "stmt": stmt, "duration_ms": round(self.rng.uniform(0.2, 6.0), 3), "tags": [tag], "rows": rows,
            "status": "ok"})

    def events(self) -> Iterator[tuple[bytes, bool]]:
        rng = self.rng
        users, cum = self.users, self.cum_weights
        for slot in range(self.n):
            when = self._time(slot)
            k = self.planted.get(slot)
            if k is not None:
                user = PLANTED_USERS[0] if k < PLANTED_REFUSED + 5 else PLANTED_USERS[1]
                name = "planted_held" if k < PLANTED_REFUSED else "planted"
                session, _ = self._session(user, when, stay=True)
            elif self.completions:  # the server answered a forwarded write: its completion entry
                session, shape, stmt = self.completions.popleft()
                line = (b'{"time":"' + when.encode() + b'","kind":"completion",' + session.prefix + b","
                        + self._completion(shape, stmt, 1) + b"}")
                self._count(when, session.user, "", ())
                yield line, False
                continue
            else:
                user = rng.choices(users, cum_weights=cum)[0]
                session, other = self._session(user, when)
                if other is not None:
                    self._count(when, user, "", ())
                    yield other, False
                    continue
                _, names, mix_cum, _ = self.roles[user]
                name = rng.choices(names, cum_weights=mix_cum)[0]
                if name in BALANCE_UPDATES and when.startswith(PLANTED_HOUR):
                    name = BALANCE_FALLBACK
            shape = self.shapes[name]
            session.stmt += 1
            line = (b'{"time":"' + when.encode() + b'","kind":"decision",' + session.prefix + b',"stmt":%d'
                    % session.stmt + b',"protocol":"' + session.protocol.encode() + b'",' + shape.statement
                    + b"," + shape.shape)
            if not shape.write:  # a read's decision is written once, with its completion
                line += b"," + self._completion(shape, session.stmt, rng.choice(READ_ROWS))
            elif shape.template.outcome == "forwarded":
                self.completions.append((session, shape, session.stmt))
            self._count(when, session.user, shape.template.rule, shape.touches)
            yield line + b"}", shape.write

    def _count(self, when: str, user: str, rule: str, touches: tuple[tuple[str, str, str, str], ...]) -> None:
        for label, match in self.matchers:
            if match(when, user, rule, touches):
                self.expected[label] += 1


def _accumulate(values: Any) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def build(path: pathlib.Path, meta_path: pathlib.Path, entries: int, qs: list[Question]) -> dict[str, Any]:
    partial = path.with_name(path.name + ".partial")
    pub = path.with_suffix(".pub")
    meta_path.unlink(missing_ok=True)  # no reuse of a half-replaced ledger
    for stale in (partial, partial.with_name(partial.name + "-wal"), partial.with_name(partial.name + "-shm")):
        stale.unlink(missing_ok=True)
    key = Ed25519PrivateKey.generate()
    gen = Generator(entries, qs)
    sink = sqlite_sink.SqliteLedger(str(partial), CHAIN, signing_key=key, checkpoint_every=1000)
    t_begin = time.perf_counter()
    writer_s = generate_s = 0.0
    stream = gen.events()
    done = 0
    print(f"building {path} with {entries:,} entries through SqliteLedger ...", flush=True)
    while done < entries:
        t0 = time.perf_counter()
        chunk = list(itertools.islice(stream, CHUNK))
        t1 = time.perf_counter()
        for data, durable in chunk[:-1]:
            sink.append(data, durable=durable)  # durable as the proxy asks: writes and refusals
        last = sink.append(chunk[-1][0], durable=True)  # the chunk is committed when this one is
        assert last is not None
        last.result(timeout=600)
        t2 = time.perf_counter()
        generate_s += t1 - t0
        writer_s += t2 - t1
        done += len(chunk)
        if done % 200_000 == 0 or done == entries:
            print(f"  {done:>9,} entries, writer {done / writer_s:,.0f}/s", flush=True)
    sink.close()
    if sink.failures:
        raise SystemExit(f"the ledger writer failed {sink.failures} times: {sink.last_error}")
    total_s = time.perf_counter() - t_begin
    with sqlite3.connect(str(partial)) as conn:  # a clean close leaves no -wal; make sure before renaming
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        partial.with_name(partial.name + suffix).unlink(missing_ok=True)
    partial.replace(path)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    meta = {"generator": GENERATOR_VERSION, "seed": SEED, "schema": schema_digest(), "entries": entries, "planted": PLANTED,
            "expected": gen.expected, "writer_s": writer_s, "generate_s": generate_s, "build_s": total_s,
            "bytes": path.stat().st_size, "sqlite": sqlite3.sqlite_version,
            "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    meta_path.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    return meta


def schema_digest() -> str:
    """The writer's schema (tables and indexes): a ledger built with another one is built again."""
    return hashlib.sha256(sqlite_sink.SCHEMA.encode()).hexdigest()[:16]


def build_or_reuse(directory: pathlib.Path, entries: int, qs: list[Question], rebuild: bool) -> tuple[
        pathlib.Path, dict[str, Any], bool]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ledger-{entries}.db"
    meta_path = directory / f"ledger-{entries}.json"
    if not rebuild and path.exists() and meta_path.exists() and path.with_suffix(".pub").exists():
        meta = orjson.loads(meta_path.read_bytes())
        if (meta.get("generator") == GENERATOR_VERSION and meta.get("seed") == SEED
                and meta.get("schema") == schema_digest()
                and set(meta.get("expected", {})) == {q.label for q in qs}):
            print(f"reusing {path} (built {meta['built']}; --rebuild to build it again)", flush=True)
            return path, meta, True
    return path, build(path, meta_path, entries, qs), False


# -- asking -----------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Timing:
    label: str
    how: str
    seconds: list[float]
    count: int
    expected: int
    goal: bool

    @property
    def ok(self) -> bool:
        return self.count == self.expected


def ask_in_process(path: pathlib.Path, q: search.Query, repeat: int) -> tuple[list[float], int]:
    seconds, count = [], -1
    for _ in range(repeat):
        t0 = time.perf_counter()
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # as cli._open does
        events = search.search(conn, q)
        conn.close()
        seconds.append(time.perf_counter() - t0)
        count = len(events)
    return seconds, count


def dbguard(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "operator"),
                                                                     os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dbguard", *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, r


def ask_cli(path: pathlib.Path, cli: tuple[str, ...], repeat: int) -> tuple[list[float], int]:
    seconds, count = [], -1
    for _ in range(repeat):
        elapsed, r = dbguard("audit", "search", "--ledger", str(path), *cli, "--json")
        if r.returncode != 0:
            raise SystemExit(f"dbguard audit search failed ({r.returncode}): {r.stderr[-2000:]}")
        seconds.append(elapsed)
        count = len(r.stdout.splitlines())
    return seconds, count


def check_answer(path: pathlib.Path, q: search.Query) -> tuple[str, bool]:
    """Who the 2 a.m. question names, and whether that is exactly who was planted, completions joined."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    events = search.search(conn, q)
    conn.close()
    who = collections.Counter((e.get("identity") or {}).get("user", "") for e in events)
    refused = sum(e.get("outcome") == "refused" for e in events)
    joined = sum("completion" in e for e in events)
    text = (f"{len(events)} entries by {', '.join(f'{u} ({n})' for u, n in sorted(who.items()))}; {refused} held "
            f"for approval, {joined} forwarded with their completion joined")
    ok = (len(events) == PLANTED and set(who) == set(PLANTED_USERS) and refused == PLANTED_REFUSED
          and joined == PLANTED - PLANTED_REFUSED)
    return text, ok


def query_plan(path: pathlib.Path, q: search.Query) -> list[str]:
    """The SQL search.search runs (captured, parameters expanded) and SQLite's plan for it."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    search.search(conn, q)
    conn.set_trace_callback(None)
    sql = next(s for s in statements if s.lstrip().upper().startswith("SELECT"))
    depths: dict[int, int] = {}
    plan = [f"rows it can start from: {', '.join(f'{k} {v:,}' for k, v in candidates(conn, q).items())}"]
    for node, parent, _, detail in conn.execute(f"EXPLAIN QUERY PLAN {sql}"):
        depths[node] = depths.get(parent, -1) + 1
        plan.append(f"{'  ' * depths[node]}{detail}")
    conn.close()
    return [sql, *plan]


def candidates(conn: sqlite3.Connection, q: search.Query) -> dict[str, int]:
    """How many rows each filter alone selects: what an index on that filter would have to visit."""
    out = {}
    if q.table or q.column or q.operation:
        name = q.table.rpartition(".")[2]
        sql = "SELECT count(*) FROM touches WHERE name = ?"
        args: list[str] = [name]
        if q.column:
            sql += " AND col IN (?, '*')"
            args.append(q.column)
        if q.operation:
            sql += " AND operation = ?"
            args.append(q.operation.upper())
        out["touches (table/column/op, all time)"] = conn.execute(sql, args).fetchone()[0]
    if q.since or q.until:
        out["entries in the time range"] = conn.execute(
            "SELECT count(*) FROM entries WHERE time >= ? AND time < ?",
            (search.parse_time(q.since) if q.since else "", search.parse_time(q.until) if q.until else "~"),
        ).fetchone()[0]
    for field, value in (("user", q.user), ("rule", q.rule)):
        if value:
            out[f"entries with {field} = {value!r}"] = conn.execute(
                f"SELECT count(*) FROM entries WHERE {field} = ?", (value,)).fetchone()[0]
    return out


# -- report -----------------------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--entries", type=int, default=1_000_000, help="ledger size (default 1,000,000)")
    p.add_argument("--dir", default="/tmp/dbguard-bench-ledger", type=pathlib.Path,
                   help="where ledgers are built and kept for reuse, one per entry count")
    p.add_argument("--repeat", type=int, default=5, help="times each search is asked (default 5)")
    p.add_argument("--rebuild", action="store_true", help="build the ledger again even if one exists")
    p.add_argument("--skip-verify", action="store_true", help="do not time `dbguard audit verify` (O(N))")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    qs = questions()
    path, meta, reused = build_or_reuse(args.dir, args.entries, qs, args.rebuild)
    expected = meta["expected"]
    goal_q = next(q for q in qs if q.goal)
    if expected[goal_q.label] != PLANTED:
        raise SystemExit(f"generator bug: {expected[goal_q.label]} entries match the 2 a.m. question, "
                         f"{PLANTED} were planted")

    print("asking ...", flush=True)
    startup_s = [dbguard("audit", "search", "--help")[0] for _ in range(args.repeat)]
    timings: list[Timing] = []
    for q in qs:
        want = min(expected[q.label], q.query.limit)
        seconds, count = ask_in_process(path, q.query, args.repeat)
        timings.append(Timing(q.label, "in-process", seconds, count, want, q.goal))
        seconds, count = ask_cli(path, q.cli, args.repeat)
        timings.append(Timing(q.label, "CLI", seconds, count, want, q.goal))
    plans = {q.label: query_plan(path, q.query) for q in qs}
    answer, answer_ok = check_answer(path, goal_q.query)

    verify_s: float | None = None
    verify_out = ""
    if not args.skip_verify:
        print("verifying the whole chain ...", flush=True)
        verify_s, r = dbguard("audit", "verify", "--ledger", str(path), "--public-key", str(path.with_suffix(".pub")))
        verify_out = r.stdout.strip()
        if r.returncode != 0 or f"OK: {args.entries} entries" not in r.stdout:
            print(f"dbguard audit verify failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
            return 1

    entries = meta["entries"]
    print()
    print(f"## dbguard ledger search: {entries:,} entries, {meta['bytes'] / 2**20:,.0f} MiB, SQLite {meta['sqlite']}, "
          f"{os.cpu_count()} CPUs, warm page cache")
    print()
    print(f"ledger: {path} ({'reused, built ' + meta['built'] if reused else 'built now'})")
    print(f"build through SqliteLedger.append: writer {entries / meta['writer_s']:,.0f} entries/s "
          f"({fmt(meta['writer_s'])}); with event generation {entries / meta['build_s']:,.0f} entries/s "
          f"({fmt(meta['build_s'])})")
    print()
    print("| question | via | min | median | max | entries | expected | right |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    st = sorted(startup_s)
    print(f"| (CLI start only: `audit search --help`) | CLI | {fmt(st[0])} | {fmt(statistics.median(st))} | "
          f"{fmt(st[-1])} | - | - | - |")
    for t in timings:
        s = sorted(t.seconds)
        label = f"**{t.label}**" if t.goal else t.label
        print(f"| {label} | {t.how} | {fmt(s[0])} | {fmt(statistics.median(s))} | {fmt(s[-1])} | {t.count:,} | "
              f"{t.expected:,} | {'yes' if t.ok else 'NO'} |")
    if verify_s is not None:
        print(f"| `audit verify` whole chain + signatures | CLI | {fmt(verify_s)} | - | - | {entries:,} | "
              f"{entries:,} | yes |")
    print()
    goal_times = [statistics.median(t.seconds) for t in timings if t.goal]
    worst = max(goal_times)
    met = worst < GOAL_SECONDS
    print(f"answer to the 2 a.m. question: {answer}")
    print(f"goal: the 2 a.m. question in under {GOAL_SECONDS:g} s at {entries:,} entries (median, CLI wall time "
          f"included): {'MET' if met else 'NOT MET'} (worst median {fmt(worst)})")
    if verify_s is not None:
        print(f"verify (CLI, whole chain): {fmt(verify_s)}, {entries / verify_s:,.0f} entries/s: {verify_out}")
    print()
    for label, (sql, *plan) in plans.items():
        print(f"query plan, {label}:\n  {sql}")
        for line in plan:
            print(f"    {line}")
    wrong = [t for t in timings if not t.ok]
    for t in wrong:
        print(f"WRONG ANSWER: {t.label} via {t.how}: {t.count} entries, expected {t.expected}", file=sys.stderr)
    if not answer_ok:
        print(f"WRONG ANSWER: the 2 a.m. question: {answer}", file=sys.stderr)
    if wrong or not answer_ok:
        return 1
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
