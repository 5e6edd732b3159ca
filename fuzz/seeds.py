"""Build the seed corpora in fuzz/corpus/.

    python -m fuzz.seeds             # synthetic seeds: pgwire's own encoders, the analyzer's test tables
    python -m fuzz.seeds --capture   # and real client traffic: psql, psycopg and asyncpg through a real
                                     # dbguard proxy in front of a real PostgreSQL (loopback only)

Real traffic is recorded by a loopback relay between the client and the proxy, so a seed is exactly
what the proxy's ``FrontendParser`` reads. Each seed file is one conversation (pgwire) or one SQL
text (analyze). File names are stable (a label and a content hash), so re-running only adds files.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import hashlib
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator

from dbguard.pgwire import NEED_DATA, FrontendParser, RemoteProtocolError
from dbguard.pgwire import messages as m

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
PGWIRE_HEADER = b"\x00\xff"  # start-up phase, default cap, fed whole (see fuzz/targets.py)


def _frame(code: bytes, payload: bytes) -> bytes:
    return code + struct.pack("!i", len(payload) + 4) + payload


def _parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return _frame(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", len(types))
                  + b"".join(struct.pack("!i", t) for t in types))


def _bind(portal: str, stmt: str, params: list[bytes | None], fmts: tuple[int, ...] = (),
          rfmts: tuple[int, ...] = ()) -> bytes:
    body = [portal.encode() + b"\x00", stmt.encode() + b"\x00", struct.pack("!h", len(fmts)),
            *(struct.pack("!h", f) for f in fmts), struct.pack("!h", len(params))]
    body += [struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p for p in params]
    body += [struct.pack("!h", len(rfmts)), *(struct.pack("!h", f) for f in rfmts)]
    return _frame(b"B", b"".join(body))


def _execute(portal: str = "", rows: int = 0) -> bytes:
    return _frame(b"E", portal.encode() + b"\x00" + struct.pack("!i", rows))


def _dc(code: bytes, kind: str, name: str) -> bytes:
    return _frame(code, kind.encode() + name.encode() + b"\x00")


STARTUP = m.encode_startup({"user": "alice", "database": "app", "application_name": "fuzz"})
LOGIN = STARTUP + m.encode_password(b"alice-dev-token\x00")


def encoder_seeds() -> dict[str, bytes]:
    """One conversation per message type and protocol flow, built with pgwire's encoders."""
    sync = m.encode_sync()
    flows = {
        "simple-query": m.encode_query("SELECT id, name FROM customers WHERE id = 1"),
        "multi-statement": m.encode_query("BEGIN; UPDATE orders SET status = 'x' WHERE id = 1; COMMIT"),
        "refused-drop": m.encode_query("DROP TABLE customers") + m.encode_query("SELECT 1"),
        "empty-query": m.encode_query("") + m.encode_query("-- only a comment"),
        "extended-unnamed": _parse("", "SELECT $1::int + 1", (23,)) + _bind("", "", [b"41"]) + _dc(b"D", "P", "")
        + _execute() + sync,
        "extended-named-binary": _parse("s1", "SELECT name FROM customers WHERE id = $1", (23,))
        + _dc(b"D", "S", "s1") + sync + _bind("p1", "s1", [struct.pack("!i", 2)], (1,), (1,)) + _execute("p1", 1)
        + _execute("p1", 0) + _dc(b"C", "P", "p1") + _dc(b"C", "S", "s1") + sync,
        "pipeline": b"".join(_parse("", f"SELECT {i}") + _bind("", "", []) + _execute() for i in range(3)) + sync,
        "refused-in-batch": _parse("", "DELETE FROM orders") + _bind("", "", []) + _execute() + sync
        + _parse("", "SELECT 1") + _bind("", "", []) + _execute() + sync,
        "null-param": _parse("n", "SELECT $1::text IS NULL") + _bind("", "n", [None]) + _execute() + sync,
        "flush": _parse("f", "SELECT 1") + _frame(b"H", b"") + _bind("", "f", []) + _execute() + sync,
        "copy-in": m.encode_query("COPY orders (customer_id, amount) FROM STDIN")
        + _frame(b"d", b"1\t5\n2\t6\n") + _frame(b"c", b""),
        "copy-fail": m.encode_query("COPY orders (customer_id) FROM STDIN") + _frame(b"f", b"client gave up\x00"),
        "function-call": _frame(b"F", struct.pack("!ihhh", 1255, 0, 0, 0)),
        "unknown-type": _frame(b"y", b"whatever") + m.encode_query("SELECT 1"),
        "terminate": m.encode_query("SELECT 1") + m.encode_terminate(),
    }
    seeds = {f"enc-{name}": PGWIRE_HEADER + LOGIN + body for name, body in flows.items()}
    seeds["enc-ssl-then-startup"] = PGWIRE_HEADER + m.encode_ssl_request() + LOGIN
    seeds["enc-gssenc"] = PGWIRE_HEADER + struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE) + STARTUP
    seeds["enc-cancel"] = PGWIRE_HEADER + m.encode_cancel_request(1234, 5678)
    seeds["enc-sasl"] = PGWIRE_HEADER + STARTUP + m.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    # typed phase, small caps, chunked, and the server's side (backend mode)
    seeds["enc-typed-cap64-chunk3"] = b"\x05\x02" + flows["extended-named-binary"]
    seeds["enc-typed-cap4096-bytewise"] = b"\x03\x00" + flows["pipeline"]
    backend = (_frame(b"R", struct.pack("!i", 0)) + _frame(b"S", b"client_encoding\x00UTF8\x00")
               + _frame(b"K", struct.pack("!ii", 1, 2)) + _frame(b"Z", b"I")
               + _frame(b"T", b"\x00\x01id\x00" + b"\x00" * 18) + _frame(b"D", b"\x00\x01\x00\x00\x00\x011")
               + _frame(b"C", b"SELECT 1\x00") + _frame(b"E", b"SERROR\x00C42501\x00Mno\x00\x00")
               + _frame(b"N", b"SNOTICE\x00Mhi\x00\x00") + _frame(b"H", b"\x00\x00\x01\x00\x00")
               + _frame(b"d", b"1\n") + _frame(b"c", b"") + _frame(b"s", b"") + _frame(b"I", b"")
               + _frame(b"Z", b"T"))
    seeds["enc-backend"] = b"\x08\xff" + backend
    seeds["enc-backend-rows-chunk7"] = b"\x18\x06" + backend
    return seeds


