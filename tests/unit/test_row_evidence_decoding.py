"""Pure functions of row evidence: the pgoutput decoder and the change-to-statement attribution.

The byte layouts follow "Logical Replication Message Formats" in the PostgreSQL manual; the
end-to-end tests (tests/audit/test_row_evidence.py) run the same code on a real server's stream.
"""

from __future__ import annotations

import datetime
import struct

import pytest

from dbguard.audit import pgoutput
from dbguard.audit.row_evidence import (
    MAX_CHANGES_PER_STATEMENT,
    Attributor,
    Watched,
    marker_content,
    parse_watch_list,
)
from dbguard.errors import ConfigError

KEY = b"k" * 32


def tup(*values: str | None) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "<toast>":
            out += b"u"
        else:
            out += b"t" + struct.pack("!i", len(v.encode())) + v.encode()
    return out


def relation(oid: int = 16400, schema: str = "public", name: str = "customers") -> bytes:
    cols = [(1, "id", 23), (0, "name", 25), (0, "balance", 1700)]
    body = b"".join(struct.pack("!b", f) + n.encode() + b"\x00" + struct.pack("!Ii", t, -1) for f, n, t in cols)
    return b"R" + struct.pack("!I", oid) + schema.encode() + b"\x00" + name.encode() + b"\x00f" + \
        struct.pack("!h", len(cols)) + body


def begin(xid: int = 700) -> bytes:
    return b"B" + struct.pack("!QqI", 0x100, 0, xid)


def commit(end: int = 0x200) -> bytes:
    return b"C" + struct.pack("!bQQq", 0, 0x1F0, end, 60_000_000)


def marker(chain: str, session: str, stmt: int) -> bytes:
    content = marker_content(chain, session, stmt, KEY)
    return b"M" + struct.pack("!bQ", 1, 0x150) + b"dbguard\x00" + struct.pack("!i", len(content)) + content


def update(old: bytes | None, new: bytes, oid: int = 16400, kind: bytes = b"O") -> bytes:
    return b"U" + struct.pack("!I", oid) + ((kind + old) if old is not None else b"") + b"N" + new


def test_decoder_reads_each_message_kind():
    assert pgoutput.decode(begin()) == pgoutput.Begin(final_lsn=0x100, xid=700, commit_time=datetime.datetime(
        2000, 1, 1, tzinfo=datetime.UTC))
    rel = pgoutput.decode(relation())
    assert isinstance(rel, pgoutput.Relation) and [c.name for c in rel.columns] == ["id", "name", "balance"]
    assert rel.columns[0].key and not rel.columns[2].key and rel.replica_identity == "f"
    change = pgoutput.decode(update(tup("1", "Ada", "100.00"), tup("1", "Ada", "<toast>")))
    assert change == pgoutput.Change(op="UPDATE", relation_oid=16400, old=("1", "Ada", "100.00"),
                                     new=("1", "Ada", pgoutput.UNCHANGED), old_is_key_only=False)
    delete = pgoutput.decode(b"D" + struct.pack("!I", 16400) + b"K" + tup("1", None, None))
    assert delete.op == "DELETE" and delete.old_is_key_only and delete.new is None
    assert pgoutput.decode(b"T" + struct.pack("!Ib", 2, 3) + struct.pack("!II", 1, 2)) == pgoutput.Truncate(
        relation_oids=(1, 2), cascade=True, restart_identity=True)
    assert pgoutput.decode(b"O" + struct.pack("!Q", 1) + b"origin\x00") is None
    assert pgoutput.lsn_text(pgoutput.parse_lsn("16/B374D848")) == "16/B374D848"


@pytest.mark.parametrize("data", [b"", b"Z", b"B\x00", update(None, b"\x00\x01x"), b"I" + b"\x00" * 4 + b"K"])
def test_decoder_refuses_what_it_does_not_understand(data):
    with pytest.raises(pgoutput.DecodeError):
        pgoutput.decode(data)


def watched(columns: frozenset[str] | None = frozenset({"balance"})) -> dict[tuple[str, str], Watched]:
    return {("public", "customers"): Watched(schema="public", name="customers", columns=columns, keys=("id",),
                                            full_identity=True)}


