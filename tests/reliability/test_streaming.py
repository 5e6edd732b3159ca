"""Large results stream through the proxy with flat memory, and a client that stops reading (or
pipelines without reading) pushes back on the server instead of growing the proxy."""

from __future__ import annotations

import select
import threading
import time

from tests.fix_postgres import Postgres, wait_until
from tests.fix_proxy import TOKENS, start_proxy
from tests.reliability.harness import RawClient, RssSampler, rss_kib

ROW = 1000  # bytes of 'x' per row; a DataRow is 1,011 bytes on the wire
BIG_ROWS = 200_000  # ~200 MB
STALLED_ROWS = 50_000  # ~50 MB
GROWTH_BOUND_KIB = 64 * 1024  # the bound for the 200 MB stream
STALL_BOUND_KIB = 16 * 1024  # a stalled client may cost the proxy its buffers, not the result


def _big(rows: int) -> str:
    return f"SELECT repeat('x', {ROW}) FROM generate_series(1, {rows})"


def _warm(port: int) -> None:
    client = RawClient(port)
    client.login("bob", TOKENS["bob"])
    client.query(_big(100))
    client.drain_result()
    client.close()


def test_a_200_mb_result_streams_to_the_client_with_flat_proxy_memory(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    try:
        _warm(proxy.port)
        rss0 = rss_kib(proxy.proc.pid)
        client = RawClient(proxy.port)
        client.login("bob", TOKENS["bob"])
        with RssSampler(proxy.proc.pid, 0.05) as sampler:
            t0 = time.monotonic()
            client.query(_big(BIG_ROWS))
            received = client.drain_result()
            elapsed = time.monotonic() - t0
        client.close()
        growth = sampler.peak - rss0
        print(f"\n200 MB stream: {received / 1e6:.0f} MB in {elapsed:.1f}s ({received / 1e6 / elapsed:.0f} MB/s), "
              f"proxy RSS {rss0 / 1024:.0f} MiB -> peak {sampler.peak / 1024:.0f} MiB (+{growth / 1024:.1f} MiB)")
        assert received > BIG_ROWS * (ROW + 11)
        assert growth < GROWTH_BOUND_KIB, f"the proxy grew by {growth} KiB while relaying {received} bytes"
    finally:
        proxy.stop()


def _server_blocked_on_client(pg: Postgres) -> bool:
    return pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state = 'active' "
                   "AND wait_event = 'ClientWrite' AND query LIKE 'SELECT repeat%'").strip() == "1"


def test_a_client_that_stops_reading_pushes_back_on_the_server_not_on_proxy_memory(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    try:
        _warm(proxy.port)
        rss0 = rss_kib(proxy.proc.pid)
        client = RawClient(proxy.port, rcvbuf=16 * 1024)
        client.login("bob", TOKENS["bob"])
        client.query(_big(STALLED_ROWS))  # ... and read nothing
        # The proxy stops reading the server, so the server itself waits to write (ClientWrite).
        wait_until(lambda: _server_blocked_on_client(big_pg), timeout=20, what="the server to block on ClientWrite")
        with RssSampler(proxy.proc.pid, 0.05) as sampler:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # stalled for two seconds: the server stays blocked
                assert _server_blocked_on_client(big_pg)
                time.sleep(0.2)
        stalled_growth = sampler.peak - rss0
        with RssSampler(proxy.proc.pid, 0.05) as reading:
            received = client.drain_result(chunk=64 * 1024, pause=0.0005)  # now a slow reader
        client.close()
        print(f"\nstalled client: proxy grew {stalled_growth} KiB while stalled, "
              f"{reading.peak - rss0} KiB while read slowly; {received / 1e6:.0f} MB received")
        assert received > STALLED_ROWS * (ROW + 11)  # nothing lost either
        assert stalled_growth < STALL_BOUND_KIB
        assert reading.peak - rss0 < STALL_BOUND_KIB
    finally:
        proxy.stop()


def test_a_client_that_vanishes_mid_result_frees_its_server_connection(big_pg: Postgres, tmp_path):
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    try:
        client = RawClient(proxy.port, rcvbuf=16 * 1024)
        client.login("bob", TOKENS["bob"])
        client.query(_big(STALLED_ROWS))
        wait_until(lambda: _server_blocked_on_client(big_pg), timeout=20, what="the server to block on ClientWrite")
        client.sock.recv(4096)
        client.sock.close()  # unread data: the kernel sends RST
        wait_until(lambda: big_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip() == "0",
                   timeout=15, what="the server connection to go with its client")
        assert proxy.proc.poll() is None
        _warm(proxy.port)  # and the proxy serves the next client
    finally:
        proxy.stop()


def test_a_client_that_pipelines_without_reading_is_not_read_without_bound(big_pg: Postgres, tmp_path):
    """Queries pile up behind a result the client does not read: the proxy stops reading the client."""
    proxy = start_proxy(big_pg, tmp_path, "--log-level", "WARNING")
    padded = RawClient.query_message(f"SELECT length('{'y' * 65536}')")
    cap = 64 * 1024 * 1024  # a proxy that read without bound would take all of it
    try:
        _warm(proxy.port)
        rss0 = rss_kib(proxy.proc.pid)
        client = RawClient(proxy.port, rcvbuf=16 * 1024)
        client.login("bob", TOKENS["bob"])
        client.query(_big(STALLED_ROWS))
        client.sock.setblocking(False)
        sent = 0
        pending = b""
        last_progress = time.monotonic()
        with RssSampler(proxy.proc.pid, 0.05) as sampler:
            while sent < cap and time.monotonic() - last_progress < 1.5:
                if not pending:
                    pending = padded
                _, writable, _ = select.select([], [client.sock], [], 0.1)
                if not writable:
                    continue
                try:
                    n = client.sock.send(pending)
                except BlockingIOError:
                    continue
                pending = pending[n:]
                sent += n
                last_progress = time.monotonic()
        queries = sent // len(padded) + (1 if pending else 0)  # the last one may be partly sent
        client.sock.setblocking(True)
        finish = threading.Thread(target=client.sock.sendall, args=(pending,))
        finish.start()  # the last, partly sent query is completed while the replies are read
        growth = sampler.peak - rss0
        replies = _count_ready(client, 1 + queries)
        finish.join(30)
        client.close()
        print(f"\npipelining client: {sent / 1e6:.1f} MB of queries accepted before the proxy pushed back, "
              f"proxy grew {growth} KiB")
        assert sent < cap, "the proxy kept reading a client whose replies pile up"
        assert growth < STALL_BOUND_KIB
        assert replies == 1 + queries
    finally:
        proxy.stop()


def _count_ready(client: RawClient, expected: int) -> int:
    """Read replies, counting ReadyForQuery messages, until ``expected`` arrived."""
    seen = 0
    buf = bytearray()
    while seen < expected:
        data = client.sock.recv(1 << 20)
        if not data:
            break
        buf += data
        pos = 0
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if len(buf) - pos < 1 + length:
                break
            if buf[pos:pos + 1] == b"Z":
                seen += 1
            pos += 1 + length
        del buf[:pos]
    return seen