# -- analyze seeds -------------------------------------------------------------------------------

EXTRA_SQL = [
    "SELECT 1", "SELECT 2", "DELETE FROM orders WHERE id = 1\x00DELETE FROM orders WHERE id = 2",
    "UPDATE customers SET balance = 0 WHERE 1 = 1\x00UPDATE customers SET balance = 0 WHERE 1 = 2",
    "SELECT set_config('search_path', 'x', false)\x00SELECT set_config('role', 'y', false)",
    "SET standard_conforming_strings = off", "SET client_encoding = 'SJIS'", "RESET ALL",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "DO $$ BEGIN DELETE FROM orders; END $$", "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t'",
    "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders", "PREPARE p(int) AS DELETE FROM orders WHERE id = $1",
    "EXECUTE p(1)", "CREATE TABLE t AS EXECUTE p(1)", "COPY orders TO PROGRAM 'cat'",
    "COPY (SELECT ssn FROM customers) TO STDOUT WITH (FORMAT binary)", "SELECT E'\\x27; DROP TABLE t; --'",
    "SELECT U&'\\0027' || $$;$$", "SELECT 'a' /* ; DROP TABLE t */", "SELECT $tag$ $$ ; $tag$",
    "MERGE INTO customers c USING orders o ON c.id = o.customer_id WHEN MATCHED THEN DELETE",
    "SELECT * FROM customers FOR UPDATE SKIP LOCKED", "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE",
    "CREATE RULE r AS ON SELECT TO t DO INSTEAD SELECT * FROM customers", "ALTER SYSTEM SET work_mem = '1GB'",
    "SELECT pg_read_file('/etc/passwd')", "SELECT lo_export(1, '/tmp/x')", "LOAD 'plpgsql'",
    "SET ROLE postgres", "SET SESSION AUTHORIZATION DEFAULT", "VACUUM FULL orders", "TRUNCATE customers CASCADE",
    "SELECT (SELECT (SELECT (SELECT 1)))", "SELECT ((((((1))))))", "SELECT ARRAY[[1,2],[3,4]]",
    "SELECT 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1", "SELECT NOT NOT NOT true", "BEGIN; SELECT 1; COMMIT;",
    "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM customers; FETCH ALL FROM c; CLOSE c",
    "SELECT xmlelement(name a, query_to_xml('select 1', true, true, ''))", "NOTIFY ch, 'payload'",
    "INSERT INTO t SELECT * FROM u ON CONFLICT (id) DO UPDATE SET v = excluded.v RETURNING *",
    "CREATE TEMP TABLE x ON COMMIT DROP AS SELECT 1", "SELECT * FROM ROWS FROM (generate_series(1,2)) AS g",
    "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC", "SELECT 1 \\gset", "SELECT '\u00e9\u4e2d\U0001f600'",
    # deep nesting (100 levels): mutations that double a part reach the depths where walkers recurse too far
    "SELECT " + "(SELECT " * 100 + "1" + ")" * 100, "SELECT 1" + " + 1" * 100, "SELECT " + "NOT " * 100 + "true",
    "SELECT ARRAY" + "[" * 100 + "1" + "]" * 100, "DELETE FROM t WHERE " + "(" * 100 + "id = 1" + ")" * 100,
]


