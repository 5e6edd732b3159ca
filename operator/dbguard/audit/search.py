"""Indexed questions to the ledger: who did what to which table and column, when."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import sqlite3
from typing import Any

import orjson

from dbguard.audit import read_records


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    table: str = ""  # "customers" or "public.customers"
    column: str = ""
    operation: str = ""  # UPDATE, DELETE, ...
    since: str = ""  # ISO time (UTC) inclusive
    until: str = ""  # ISO time (UTC) exclusive
    user: str = ""
    outcome: str = ""  # forwarded | refused
    rule: str = ""
    session: str = ""
    fingerprint: str = ""
    kind: str = ""  # decision | refusal | connection | disconnect | rows | ...
    limit: int = 1000


def parse_time(text: str) -> str:
    """'2026-11-24 02:00', '2026-11-24T02:00:00Z', '02:00' (today) -> ISO UTC, comparable as text."""
    text = text.strip()
    if len(text) <= 5 and ":" in text:
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        text = f"{today} {text}"
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC).isoformat(timespec="microseconds")


PROBE_CAP = 5_000


def _window_is_smaller(conn: Any, sub: list[str], sub_args: list[Any], q: Query) -> bool:
    """SQLite only: whether the time window holds no more entries than the object filter matches.

    SQLite's planner always starts from the touches index, which walks an object's whole history;
    for a narrow window, walking the window and probing each entry's touches is far cheaper. Both
    counts are capped, so the probe itself stays cheap. PostgreSQL's planner chooses by itself.
    """
    if not isinstance(conn, sqlite3.Connection) or not conn.execute(
            "SELECT 1 FROM pragma_index_list('touches') WHERE origin = 'pk'").fetchone():
        return False  # without the entry-first key the EXISTS form would scan by table name per entry
    touches = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM touches WHERE {' AND '.join(sub)} LIMIT ?)",
                           [*sub_args, PROBE_CAP]).fetchone()[0]
    window = conn.execute("SELECT count(*) FROM (SELECT 1 FROM entries WHERE time >= ? AND time < ? LIMIT ?)",
                          (parse_time(q.since) if q.since else "", parse_time(q.until) if q.until else "~",
                           PROBE_CAP)).fetchone()[0]
    return window <= touches  # a tie (both capped) goes to the window: ORDER BY time LIMIT cuts it short


def search(conn: Any, q: Query) -> list[dict[str, Any]]:
    """Entries matching every filter, oldest first; ``conn`` is a SQLite connection or a PostgresReader."""
    where: list[str] = []
    args: list[Any] = []
    if q.table or q.column or q.operation:
        sub = ["1=1"]
        if q.table:
            schema, _, name = q.table.rpartition(".")
            sub.append("name = ?")
            args.append(name)
            if schema:
                sub.append("schema IN (?, '')")  # unqualified statements may have meant this schema
                args.append(schema)
        if q.column:
            sub.append("col IN (?, '*')")
            args.append(q.column)
        if q.operation:
            sub.append("operation = ?")
            args.append(q.operation.upper())
        if (q.since or q.until) and _window_is_smaller(conn, sub, args, q):
            # walk the window in time order (entries_time) and probe each entry's touches (touches_entry)
            where.append(f"EXISTS (SELECT 1 FROM touches t WHERE t.entry_id = e.id AND {' AND '.join(sub)})")
        else:  # start from the matching touches (touches_object)
            where.append(f"e.id IN (SELECT entry_id FROM touches WHERE {' AND '.join(sub)})")
    # A block of reads (kind "reads") matches what any of its reads might; its reads are filtered
    # one by one below.
    for field, value in (("user", q.user), ("outcome", q.outcome), ("session", q.session)):
        if value:
            where.append(f'(e."{field}" = ? OR e.kind = \'reads\')')
            args.append(value)
    if q.rule:
        where.append("e.\"rule\" = ? AND e.\"rule\" <> ''")  # reads have no rule; '' lets SQLite use its partial index
        args.append(q.rule)
    if q.kind:
        where.append("e.kind IN (?, ?)")
        args += [q.kind, "reads" if q.kind == "decision" else q.kind]
    if q.fingerprint:
        where.append("(e.fingerprint LIKE ? OR e.kind = 'reads')")
        args.append(f"%{q.fingerprint}%")
    if q.since:
        # a block's time is its earliest read, and a block never spans a minute boundary
        since = parse_time(q.since)
        where.append("(e.time >= ? OR (e.kind = 'reads' AND e.time >= ?))")
        args += [since, since[:16]]
    if q.until:
        where.append("e.time < ?")
        args.append(parse_time(q.until))
    sql = (f"SELECT e.chain, e.seq, e.time, e.data FROM entries e WHERE {' AND '.join(where) or '1=1'} "
           "ORDER BY e.time, e.id LIMIT ? OFFSET ?")
    # A block of reads counts as one row but may hold no match, or several: fetch pages until the
    # limit is met by matches and no row still to come could sort before the last one kept.
    page = max(q.limit, 500)
    offset = 0
    out: list[dict[str, Any]] = []
    while True:
        rows = conn.execute(sql, [*args, page, offset]).fetchall()
        offset += len(rows)
        for chain, seq, _time, data in rows:
            out += _expand(conn, chain, seq, data, q)
        if len(rows) < page:
            break
        if len(out) >= q.limit:
            out.sort(key=lambda e: e.get("time", ""))
            if rows[-1][2] > out[q.limit - 1].get("time", ""):
                break  # every later row starts after the last result kept
    out.sort(key=lambda e: e.get("time", ""))
    return out[:q.limit]


def _expand(conn: Any, chain: str, seq: int, data: bytes, q: Query) -> list[dict[str, Any]]:
    """The results one stored entry contributes: itself, or the matching reads of a block."""
    event = orjson.loads(data)
    if event.get("kind") == "reads":
        found = []
        for index, read in enumerate(block_reads(event)):
            if matches(read, q):
                read["ledger"] = {"chain": chain, "seq": seq, "index": index}
                found.append(read)
        return found
    event["ledger"] = {"chain": chain, "seq": seq}
    if event.get("kind") == "decision" and "completion" not in event and event.get("stmt"):
        # A write's outcome is its own entry, written after the server answered.
        done = conn.execute("SELECT data FROM entries WHERE session = ? AND stmt = ? AND kind = 'completion'",
                            (event.get("session", ""), event["stmt"])).fetchone()
        if done:
            event["completion"] = orjson.loads(done[0]).get("completion")
    if event.get("kind") == "decision" and event.get("stmt"):
        # Row-level evidence (audit.row_evidence): the rows the statement changed, once committed.
        changed = conn.execute("SELECT data FROM entries WHERE session = ? AND stmt = ? AND kind = 'rows' "
                               "ORDER BY time", (event.get("session", ""), event["stmt"])).fetchall()
        if changed:
            event["row_changes"] = [c for (data,) in changed for c in orjson.loads(data).get("changes") or ()]
    return [event]


def block_reads(block: dict[str, Any]) -> list[dict[str, Any]]:
    """The reads a block entry (kind ``reads``) holds, in order, each as the decision event it was.

    Three formats: the first kept every read whole (``entries``); the others keep each distinct
    shape once (``shapes``: ``[{session members},{statement members}]``). The writer process
    stores a batch of reads as the proxy packed them (``packed``: base64 ``audit.read_records``).
    Otherwise each read is ``[shape, microseconds into the block's minute, {completion}]``, or
    ``[shape, microseconds, stmt, duration in µs, tag]`` for a read that ran with one tag (status
    ok, rows from the tag), or the read itself for a read appended whole (see writer.Blocks).
    """
    if "entries" in block:
        return block["entries"]
    minute = block.get("time", "")[:17]  # "2026-11-24T02:13:": every read of a block is in its minute
    shapes = block.get("shapes") or ()
    if "packed" in block:
        items: Any = ([index, round(when * 1e6) % 60_000_000, *((stmt, duration, tail) if type(tail) is str else (tail,))]
                      for index, when, stmt, duration, tail in read_records.records(base64.b64decode(block["packed"])))
    else:
        items = block.get("reads") or ()
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(item)
            continue
        if len(item) == 5:  # [shape, micros, stmt, duration in µs, tag]: ran, one tag, no error, nothing masked
            index, micros, stmt, duration, tag = item
            last = tag.rpartition(" ")[2]
            completion = {"stmt": stmt, "duration_ms": duration / 1000, "tags": [tag],
                          "rows": int(last) if last.isdigit() else 0, "status": "ok"}
        else:
            index, micros, completion = item
        head, body = shapes[index]
        out.append({"time": f"{minute}{micros // 1_000_000:02d}.{micros % 1_000_000:06d}+00:00",
                    "kind": "decision", **head, "stmt": completion.get("stmt", 0), **body, "completion": completion})
    return out


def matches(e: dict[str, Any], q: Query) -> bool:
    """Whether one event meets every filter (used for the reads inside a block)."""
    if q.user and ((e.get("identity") or {}).get("user") or e.get("user", "")) != q.user:
        return False
    for field, value in (("outcome", q.outcome), ("rule", q.rule), ("session", q.session), ("kind", q.kind)):
        if value and e.get(field, "") != value:
            return False
    time = e.get("time", "")
    if (q.since and time < parse_time(q.since)) or (q.until and time >= parse_time(q.until)):
        return False
    statements = e.get("statements") or ()
    if q.fingerprint and not any(q.fingerprint in st.get("fingerprint", "") for st in statements):
        return False
    if q.table or q.column or q.operation:
        schema, _, name = q.table.rpartition(".")
        for st in statements:
            for a in st.get("actions") or ():
                if ((not name or a.get("name") == name) and (not schema or a.get("schema") in (schema, ""))
                        and (not q.operation or a.get("operation") == q.operation.upper())
                        and (not q.column or q.column in (a.get("columns") or ()) or "*" in (a.get("columns") or ()))):
                    return True
        return False
    return True


def _decision(e: dict[str, Any]) -> tuple[str, str, str]:
    """(what was decided, policy/rule, approval reference) for one entry."""
    if e.get("kind") != "decision":
        return e.get("kind", ""), e.get("rule") or "-", ""
    strongest = None
    for d in e.get("decisions") or ():
        if d.get("enforced", d.get("action")) != "allow":
            strongest = d
            break
    if strongest is None:
        return "allow", "-", ""
    rule = f"{strongest.get('policy')}/{strongest.get('rule')}" if strongest.get("policy") else strongest.get("rule", "")
    approval = strongest.get("approval")
    note = e.get("approval_request")
    if isinstance(note, dict):  # the ApprovalRequest the statement ran under or waits for, and how it went
        approval = f"{note.get('outcome', '')} {note.get('request', '')}".strip()
    elif isinstance(approval, dict):  # the requirement, with no approval store to ask
        approval = approval.get("request") or "needed"
    return strongest.get("enforced") or strongest.get("action", ""), rule, str(approval or "")


def format_table(events: list[dict[str, Any]]) -> str:
    rows = [("time (UTC)", "who", "decision", "rule", "approval", "rows", "result", "statement")]
    for e in events:
        who = (e.get("identity") or {}).get("user") or e.get("user", "")
        decision, rule, approval = _decision(e)
        if e.get("kind") == "refusal":
            decision = "refused"
        done = e.get("completion") or {}
        n = str(done.get("rows", "")) if done else "-"
        result = ((done.get("error") or {}).get("sqlstate") or done.get("status", "")) if done else "-"
        rows.append((e.get("time", "")[:26].replace("T", " "), who, decision, rule, approval or "-", n, result,
                     e.get("statement", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r, e in zip(rows, [None, *events], strict=True):
        lines.append("  ".join(f"{cell:<{w}}" for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        for change in (e or {}).get("row_changes") or (e or {}).get("changes") or ():
            lines.append("    " + format_change(change))
    lines.append(f"({len(events)} entr{'y' if len(events) == 1 else 'ies'})")
    return "\n".join(lines)


def _show(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict):
        return "(unchanged)"
    return str(value)


def format_change(change: dict[str, Any]) -> str:
    """``public.customers id=1: balance 100.00 -> 110.00`` for one changed row."""
    key = " ".join(f"{k}={_show(v)}" for k, v in (change.get("key") or {}).items())
    head = f"{change.get('table', '')} {key}".strip()
    op = change.get("op", "")
    old, new = change.get("old"), change.get("new")
    if op == "TRUNCATE":
        return f"{head}: TRUNCATE (every row)"
    if op == "INSERT":
        return f"{head}: INSERT " + ", ".join(f"{c}={_show(v)}" for c, v in (new or {}).items())
    if op == "DELETE":
        return f"{head}: DELETE " + ", ".join(f"{c}={_show(v)}" for c, v in (old or {}).items())
    if old is None:  # REPLICA IDENTITY not FULL: the old values were not decoded
        return f"{head}: " + ", ".join(f"{c} ? -> {_show(v)}" for c, v in (new or {}).items())
    return f"{head}: " + ", ".join(f"{c} {_show(old.get(c))} -> {_show(v)}" for c, v in (new or {}).items()
                                   if old.get(c) != v) or f"{head}: (no watched column changed)"
