"""The ledger writer in a process of its own, fed by the proxy over a pipe.

Why a process: the writer's Python work (formatting blocks of reads, hashing, SQLite or the
PostgreSQL sink) in a thread of the proxy shares the proxy's GIL, and every batch it formats
stalls the event loop that relays all sessions. In its own process it runs beside the loop. The
proxy's side (``LedgerProcess``) has the interface of ``writer.LedgerWriter``: a read costs the
event loop a list append, and every ``READ_LINGER`` seconds the batch is packed into one frame of
``audit.read_records`` and written to the pipe; a durable entry is written at once and its future
resolves when the writer acknowledges its commit (read on the event loop, see ``LedgerProcess``).

What happens when something dies:

- the proxy (kill -9): the writer reads end of file, commits what the pipe held, signs the tail
  and exits. Reads still in the proxy's buffer (at most ``READ_LINGER`` of them) are lost with it;
  no durable entry is, because its client was never answered before the acknowledgement.
- the writer: every unacknowledged durable entry is refused (the statement gets 58030), the
  writer is started again and continues the chain from what is stored; entries it had not
  committed are counted in ``dropped``. Until it runs again durable statements are refused.
- the proxy restarts while its old writer still drains: the writer holds a lock per chain
  (SQLite: a byte-range lock on ``FILE-writers``; PostgreSQL: an advisory lock), so the new writer
  waits for the old one instead of forking the chain; after ``LOCK_WAIT`` it gives up and the
  proxy does not start (two proxies configured with one ``--ledger-chain``).

Run as ``python -m dbguard.audit.ledger_process``: the configuration (with the signing key) comes
as the first frame on standard input, never on the command line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import orjson

from dbguard.audit import events, ledger, read_records
from dbguard.audit import ledger_wire as wire
from dbguard.audit.writer import (
    BLOCK_MAX,
    READ_LINGER,
    Blocks,
    LedgerUnavailable,
    Waiter,
    packed_block,
    resolve_waiters,
    same_minute,
)
from dbguard.metrics import LEDGER_BUCKETS, Buckets

log = logging.getLogger("dbguard.ledger")

FLUSH_AT = 64 * 1024  # bytes of frames that are written at once, without waiting for READ_LINGER
READ_BATCH = 1000  # reads packed and written at once, without waiting for READ_LINGER
assert READ_BATCH <= read_records.MAX_SHAPES  # a batch's records index its shapes with a u16
BUFFER_MAX = 32 * 1024 * 1024  # beyond this the writer is stuck: further reads are dropped (counted)
PIPE_SIZE = 1024 * 1024
LOCK_WAIT = 15.0  # seconds a new writer waits for the previous writer of its chain
START_TIMEOUT = LOCK_WAIT + 30.0
STATS_EVERY = 0.1
# Reads and entries the writer process holds uncommitted (queued, being committed, or kept for
# retry while the store fails) before it sheds further batches of reads (counted as dropped): its
# memory stays bounded (tens of MB) through a long outage of the store.
HOLD_MAX = 100_000
# Writer processes, numbered across every LedgerProcess: a shape's ``sent`` names the one that knows it.
_generations = itertools.count(1)
_batches = itertools.count(1)  # batches of reads, across every LedgerProcess: a shape's ``batch``


class LedgerStartError(Exception):
    """The writer process could not open the store or take its chain's lock."""