def _string_constants(path: pathlib.Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and 4 <= len(node.value) <= 2000:
            yield node.value


def sql_seeds(extra: list[str] = ()) -> dict[str, bytes]:
    """Analyzer seeds: the SQL of the analyzer's and policy's test tables, the examples, and EXTRA_SQL."""
    import pglast

    texts = list(EXTRA_SQL) + list(extra)
    for path in sorted((ROOT / "tests").glob("analyze/*.py")) + sorted((ROOT / "tests").glob("policy/*.py")):
        texts += _string_constants(path)
    for path in sorted((ROOT / "tests" / "policy").rglob("*.yaml")):
        texts += [line.split(":", 1)[1].strip().strip("\"'") for line in path.read_text().splitlines()
                  if line.strip().startswith(("sql:", "statement:", "- sql:"))]
    seeds = {}
    for text in dict.fromkeys(texts):
        first = text.split("\x00", 1)[0]
        try:
            pglast.parse_sql(first)
        except Exception:  # noqa: BLE001 - keep SQL-looking texts that do not parse: the error paths
            if first[:12].strip().split(" ")[0].upper() not in _VERBS:
                continue
        data = text.encode("utf-8")
        seeds[f"sql-{hashlib.sha1(data).hexdigest()[:12]}"] = data
    return seeds


_VERBS = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "CREATE", "ALTER", "DROP", "COPY", "SET", "EXPLAIN"}


# -- real client traffic ---------------------------------------------------------------------------


