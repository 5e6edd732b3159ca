"""What the reliability tests and bench/soak.py share: a PostgreSQL sized for 1,000 connections,
the proxy's memory, its metrics, and counting what reached the SQLite ledger.

Everything here reads the real processes from outside (/proc, /metrics, the ledger file); nothing
reaches into the proxy.
"""

from __future__ import annotations

import bisect
import contextlib
import pathlib
import resource
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable

import orjson

from dbguard.audit import search
from dbguard.pgwire import messages
from tests.fix_postgres import Postgres, _as_postgres, start_postgres

SOAK_MAX_CONNECTIONS = 1100  # one server connection per client, plus the proxy's own and psql's


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_big_postgres(base: pathlib.Path, max_connections: int = SOAK_MAX_CONNECTIONS) -> Postgres:
    """tests.fix_postgres.start_postgres, then max_connections raised with ALTER SYSTEM and a restart.

    The shared fixture takes no server parameters (it sets max_connections = 300); ALTER SYSTEM
    rewrites the same postgresql.auto.conf the fixture wrote, keeping its other settings.
    """
    pg = start_postgres(base)
    pg.psql(f"ALTER SYSTEM SET max_connections = {max_connections}", db="postgres")
    restart_postgres(pg)
    got = int(pg.psql("SHOW max_connections", db="postgres").strip())
    if got != max_connections:
        raise RuntimeError(f"max_connections is {got}, wanted {max_connections}")
    return pg


def pg_ctl(pg: Postgres, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_as_postgres([str(pg.bindir / "pg_ctl"), "-D", str(pg.datadir), *args]),
                          capture_output=True, text=True, check=False)


def restart_postgres(pg: Postgres, mode: str = "fast") -> None:
    r = pg_ctl(pg, "-l", str(pg.datadir / "server.log"), "-w", "-t", "60", "-m", mode, "restart")
    if r.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {r.stderr}{r.stdout}")


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), in KiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` and ``samples`` (t, KiB)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self._t0, rss_kib(self.pid)))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max((kib for _, kib in self.samples), default=0)


# -- /metrics ------------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    """The proxy's /metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of one histogram, in bound order."""
    prefix = f'{name}_bucket{{le="'
    buckets = [(float(key[len(prefix):-2]), value) for key, value in samples.items() if key.startswith(prefix)]
    return sorted(buckets)


def histogram_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in after]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the quantile."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    counts = [c for _, c in buckets]
    i = bisect.bisect_left(counts, rank)
    bound, count = buckets[i]
    if bound == float("inf"):
        return buckets[i - 1][0] if i > 0 else float("nan")
    lower, below = (buckets[i - 1][0], buckets[i - 1][1]) if i > 0 else (0.0, 0.0)
    if count == below:
        return bound
    return lower + (bound - lower) * (rank - below) / (count - below)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the SQLite ledger ---------------------------------------------------------------------------

def ledger_events(db: pathlib.Path) -> Iterable[dict]:
    """Every event in a SQLite ledger, read blocks expanded into their reads, in storage order."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for kind, data in conn.execute("SELECT kind, data FROM entries ORDER BY id"):
            event = orjson.loads(bytes(data))
            if kind == "reads":
                yield from search.block_reads(event)
            else:
                yield event
    finally:
        conn.close()


def count_statements(db: pathlib.Path, matches: Callable[[str], bool]) -> dict[str, int]:
    """Decision events (reads and writes) and completion entries whose statement ``matches``.

    A read's decision carries its completion; a write's completion is its own entry, joined to its
    decision by (session, stmt).
    """
    decisions = completions = forwarded = 0
    write_stmts: set[tuple[str, int]] = set()
    later: list[dict] = []
    for event in ledger_events(db):
        kind = event.get("kind")
        if kind == "decision" and matches(event.get("statement", "")):
            decisions += 1
            if event.get("outcome") == "forwarded":
                forwarded += 1
            if event.get("completion"):
                completions += 1
            else:
                write_stmts.add((event.get("session", ""), event.get("stmt", 0)))
        elif kind == "completion":
            later.append(event)
    for event in later:
        if (event.get("session", ""), event.get("completion", {}).get("stmt", 0)) in write_stmts:
            completions += 1
    return {"decisions": decisions, "forwarded": forwarded, "completions": completions}


def audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbguard", "audit", *args], capture_output=True, text=True,
                          timeout=120)


def keygen(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    priv, pub = directory / "ledger.key", directory / "ledger.pub"
    r = audit("keygen", "--private-key", str(priv), "--public-key", str(pub))
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return priv, pub


# -- a raw frontend that reads when the test says so ---------------------------------------------

READY_IDLE = b"Z\x00\x00\x00\x05I"


class RawClient:
    """A PostgreSQL frontend on a plain socket: logs in, sends bytes, reads (or does not read) replies.

    ``rcvbuf`` shrinks the socket's receive buffer so that a client that stops reading pushes
    back on the proxy after a few kilobytes instead of the kernel's default megabytes.
    """

    def __init__(self, port: int, *, rcvbuf: int = 0, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = bytearray()

    def login(self, user: str, token: str) -> None:
        self.sock.sendall(messages.encode_startup({"user": user, "database": "app"}))
        self._expect_auth_request()
        self.sock.sendall(messages.encode_password(token.encode() + b"\x00"))
        self.read_until_ready()

    def _expect_auth_request(self) -> None:
        while len(self.buf) < 9:
            self._recv()
        if self.buf[0:1] != b"R":
            raise AssertionError(f"expected an authentication request, got {bytes(self.buf[:64])!r}")
        length = struct.unpack("!i", self.buf[1:5])[0]
        del self.buf[:1 + length]

    def _recv(self, size: int = 65536) -> int:
        chunk = self.sock.recv(size)
        if not chunk:
            raise ConnectionError(f"the proxy closed the connection; last bytes {bytes(self.buf[-200:])!r}")
        self.buf += chunk
        return len(chunk)

    def read_until_ready(self) -> None:
        while not self.buf.endswith(READY_IDLE):
            self._recv()
        self.buf.clear()

    @staticmethod
    def query_message(sql: str) -> bytes:
        return messages.encode_query(sql)

    def query(self, sql: str) -> None:
        self.sock.sendall(messages.encode_query(sql))

    def drain_result(self, chunk: int = 1 << 20, pause: float = 0.0) -> int:
        """Read and discard replies up to the idle ReadyForQuery; returns the bytes read."""
        total = 0
        tail = b""
        while True:
            data = self.sock.recv(chunk)
            if not data:
                raise ConnectionError("the proxy closed the connection mid-result")
            total += len(data)
            tail = (tail + data)[-len(READY_IDLE):]
            if tail == READY_IDLE:
                return total
            if pause:
                time.sleep(pause)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(messages.encode_terminate())
        self.sock.close()


def read_events(path: pathlib.Path) -> list[dict]:
    """The JSON-lines events a running proxy has flushed so far (a line still being written is skipped)."""
    if not path.exists():
        return []
    text = path.read_bytes()
    complete = text[:text.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines() if line.strip()]