def feed(a: Attributor, *messages: bytes) -> list[dict]:
    out: list[dict] = []
    for msg in messages:
        out += a.feed(pgoutput.decode(msg))
    return out


def test_changes_belong_to_the_marker_before_them_and_unmarked_ones_are_unattributed():
    a = Attributor("proxy-a", watched(), key=KEY)
    entries = feed(a, relation(), begin(),
                   update(tup("2", "Grace", "1.00"), tup("2", "Grace", "2.00")),  # before any marker
                   marker("proxy-a", "s1", 4), update(tup("1", "Ada", "100.00"), tup("1", "Ada", "110.00")),
                   update(tup("1", "Ada", "110.00"), tup("1", "Ada L.", "110.00")),  # balance unchanged
                   marker("proxy-b", "s9", 1), update(tup("1", "Ada", "110.00"), tup("1", "Ada", "0.00")),
                   marker("proxy-a", "s1", 5), commit())
    assert [(e.get("session"), e.get("stmt"), e.get("attributed")) for e in entries] == [
        (None, None, False), ("s1", 4, None)]
    assert entries[1]["changes"] == [{"table": "public.customers", "op": "UPDATE", "key": {"id": "1"},
                                      "old": {"balance": "100.00"}, "new": {"balance": "110.00"}}]
    assert entries[1]["xid"] == 700 and entries[1]["count"] == 1
    assert a.foreign == 1  # proxy-b records its own statement's change


def test_masked_values_stay_masked_and_big_statements_are_counted_not_copied():
    a = Attributor("p", watched(None), key=KEY, mask=lambda s, t, c: (lambda v: "h:" + v[::-1]) if c == "name" else None)
    rows = [update(tup(str(i), "Ada", "1"), tup(str(i), "Eve", "2")) for i in range(MAX_CHANGES_PER_STATEMENT + 5)]
    [entry] = feed(a, relation(), begin(), marker("p", "s", 1), *rows, commit())
    assert entry["count"] == MAX_CHANGES_PER_STATEMENT + 5 and entry["truncated"] is True
    assert len(entry["changes"]) == MAX_CHANGES_PER_STATEMENT
    assert entry["changes"][0]["old"]["name"] == "h:adA" and entry["changes"][0]["new"]["name"] == "h:evE"


def test_truncate_and_a_rolled_back_transaction():
    a = Attributor("p", watched(), key=KEY)
    truncate = b"T" + struct.pack("!Ib", 1, 0) + struct.pack("!I", 16400)
    [entry] = feed(a, relation(), begin(), marker("p", "s", 2), truncate, commit())
    assert entry["changes"] == [{"table": "public.customers", "op": "TRUNCATE"}]
    # a marker with changes but no commit (the server does not decode aborted transactions): nothing
    assert feed(a, begin(), marker("p", "s", 3), update(tup("1", "A", "1"), tup("1", "A", "2"))) == []


def test_watch_list_references():
    assert parse_watch_list(["public.customers.balance", "public.customers.email", '"S"."Order Lines".*']) == {
        ("public", "customers"): frozenset({"balance", "email"}), ("S", "Order Lines"): None}
    assert parse_watch_list(["public.t.*", "public.t.a"]) == {("public", "t"): None}
    with pytest.raises(ConfigError):
        parse_watch_list(["customers.balance"])


def test_a_marker_no_proxy_wrote_is_recorded_as_a_forgery_with_what_follows():
    a = Attributor("p", watched(), key=KEY)
    forged = marker_content("p", "victim", 7, b"not the key")
    message = b"M" + struct.pack("!bQ", 1, 0x150) + b"dbguard\x00" + struct.pack("!i", len(forged)) + forged
    [entry] = feed(a, relation(), begin(), marker("p", "s", 1), message,
                   update(tup("1", "A", "1"), tup("1", "A", "2")), commit())
    assert entry["attributed"] is False and entry["forged_marker"]["session"] == "victim" and a.forged == 1
    garbage = b"M" + struct.pack("!bQ", 1, 0x150) + b"dbguard\x00" + struct.pack("!i", 3) + b"{x:"
    [entry] = feed(a, begin(), garbage, update(tup("1", "A", "2"), tup("1", "A", "3")), commit())
    assert entry["forged_marker"] == {"unparsed": "{x:"}