class Recorder:
    """A loopback TCP relay that records what each client sends (one conversation per connection)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.conversations: list[bytearray] = []
        self.open = 0  # connections still being relayed
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        record = bytearray()
        self.conversations.append(record)
        self.open += 1

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, into: bytearray | None) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if into is not None:
                        into += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, record), pump(up_reader, writer, None))
        finally:
            self.open -= 1

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _dsn(port: int, **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(port), "dbname": "app", "user": "alice",
             "password": "alice-dev-token", "sslmode": "disable", "gssencmode": "disable",
             "application_name": "fuzz-capture"}
    parts.update(extra)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def _psql_scenarios(port: int) -> dict[str, Callable[[], None]]:
    def run(*args: str, stdin: str = "") -> Callable[[], None]:
        return lambda: subprocess.run(["psql", "-X", "-d", _dsn(port), *args], input=stdin, capture_output=True,
                                      text=True, timeout=30, check=False)
    return {
        "psql-select": run("-c", "SELECT id, name, email FROM customers ORDER BY id"),
        "psql-describe": run("-c", r"\d customers"),
        "psql-refused": run("-c", "DELETE FROM orders", "-c", "SELECT count(*) FROM orders"),
        "psql-script": run(stdin="BEGIN;\nUPDATE orders SET status = 'paid' WHERE id = 1;\nSELECT 1/0;\nROLLBACK;\n"
                                 "\\copy (SELECT * FROM orders) TO STDOUT\n"
                                 "SELECT $1::int \\bind 7 \\g\n"),
    }


def _psycopg_scenarios(port: int) -> dict[str, Callable[[], None]]:
    import psycopg

    def connect(**kw: object) -> psycopg.Connection:
        return psycopg.connect(_dsn(port), **kw)

    def prepared() -> None:
        with connect(autocommit=True) as c:
            for i in (1, 2, 1, 2, 1, 2):
                c.execute("SELECT name FROM customers WHERE id = %s", (i,), prepare=True)
            c.execute("SELECT %b::bytea, %s::numeric, %s::text", (b"\x00\xff", 1.5, None), binary=True)

    def pipeline() -> None:
        with connect(autocommit=True) as c, c.pipeline():
            c.execute("SELECT 1")
            c.execute("UPDATE orders SET status = %s WHERE id = %s", ("shipped", 2))
            c.execute("SELECT %s::int", (3,))

    def refusal() -> None:
        with connect() as c:
            with contextlib.suppress(psycopg.Error):
                c.execute("DELETE FROM orders")
            c.rollback()
            c.execute("SELECT 1")

    def copy() -> None:
        with connect(autocommit=True) as c, c.cursor() as cur:
            with cur.copy("COPY orders (customer_id, amount) FROM STDIN") as cp:
                cp.write_row((1, 9))
                cp.write_row((2, 8))
            with cur.copy("COPY (SELECT id FROM orders) TO STDOUT") as cp:
                list(cp)

    def server_cursor() -> None:
        with connect() as c, c.cursor(name="cur1") as cur:
            cur.execute("SELECT generate_series(1, 50)")
            cur.fetchmany(10)
            cur.fetchall()

    def executemany() -> None:
        with connect() as c:
            c.cursor().executemany("INSERT INTO orders (customer_id, amount) VALUES (%s, %s)",
                                   [(1, i) for i in range(5)])
            c.commit()

    return {"psycopg-prepared": prepared, "psycopg-pipeline": pipeline, "psycopg-refusal": refusal,
            "psycopg-copy": copy, "psycopg-server-cursor": server_cursor, "psycopg-executemany": executemany}


def _asyncpg_scenarios(port: int) -> dict[str, Callable[[], None]]:
    import asyncpg

    async def session(body: Callable) -> None:  # type: ignore[type-arg]
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="alice", password="alice-dev-token",
                                     database="app", ssl=False)
        try:
            await body(conn)
        finally:
            await conn.close()

    async def fetch(conn: asyncpg.Connection) -> None:
        await conn.fetch("SELECT id, name, balance FROM customers WHERE id = ANY($1)", [1, 2])
        stmt = await conn.prepare("SELECT $1::int8 * 2")
        await stmt.fetchval(21)
        await conn.executemany("UPDATE orders SET amount = $1 WHERE id = $2", [(1, 1), (2, 2)])

    async def txn(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            async for _ in conn.cursor("SELECT generate_series(1, 20)", prefetch=5):
                pass
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("DROP TABLE customers")
        await conn.copy_records_to_table("orders", records=[(100, 1, 5, "new", None)],
                                         columns=["id", "customer_id", "amount", "status", "created_at"])

    return {"asyncpg-fetch": lambda: asyncio.run(session(fetch)), "asyncpg-txn": lambda: asyncio.run(session(txn))}


def capture() -> dict[str, bytes]:
    """Run real clients through a real proxy, recording the bytes each sends."""
    sys.path.insert(0, str(ROOT))
    from tests.fix_postgres import reset_schema, start_postgres, stop_postgres, wait_until
    from tests.fix_proxy import start_proxy

    base = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-fuzz-capture-"))
    pg = start_postgres(base / "pg")
    proxy = None
    recorder = None
    seeds: dict[str, bytes] = {}
    try:
        reset_schema(pg)
        (base / "proxy").mkdir()
        proxy = start_proxy(pg, base / "proxy")
        recorder = Recorder(proxy.port)
        scenarios = {**_psql_scenarios(recorder.port), **_psycopg_scenarios(recorder.port),
                     **_asyncpg_scenarios(recorder.port)}
        for name, scenario in scenarios.items():
            before = len(recorder.conversations)
            try:
                scenario()
            except Exception as exc:  # noqa: BLE001 - a refusal may surface as an error; the bytes count
                print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            wait_until(lambda: recorder.open == 0, timeout=10, what=f"{name} to hang up")
            for i, conv in enumerate(recorder.conversations[before:]):
                if conv:
                    seeds[f"traffic-{name}-{i}"] = PGWIRE_HEADER + bytes(conv)
    finally:
        if recorder is not None:
            recorder.stop()
        if proxy is not None:
            proxy.stop()
        stop_postgres(pg)
        shutil.rmtree(base, ignore_errors=True)
    return seeds


def sql_in_traffic(conversation: bytes) -> list[str]:
    """The SQL texts of the Query and Parse messages in a recorded conversation."""
    parser = FrontendParser()
    parser.receive_data(conversation)
    found = []
    with contextlib.suppress(RemoteProtocolError):
        while (msg := parser.next_message()) is not NEED_DATA:
            if isinstance(msg, m.Query | m.Parse):
                found.append(msg.sql.decode("utf-8", "replace"))
    return found


def write(directory: pathlib.Path, seeds: dict[str, bytes]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    new = 0
    for name, data in seeds.items():
        path = directory / name
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            new += 1
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capture", action="store_true", help="also record real client traffic (starts PostgreSQL)")
    args = ap.parse_args()
    pgwire = encoder_seeds()
    traffic_sql: list[str] = []
    if args.capture:
        traffic = capture()
        pgwire.update(traffic)
        for conv in traffic.values():
            traffic_sql += sql_in_traffic(conv[len(PGWIRE_HEADER):])
    print(f"pgwire: {write(CORPUS / 'pgwire', pgwire)} new of {len(pgwire)}")
    analyze = sql_seeds(traffic_sql)
    print(f"analyze: {write(CORPUS / 'analyze', analyze)} new of {len(analyze)}")


if __name__ == "__main__":
    main()
