"""``dbguard audit``: verify the chain, search the ledger, make a checkpoint signing key."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sqlite3
import sys
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dbguard.audit import ledger, search, sqlite_sink

EPILOG = """\
The ledger is a SQLite file or a postgresql:// URL (the sink a cluster of proxies shares).

examples:
  dbguard audit verify --ledger /var/lib/dbguard/ledger.db --public-key ledger.pub
  dbguard audit verify --ledger postgresql://auditor@ledger-db/audit --public-key ledger.pub
  dbguard audit search --ledger ledger.db --table customers --column balance --op UPDATE \\
      --since "2026-11-24 02:00" --until "2026-11-24 03:00"
  dbguard audit keygen --private-key ledger.key --public-key ledger.pub
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="prove the hash chain and signed checkpoints; name the first bad entry")
    v.add_argument("--ledger", required=True, metavar="FILE|URL", help="the SQLite file or postgresql:// URL")
    v.add_argument("--public-key", metavar="PEM", help="Ed25519 public key that checks the signed checkpoints")
    v.add_argument("--allow-unsigned", action="store_true",
                   help="with --public-key: report chains (or runs of 1000+ entries) that no checkpoint signed with "
                        "the key covers as notes, not failures (chains written before the key was set, or by "
                        "proxies without it)")
    v.set_defaults(audit_func=run_verify)
    s = sub.add_parser("search", help="who did what, when: filters are ANDed; indexed",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    s.add_argument("--ledger", required=True, metavar="FILE|URL", help="the SQLite file or postgresql:// URL")
    s.add_argument("--table", default="", help="table name, optionally schema-qualified")
    s.add_argument("--column", default="")
    s.add_argument("--op", default="", metavar="OPERATION", help="UPDATE, DELETE, INSERT, SELECT, DROP ...")
    s.add_argument("--since", default="", metavar="TIME", help='UTC unless given: "2026-11-24 02:00" or "02:00"')
    s.add_argument("--until", default="", metavar="TIME")
    s.add_argument("--identity", default="", metavar="USER")
    s.add_argument("--decision", default="", choices=("", "forwarded", "refused"), help="outcome")
    s.add_argument("--rule", default="")
    s.add_argument("--session", default="")
    s.add_argument("--fingerprint", default="")
    s.add_argument("--kind", default="", choices=("", "decision", "refusal", "connection", "disconnect", "completion",
                                                  "approval", "policy", "rows"),
                   help="entries of one kind; rows: row-level evidence, including changes made around dbguard")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(audit_func=run_search)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signed checkpoints")
    k.add_argument("--private-key", required=True, metavar="PEM")
    k.add_argument("--public-key", required=True, metavar="PEM")
    k.set_defaults(audit_func=run_keygen)


def run(args: argparse.Namespace) -> int:
    return int(args.audit_func(args))


def _open(target: str) -> Any:
    """A read-only connection: SQLite, or a PostgresReader for a postgresql:// URL."""
    if target.startswith(("postgresql://", "postgres://")):
        import psycopg  # only for the PostgreSQL sink: it costs a tenth of a second to import

        from dbguard.audit import postgres_sink
        try:
            return postgres_sink.PostgresReader(target)
        except psycopg.Error as exc:
            raise SystemExit(f"dbguard audit: cannot open the PostgreSQL ledger: {exc}") from exc
    if not pathlib.Path(target).exists():
        raise SystemExit(f"dbguard audit: no ledger at {target}")
    return sqlite3.connect(f"file:{target}?mode=ro", uri=True)


def load_public_key(path: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pathlib.Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SystemExit(f"dbguard audit: {path} is not an Ed25519 public key")
    return key


def load_private_key(path: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pathlib.Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"{path} is not an Ed25519 private key")
    return key


def run_verify(args: argparse.Namespace) -> int:
    conn = _open(args.ledger)
    public_key = load_public_key(args.public_key) if args.public_key else None
    store: Any = sqlite_sink
    if not isinstance(conn, sqlite3.Connection):
        from dbguard.audit import postgres_sink
        store = postgres_sink
    result = _verify_snapshot(conn, store, public_key)
    if args.allow_unsigned:
        unsigned = [p for p in result.problems if p.kind == "unsigned"]
        for p in unsigned:
            print(f"note: chain {p.chain}: entry {p.seq} onwards unsigned: {p.detail}")
        result = dataclasses.replace(result, problems=tuple(p for p in result.problems if p.kind != "unsigned"))
    for chain, first, last in result.unsigned_tails:
        print(f"note: chain {chain}: entries {first}-{last} follow its last signed checkpoint (the writer signs "
              "within a second while its proxy runs; a writer that died before it signed leaves them unsigned "
              "until the chain is written again with the key)")
    if result.ok:
        signed = f", {result.checkpoints} signed checkpoints verified" if public_key else \
            f", {result.checkpoints} checkpoints (signatures not checked: give --public-key)"
        print(f"OK: {result.entries} entries in {result.chains} chain(s){signed}")
        return 0
    for p in result.problems:
        print(f"BROKEN chain {p.chain}: entry {p.seq} {p.kind}: {p.detail}")
    if any(p.kind == "unsigned" for p in result.problems):
        print("(chains written before the key was set, or by proxies without it: --allow-unsigned reports them "
              "as notes)")
    return 1


def _verify_snapshot(conn: Any, store: Any, public_key: Ed25519PublicKey | None) -> ledger.VerifyResult:
    """Verify one consistent view of a ledger that proxies may be writing: otherwise a checkpoint
    signed during the scan names an entry the scan did not see, and entries written meanwhile
    look like an unsigned run."""
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN")  # WAL: the first read fixes the snapshot until the end of the transaction
        try:
            checkpoints = list(store.read_checkpoints(conn))
            return ledger.verify(store.read_rows(conn), checkpoints, public_key)
        finally:
            conn.rollback()
    import psycopg

    conn.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    with conn.conn.transaction():  # (read_rows streams in a savepoint of it)
        checkpoints = list(store.read_checkpoints(conn))
        return ledger.verify(store.read_rows(conn), checkpoints, public_key)


def run_search(args: argparse.Namespace) -> int:
    conn = _open(args.ledger)
    q = search.Query(table=args.table, column=args.column, operation=args.op, since=args.since, until=args.until,
                     user=args.identity, outcome=args.decision, rule=args.rule, session=args.session,
                     fingerprint=args.fingerprint, kind=args.kind, limit=args.limit)
    try:
        events = search.search(conn, q)
    except ValueError as exc:
        print(f"dbguard audit search: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for e in events:
            sys.stdout.write(orjson.dumps(e).decode() + "\n")
    else:
        print(search.format_table(events))
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    key = Ed25519PrivateKey.generate()
    priv = pathlib.Path(args.private_key)
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pathlib.Path(args.public_key).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"wrote {priv} (keep it secret: mount it into the proxy only) and {args.public_key}")
    return 0