def _usable(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` runs its callbacks (a reader on it reads)."""
    return loop.is_running() and not loop.is_closed()


class LedgerProcess:
    """The proxy's side: frames to the writer process, acknowledgements back.

    The writer's answers (ACK and STATS frames on its stdout) are read on the event loop that
    writes durable entries (``add_reader``), which settles their futures directly: a thread that
    read them would contend for the GIL with the loop at every acknowledgement. The thread
    ``dbguard-ledger-acks`` reads them while no loop does (before one is known, from plain threads,
    while ``close()`` runs, once the loop stopped) and does the blocking work of a writer's death:
    it waits for it and starts the next. Whoever reads holds ``_ack_lock`` while reading, and
    ``_ack_loop`` names who may (a loop, or None: the thread), so two never read the pipe at once
    and a hand-over keeps a partial frame (``_frames``) for the next reader.
    """

    def __init__(self, config: dict[str, Any], *, name: str) -> None:
        self.name = name
        self._config = config
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._reads: list[events.Completion] = []  # reads not yet packed into the buffer
        self._gen = 0  # which writer process (of _generations): shapes are sent again to a new one
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1  # the pipe to the writer, non-blocking; -1 while no writer runs
        self._loop: asyncio.AbstractEventLoop | None = None  # whose add_writer drains a full pipe
        self._draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: dict[int, Waiter] = {}
        self._next_request = 1
        self._sent = 0  # entries and reads handed to this generation
        self._closing = False
        self._quit_sent = False  # QUIT is in the buffer: the writer takes nothing after it
        self._child: dict[str, Any] = {}  # the current writer's counters (its STATS frames)
        self._base = {"committed": 0, "failures": 0, "dropped": 0}  # counters of earlier writers
        self._latency_base = Buckets(LEDGER_BUCKETS)
        self.restarts = 0
        self._down_error = ""
        self._ack_lock = threading.Lock()  # held while the writer's answers are read (see the class)
        self._ack_cond = threading.Condition(self._ack_lock)
        self._ack_loop: asyncio.AbstractEventLoop | None = None  # the loop that reads them; None: the thread
        self._watching: tuple[asyncio.AbstractEventLoop, int] | None = None  # (loop, fd) of an add_reader
        self._rfd = -1  # the writer's stdout, non-blocking; closed once no loop watches it
        self._frames = wire.FrameReader()
        self._eof = False  # the current writer's answers ended (it died, or answered nonsense)
        self._start()
        self._reader = threading.Thread(target=self._read_acks, name="dbguard-ledger-acks", daemon=True)
        self._reader.start()

    # -- counters (the same names as writer.LedgerWriter's; metrics reads them) --------------------

    @property
    def committed(self) -> int:
        return self._base["committed"] + self._child.get("committed", 0)

    @property
    def failures(self) -> int:
        return self._base["failures"] + self._child.get("failures", 0)

    @property
    def dropped(self) -> int:
        return self._base["dropped"] + self._child.get("dropped", 0)

    @property
    def last_failed(self) -> bool:
        return self._fd < 0 or bool(self._child.get("last_failed"))

    @property
    def last_error(self) -> str:
        return self._down_error if self._fd < 0 else self._child.get("last_error", "")

    @property
    def commit_latency(self) -> Buckets:
        return self._latency_base.merged(self._child.get("latency") or {})

    def queued(self) -> int:
        """Entries not yet committed: in this buffer, in the pipe and in the writer."""
        return (len(self._reads) + max(0, self._sent - self._child.get("received", 0))
                + self._child.get("held", self._child.get("queued", 0)))

    # -- the writer process -------------------------------------------------------------------------

    def _start(self) -> None:
        """Start a writer and wait until it holds its chain's lock and the store is open."""
        proc = subprocess.Popen([sys.executable, "-m", "dbguard.audit.ledger_process"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            config = dict(self._config, log_level=logging.getLogger().getEffectiveLevel())
            proc.stdin.write(wire.frame(wire.CONFIG, orjson.dumps(config)))
            proc.stdin.flush()
            reader, deadline = wire.FrameReader(), time.monotonic() + START_TIMEOUT
            answers = select.poll()  # (not select.select: a busy proxy's descriptors pass 1024)
            answers.register(proc.stdout.fileno(), select.POLLIN)
            while True:
                ready = answers.poll(max(0.0, deadline - time.monotonic()) * 1000)
                data = os.read(proc.stdout.fileno(), 65536) if ready else b""
                if not data:
                    raise LedgerStartError("the ledger writer process exited while starting (see its log above)"
                                           if ready else f"the ledger writer did not start within {START_TIMEOUT:.0f} s")
                frames = list(reader.feed(data))
                if frames:
                    break
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        kind, payload = frames[0]
        if kind != wire.READY:
            proc.wait()
            raise LedgerStartError(orjson.loads(payload).get("message", "the ledger writer failed")
                                   if kind == wire.FAILED else "the ledger writer answered nonsense")
        # Ours alone (``_retire`` and ``_close_rfd`` close them): were they proc.stdin's and
        # proc.stdout's, those file objects would close the numbers again when the Popen goes, by
        # then perhaps a client's socket (or a descriptor an event loop still watches).
        fd = os.dup(proc.stdin.fileno())
        proc.stdin.close()
        proc.stdin = None
        rfd = os.dup(proc.stdout.fileno())
        proc.stdout.close()
        proc.stdout = None
        os.set_blocking(rfd, False)
        with contextlib.suppress(OSError):  # F_SETPIPE_SZ: a larger pipe rides out a slow commit
            fcntl.fcntl(fd, 1031, PIPE_SIZE)
        os.set_blocking(fd, False)
        with self._ack_lock:  # the thread reads the new writer's answers until a loop takes them
            self._rfd, self._frames, self._eof, self._ack_loop = rfd, reader, False, None
        with self._lock:
            self._gen = next(_generations)
            self._proc, self._fd, self._child = proc, fd, {}
        for kind, payload in frames[1:]:  # what came with READY
            if kind == wire.STATS:
                with contextlib.suppress(orjson.JSONDecodeError):
                    self._child = orjson.loads(payload)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # A restart runs on the thread: the loop writes what queued meanwhile, as it writes
            # everything else, rather than this thread blocking it on the lock, and reads the new
            # writer's answers.
            try:
                loop.call_soon_threadsafe(self._restarted, loop)
                return
            except RuntimeError:  # closed meanwhile
                pass
        self._flush()  # what queued while no writer ran

    def _restarted(self, loop: asyncio.AbstractEventLoop) -> None:
        self._attach(loop)
        self._flush()

    # -- the writer's answers -------------------------------------------------------------------------

    def _read_acks(self) -> None:
        """The thread: reads the writer's answers while no loop does, and starts a new writer when
        one dies (after every answer it gave was read, by whichever reader)."""
        while True:
            proc = self._proc
            assert proc is not None
            self._read_until_end()
            proc.wait()
            self._close_rfd()
            if self._closing:
                return
            self._writer_died(proc)
            if self._closing:
                return

    def _read_until_end(self) -> None:
        rfd = self._rfd
        poller = select.poll()
        poller.register(rfd, select.POLLIN)
        while True:
            with self._ack_lock:
                while not self._eof and self._ack_loop is not None:
                    if self._closing or not _usable(self._ack_loop):
                        # Its loop stopped (or close() waits for the rest): read here, until a
                        # loop takes the answers again (_attach).
                        self._ack_loop = None
                        break
                    self._ack_cond.wait(0.5)
                if self._eof:
                    return
            poller.poll()
            with self._ack_lock:
                if self._ack_loop is not None or self._eof:
                    continue
                settled = self._read_some()
            _settle(settled)

    def _read_some(self) -> list[tuple[Waiter, int, str]]:
        """One read of the writer's answers (``_ack_lock`` held, by the reader it names): the
        futures they settle, for the caller to settle once the lock is released."""
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self._ended()
            return []
        settled: list[tuple[Waiter, int, str]] = []
        try:
            for kind, payload in self._frames.feed(data):
                if kind == wire.ACK:
                    request, seq = wire.ACK_BODY.unpack_from(payload)
                    # Without self._lock (dict.pop is atomic): close() holds it while it writes,
                    # and a writer whose acknowledgements are not read stops reading its input.
                    future = self._waiting.pop(request, None)
                    if future is not None:
                        settled.append((future, seq, payload[wire.ACK_BODY.size:].decode()))
                elif kind == wire.STATS:
                    self._child = orjson.loads(payload)
        except Exception as exc:  # noqa: BLE001 - a writer that answers nonsense is treated as dead
            log.error("ledger %s: the writer's answer is corrupt (%s); starting a new one", self.name, exc)
            assert self._proc is not None
            self._proc.kill()  # the thread waits for it and starts the next
            self._ended()
        return settled

    def _ended(self) -> None:
        """The writer's answers ended (``_ack_lock`` held): the thread takes over its death."""
        self._eof = True
        self._ack_loop = None
        self._ack_cond.notify_all()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: read the writer's answers here from now on (add_reader)."""
        with self._ack_lock:
            if self._eof or self._rfd < 0 or self._closing:
                return
            rfd, watching = self._rfd, self._watching
            if watching is not None:
                if watching[0] is loop:
                    loop.remove_reader(watching[1])
                elif not watching[0].is_closed():
                    return  # another loop still watches the pipe: one at a time (the thread reads)
                self._watching = None
            loop.add_reader(rfd, self._on_acks, loop, rfd)
            self._watching, self._ack_loop = (loop, rfd), loop

    def _on_acks(self, loop: asyncio.AbstractEventLoop, rfd: int) -> None:
        """The loop's reader: settles durable entries as the writer acknowledges them."""
        with self._ack_lock:
            if self._ack_loop is not loop or rfd != self._rfd or self._eof:
                # Not this loop's to read any more (the thread took over, or the descriptor is a
                # dead writer's whose close waits for this loop): stop watching it.
                loop.remove_reader(rfd)
                if self._watching == (loop, rfd):
                    self._watching = None
                return
            settled = self._read_some()
            if self._eof:
                loop.remove_reader(rfd)
                self._watching = None
        if settled:
            _settle(settled)  # (resolve_waiters sets this loop's futures here and now)

    def _close_rfd(self) -> None:
        """Close a dead writer's stdout (the thread, after its end): on the loop that watches it,
        if one does, so that no selector keeps a number the proxy may open again."""
        with self._ack_lock:
            rfd, self._rfd = self._rfd, -1
            watching = self._watching
            if watching is not None and watching[1] == rfd:
                self._watching = None
            else:
                watching = None
        if watching is not None and _usable(watching[0]):
            loop = watching[0]

            def unwatch() -> None:
                loop.remove_reader(rfd)
                os.close(rfd)

            with contextlib.suppress(RuntimeError):  # closed meanwhile: its selector is gone
                loop.call_soon_threadsafe(unwatch)
                return
        elif watching is not None and not watching[0].is_closed():
            # A stopped loop may be closed without running again (its callbacks then never run):
            # nobody selects on it now, so its selector lets go of the number here.
            with contextlib.suppress(Exception):
                watching[0].remove_reader(rfd)
        with contextlib.suppress(OSError):
            os.close(rfd)

    def _to_thread(self, *, unless_usable: bool = False) -> None:
        """The thread reads the writer's answers from now on (until a loop attaches again); with
        ``unless_usable``, only if the loop that reads them no longer runs."""
        with self._ack_lock:
            if self._ack_loop is not None and not (unless_usable and _usable(self._ack_loop)):
                self._ack_loop = None
                self._ack_cond.notify_all()

    def _writer_died(self, proc: subprocess.Popen[bytes]) -> None:
        why = f"the ledger writer process exited with status {proc.returncode}"
        log.error("ledger %s: %s; statements that must be recorded are refused until it runs again", self.name, why)
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            child = self._child
            # reads and entries in the pipe, and those the writer held (a block counts its reads)
            lost = max(0, self._sent - child.get("received", 0)) + child.get("held", child.get("queued", 0))
            for key in self._base:
                self._base[key] += child.get(key, 0)
            self._base["dropped"] += lost
            self._latency_base = self._latency_base.merged(child.get("latency") or {})
            self._child, self._sent = {}, 0
            self._retire(self._fd)
            self._fd = -1
            self._down_error = why
            self._buf.clear()  # it names shapes the dead writer knew (counted in ``lost``)
            self._gen = next(_generations)
        if lost:
            log.error("ledger %s: %d entries the writer had not committed were lost with it", self.name, lost)
        resolve_waiters([(f, None) for f in waiting.values()], LedgerUnavailable(why))
        delay = 0.2
        while not self._closing:
            self.restarts += 1
            try:
                self._start()
            except (LedgerStartError, OSError) as exc:
                self._down_error = f"{why}; starting a new writer failed: {exc}"
                log.error("ledger %s: starting a new writer failed: %s; trying again in %.1f s", self.name, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.warning("ledger %s: a new writer process runs; the chain continues", self.name)
            return

    def _retire(self, fd: int) -> None:
        """Close a dead writer's pipe (on the loop when the loop still watches it)."""
        if fd < 0:
            return
        if self._draining and self._loop is not None:
            self._draining = False
            loop = self._loop

            def retire() -> None:
                loop.remove_writer(fd)
                os.close(fd)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(retire)
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- producer side (event loop) -----------------------------------------------------------------

    def append(self, data: bytes, *, durable: bool = False, block: bool = False) -> Waiter | None:
        """Queue an entry; a durable one returns what resolves once it is committed (an asyncio
        future on an event loop, else a concurrent one)."""
        future: Waiter | None = None
        request = 0
        loop: asyncio.AbstractEventLoop | None = None
        if durable:
            try:
                loop = asyncio.get_running_loop()
                future = loop.create_future()
            except RuntimeError:
                future = concurrent.futures.Future()
        with self._lock:
            if self._quit_sent and not durable:  # after the writer's last frame: counted, never sent
                self._base["dropped"] += 1
                return None
            if durable:
                if self._fd < 0 or self._closing:
                    resolve_waiters([(future, None)], LedgerUnavailable(self._down_error or "the ledger is closed"))
                    return future
                request = self._next_request
                self._next_request += 1
                self._waiting[request] = future  # type: ignore[assignment]
            if self._reads:
                self._pack_reads()  # the chain keeps the order things happened in
            self._buf += wire.entry(request, block, data)
            self._sent += 1
        if durable:
            if loop is not None:
                if self._ack_loop is not loop:  # its acknowledgement is read here, on the loop
                    self._loop = loop
                    self._attach(loop)
            elif self._ack_loop is not None:
                self._to_thread(unless_usable=True)
        if durable or len(self._buf) >= FLUSH_AT:
            self._flush()
        elif self._timer is None:
            self._arm()
        return future

    def append_read(self, completion: events.Completion) -> None:
        """Queue a read (never durable): the completion itself, packed with the others of its
        batch at the next flush (one tight loop per batch costs the event loop less than packing
        each read as it finishes)."""
        reads = self._reads
        reads.append(completion)
        # (closing: close() may have sent QUIT already; _flush packs this one, or counts it dropped)
        if self._closing or len(reads) >= READ_BATCH:
            self._flush()
        elif self._timer is None:
            self._arm()

    def _pack_reads(self) -> None:
        """Pack the queued reads into one READS frame (lock held): a record per read, naming its
        shape by its index in the batch; a shape's text goes to this writer once."""
        # Taken from the front, never swapped: append_read (no lock) may be appending to this
        # list from the loop while close() packs it on another thread.
        queued = self._reads
        reads = queued[:]
        del queued[:len(reads)]
        buf, gen = self._buf, self._gen
        if len(buf) > BUFFER_MAX or self._quit_sent:
            self._base["dropped"] += len(reads)
            return
        batch = next(_batches)
        used: list[int] = []
        out = bytearray()
        pack, whole = read_records.RECORD.pack, read_records.whole
        max_tag, max_duration = read_records.MAX_TAG, read_records.MAX_DURATION
        earliest, latest = math.inf, -math.inf
        for completion in reads:
            when, shape = completion.deferred  # type: ignore[misc]
            if shape.sent != gen:
                buf += wire.shape(shape.wire, shape.head, shape.body)
                shape.sent = gen
            if shape.batch != batch:
                shape.batch, shape.index = batch, len(used)
                used.append(shape.wire)
            at = when.timestamp()
            if at < earliest:
                earliest = at
            if at > latest:
                latest = at
            done = completion.compact()
            if done is not None and len(done[2]) <= max_tag and done[1] <= max_duration:  # (ASCII tags)
                out += pack(shape.index, at, done[0], done[1], len(done[2]))
                out += done[2].encode()
            else:
                out += whole(shape.index, at, completion.stmt, completion.json())
        if reads:
            buf += wire.reads(len(reads), earliest, latest, used, out)
        self._sent += len(reads)

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: write now
            self._flush()
            return
        self._loop = loop
        self._timer = loop.call_later(READ_LINGER, self._flush)
        if self._ack_loop is not loop:
            self._attach(loop)

    def _flush(self) -> None:
        """Write what the pipe takes; on an event loop the rest is written when it drains."""
        with self._lock:
            self._timer = None
            if self._reads:
                self._pack_reads()
            released = events.RELEASED_SHAPES
            while released:
                self._buf += wire.forget(released.popleft())
            if self._fd < 0 or not self._buf:
                return
            try:
                written = os.write(self._fd, self._buf)
            except BlockingIOError:
                written = 0
            except OSError:  # the writer died: the reader thread starts a new one
                return
            del self._buf[:written]
            if self._buf and not self._draining:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    self._write_all(time.monotonic() + 10.0)
                    return
                self._loop, self._draining = loop, True
                loop.add_writer(self._fd, self._flush)
            elif not self._buf and self._draining and self._loop is not None:
                self._draining = False
                self._loop.remove_writer(self._fd)

    def _write_all(self, deadline: float) -> None:
        """Off the event loop (closing, tests): wait until the pipe took the buffer (lock held)."""
        writable = select.poll()
        writable.register(self._fd, select.POLLOUT)
        while self._buf and self._fd >= 0 and time.monotonic() < deadline:
            if self._ack_loop is not None:
                # The writer takes its input only while its answers are read: a loop that reads
                # them may be blocked on _lock, held here (lock order: _lock, then _ack_lock).
                self._to_thread()
            writable.poll(min(0.1, max(0.0, deadline - time.monotonic())) * 1000)
            try:
                del self._buf[:os.write(self._fd, self._buf)]
            except BlockingIOError:
                continue
            except OSError:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Hand over everything, let the writer commit and sign it, and wait for it to exit."""
        self._closing = True
        deadline = time.monotonic() + timeout
        self._to_thread()  # the thread reads the rest: the loop may have stopped, or wait for this call
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._fd >= 0:
                if self._reads:
                    self._pack_reads()
                self._buf += wire.frame(wire.QUIT, b"")
                self._quit_sent = True
                self._write_all(deadline)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ledger %s: the writer did not finish within %.0f s; %d entries not yet committed",
                          self.name, timeout, self.queued())
                return
        self._reader.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._retire(self._fd)
            self._fd = -1
            self._down_error = "the ledger is closed"
        resolve_waiters([(f, None) for f in waiting.values()], LedgerUnavailable("the ledger closed before the commit"))


def _settle(settled: list[tuple[Waiter, int | None, str]]) -> None:
    ok = [(f, seq) for f, seq, error in settled if seq]
    failed: dict[str, list[tuple[Waiter, int | None]]] = {}
    for f, seq, error in settled:
        if not seq:
            failed.setdefault(error, []).append((f, None))
    if ok:
        resolve_waiters(ok, None)
    for error, futures in failed.items():
        resolve_waiters(futures, LedgerUnavailable(error))


# -- the writer process ------------------------------------------------------------------------------


def _chain_lock(config: dict[str, Any]) -> object:
    """Hold the chain's writer lock for this process's life (see the module's docstring)."""
    chain, target = config["chain"], config["target"]
    digest = int.from_bytes(hashlib.sha256(chain.encode()).digest()[:8], "big")
    deadline, waited = time.monotonic() + config.get("lock_wait", LOCK_WAIT), False
    if config["store"] == "postgres":
        import psycopg

        conn = psycopg.connect(target, autocommit=True, connect_timeout=5, application_name="dbguard-ledger-lock")
        key = digest - (1 << 63)  # a signed bigint
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            if time.monotonic() > deadline:
                conn.close()
                raise LedgerStartError(f"ledger chain {chain!r} is being written by another process (another proxy "
                                       "with the same --ledger-chain, or a previous writer that did not finish)")
            if not waited:
                log.warning("ledger: waiting for the previous writer of chain %r to finish", chain)
                waited = True
            time.sleep(0.1)
        return conn
    fd = os.open(target + "-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    offset = digest >> 2  # a byte of the file per chain: fcntl locks are released when the process dies
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            return fd
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise LedgerStartError(f"ledger chain {chain!r} in {target} is being written by another process "
                                       "(another proxy with the same --ledger-chain, or a previous writer that "
                                       "did not finish)") from None
            if not waited:
                log.warning("ledger: waiting for the previous writer of chain %r to finish", chain)
                waited = True
            time.sleep(0.1)


def _open_writer(config: dict[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(config["key"])) if config.get("key") else None
    if config["store"] == "postgres":
        from dbguard.audit import postgres_sink

        return postgres_sink.PostgresLedger(config["target"], config["chain"], signing_key=key,
                                            checkpoint_every=config.get("checkpoint_every", ledger.SIGN_EVERY))
    from dbguard.audit import sqlite_sink

    return sqlite_sink.SqliteLedger(config["target"], config["chain"], signing_key=key,
                                    checkpoint_every=config.get("checkpoint_every", ledger.SIGN_EVERY),
                                    synchronous=config.get("synchronous", "NORMAL"))


def serve(inp: int = 0, out: int = 1) -> int:
    """The writer process: frames from ``inp`` into a LedgerWriter, acknowledgements to ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops when the proxy says so, or when the proxy is gone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out_lock = threading.Lock()
    gone = False  # nobody reads our reports: the proxy died, but what it sent is still to be committed

    def send(data: bytes) -> None:
        nonlocal gone
        with out_lock:
            view = memoryview(data)
            while view and not gone:
                try:
                    view = view[os.write(out, view):]
                except OSError:  # EPIPE
                    gone = True

    reader = wire.FrameReader()
    config: dict[str, Any] | None = None
    pending: list[tuple[bytes, bytes]] = []  # what came with the configuration
    try:
        while config is None:
            data = os.read(inp, 65536)
            if not data:
                return 1
            for kind, payload in reader.feed(data):
                if config is not None:
                    pending.append((kind, payload))
                elif kind != wire.CONFIG:  # the proxy sends it first: nothing else is kept waiting for it
                    raise wire.CorruptStream(f"a frame of type {kind!r} before the configuration")
                elif not isinstance(config := orjson.loads(payload), dict):
                    raise wire.CorruptStream("the configuration is not an object")
    except (wire.CorruptStream, orjson.JSONDecodeError) as exc:
        sys.stderr.write(f"dbguard.audit.ledger_process: the input is not a dbguard proxy's ({exc}); this is "
                         "the ledger writer, which the proxy starts itself\n")
        return 2
    logging.basicConfig(level=config.get("log_level", logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (writer): %(message)s")
    try:
        lock = _chain_lock(config)
        writer = _open_writer(config)
    except Exception as exc:  # noqa: BLE001 - whatever stops the store from opening is the start's error
        message = str(exc) if isinstance(exc, LedgerStartError) else f"{type(exc).__name__}: {exc}"
        send(wire.frame(wire.FAILED, orjson.dumps({"message": message})))
        return 1
    send(wire.frame(wire.READY, b""))
    shapes: dict[int, events.ReadShape] = {}
    received = 0
    unknown = 0
    shed = 0  # reads not queued: the writer held hold_max reads and entries
    shedding = 0  # reads shed since the writer last had room (logged once per episode)
    hold_max = int(config.get("hold_max", HOLD_MAX))

    def acked(request: int, future: concurrent.futures.Future) -> None:
        error = future.exception()
        # the counters with it: whoever the acknowledgement answers may look at the metrics next
        send((wire.ack(request, 0, str(error)) if error is not None else wire.ack(request, future.result()))
             + stats())

    def stats() -> bytes:
        latency = writer.commit_latency
        return wire.frame(wire.STATS, orjson.dumps({
            "committed": writer.committed, "failures": writer.failures, "dropped": writer.dropped + unknown + shed,
            "last_failed": writer.last_failed, "last_error": writer.last_error, "received": received,
            "queued": writer.queued(), "held": writer.held(), "latency": {"counts": latency.counts, "total": latency.total,
                                                    "count": latency.count}}))

    # A batch of reads of one minute becomes one block entry as it came; other batches (across a
    # minute, a lone read, a shape the writer was not told about) go read by read through Blocks.
    # The writer thread chains, hashes and stores one entry per block.
    blocks = Blocks()
    quit_ = False

    def cut() -> None:
        done = blocks.flush()
        if done is not None:
            writer.append_built(done)

    def reads(payload: bytes) -> None:
        nonlocal received
        count, earliest, latest, numbers, records = wire.reads_of(payload)
        try:  # what a packed block keeps unread must read back as what the proxy sent
            read_records.check(records, count, len(numbers), earliest, latest)
        except ValueError as exc:
            raise wire.CorruptStream(f"a batch of reads: {exc}") from exc
        received += count
        if not shed_or_take(count):
            return
        known = [shapes.get(number) for number in numbers]
        if 1 < count <= BLOCK_MAX and same_minute(earliest, latest) and None not in known:
            cut()  # the chain keeps the order the proxy sent things in
            writer.append_built(packed_block(known, earliest, count, records))
            return
        for index, when, stmt, duration, tail in read_records.records(records):  # (checked above)
            shape = known[index]
            if shape is None:
                unknown_shape(numbers[index])
                continue
            done = blocks.add(shape, round(when * 1e6), (tail,) if type(tail) is dict else (stmt, duration, tail))
            if done is not None:
                writer.append_built(done)

    def shed_or_take(count: int) -> bool:
        """Whether a batch of ``count`` reads has room; if not it is counted as dropped (reads are
        never durable: what must be durable still queues, and the store answers it)."""
        nonlocal shed, shedding
        if writer.held() < (hold_max // 2 if shedding else hold_max):  # (room for half again: no flapping)
            if shedding:
                log.warning("ledger: the store caught up; %d reads were dropped meanwhile", shedding)
                shedding = 0
            return True
        if not shedding:
            log.error("ledger: %d reads and entries wait for the store (%s); reads are dropped (counted) "
                      "until it catches up", writer.held(), writer.last_error or "it is slower than the traffic")
        shed += count
        shedding += count
        return False

    def unknown_shape(number: int) -> None:  # cannot happen unless the proxy is wrong: counted, never invented
        nonlocal unknown
        unknown += 1
        log.error("ledger: a read names shape %d, which this writer was not told about; not recorded", number)

    def handle(kind: bytes, payload: bytes) -> None:
        nonlocal received, quit_
        if kind == wire.READS:
            reads(payload)
        elif kind == wire.SHAPE:
            number, head_len = wire.SHAPE_BODY.unpack_from(payload)
            rest = payload[wire.SHAPE_BODY.size:]
            shapes[number] = events.ReadShape(rest[:head_len], rest[head_len:], wire=number)
        elif kind == wire.ENTRY:
            cut()  # the chain keeps the order the proxy sent things in
            received += 1
            request, block = wire.ENTRY_BODY.unpack_from(payload)
            if block and not request and not shed_or_take(1):  # a read sent whole: shed like the others
                return
            future = writer.append(payload[wire.ENTRY_BODY.size:], durable=request != 0, block=bool(block))
            if future is not None:
                future.add_done_callback(lambda f, r=request: acked(r, f))  # type: ignore[union-attr]
        elif kind == wire.FORGET:
            shapes.pop(wire.U64.unpack(payload)[0], None)
        elif kind == wire.QUIT:
            quit_ = True
        else:
            raise wire.CorruptStream(f"unknown frame type {kind!r}")

    last_stats, last_report = 0.0, b""
    try:
        for kind, payload in pending:
            handle(kind, payload)
        while not quit_:
            ready, _, _ = select.select([inp], [], [], STATS_EVERY)
            if ready:
                data = os.read(inp, 1 << 20)
                if not data:
                    log.warning("ledger: the proxy is gone; committing what it sent")
                    break
                for kind, payload in reader.feed(data):
                    handle(kind, payload)
                cut()
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY:
                report = stats()
                if report != last_report:  # an idle writer stays quiet
                    send(report)
                    last_report = report
                last_stats = now
    except wire.CorruptStream as exc:
        log.error("ledger: the stream from the proxy is corrupt (%s); committing what came before it", exc)
    finally:
        cut()
        writer.close()
        send(stats())
        del lock
    return 0


if __name__ == "__main__":
    sys.exit(serve())
