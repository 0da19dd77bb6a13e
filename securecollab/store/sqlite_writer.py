"""The SQLite writer process: the one connection that writes, in its own interpreter.

    python -m securecollab.store.sqlite_writer PATH BATCH_MAX BATCH_WAIT_MS

`SQLiteStore` starts this as a child process and is its only client. Why a process and not
a thread: the sqlite3 module releases the GIL around every statement it steps, and a
writer thread has to win the GIL back from the busy event-loop thread after each one.
Under load py-spy showed the writer thread spending 30-40 % of its wall time waiting for
the GIL (about 250 us per message, whatever the batch size), which made the writer the
bottleneck of 1:1 messaging at ~3,000 msg/s while its CPU use was ~30 %. In a process of
its own it never waits for the event loop, and the event loop never waits for it.

Protocol (stdin: requests, stdout: replies), each a frame: a 4-byte big-endian length,
then the payload. The two ends are the same code base, started together; the pipes are
private to them (unpickling is safe only because nothing else can write to them).

- parent -> child: one frame per request, a `marshal` of `(op_id, fn, message_args)`:
  `fn` is a pickled write op `fn(conn)` (a `functools.partial` of a module-level function
  of `securecollab.store.sqlite`, connection last; pickled on its own, so one the writer
  cannot load fails alone) and `message_args` is None; or `fn` is None and `message_args`
  is `(message, offline_for, expires_at, outbox)`, an `insert_message` (the hot write,
  which has a fast path over a whole batch), its records as plain tuples of their fields
  (`rows.message_fields`, `rows.outbox_params`).
  Why marshal, one frame per request: the parent encodes a request when it is submitted
  and hands a scheduler tick's frames to one `os.writev`. marshal writes tuples of
  str/int/bytes/None/dict in C with no Python-level hooks, and small frames never build
  the one ~300 KB buffer that a pickle of a 200-message batch was (fresh pages: it cost
  more than the encoding; loop-thread CPU per message with 200 writers 14.5 -> 12.5 us).
  marshal's format may change between Python versions: harmless here, the writer is our
  own child, started with the parent's interpreter (`sys.executable`) and code.
- child -> parent (pickle: outcomes may be records and exceptions): first
  `("ready", None)` once the database is open in WAL mode, or `("error", text)` and
  exit 1; then per committed (or failed) batch either `("done", (seconds, op_ids))` when
  every op succeeded with a result the parent already holds (None, or a created
  message), or `("batch", (seconds, failed, results))`, `results` a list of
  `(op_id, error, result)`, where a created message's `result` is None too.

Batching is `groupcommit.BatchPolicy`, as in the thread writer before: take every request
already sent (up to `batch_max`), linger `batch_wait_ms` for stragglers when there is
concurrency, run the batch in one `BEGIN IMMEDIATE` transaction, commit once
(`synchronous=FULL`: durable when COMMIT returns), and only then reply. The batch first
runs without savepoints; if an op raises, it is rolled back and replayed with one
SAVEPOINT per op, so a failing op fails only itself.

End: EOF on stdin (the parent closed it, or died: kill -9 included) makes the writer
finish what it read, reply if it still can, close the database and exit 0.
"""

from __future__ import annotations

import gc
import marshal
import os
import pickle
import select
import signal
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from securecollab.store import (
    InsertResult,
    MessageRecord,
    OutboxRecord,
    StoreError,
    StoreUnavailable,
)
from securecollab.store import rows as R
from securecollab.store import sqlite as S
from securecollab.store.groupcommit import BatchPolicy

HEADER = struct.Struct("!I")
#: Bound on one frame read: anything larger means the stream is out of sync.
MAX_FRAME = 256 << 20
#: Bound on one request frame the server sends (a write over it fails alone).
FRAME_LIMIT = 64 << 20
#: The pipe size asked for (Linux F_SETPIPE_SZ): a whole batch of requests fits, so a
#: burst of writes reaches the writer in one read instead of waiting for it to drain.
PIPE_SIZE = 1 << 20
READ_CHUNK = 1 << 20
#: Bound on the writer's set of known direct_peers pairs (each pair counts twice).
KNOWN_PEERS_MAX = 100_000

Request = tuple[int, Any, Any]


def encode_frame(obj: object) -> bytes:
    """A reply frame (pickle)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def encode_request(request: Request) -> bytes:
    """A request frame (marshal; see the module docstring). Raises ValueError for a
    value marshal cannot write: anything but exact str/int/float/bytes/None/bool and
    tuples, lists, dicts of those (a subclass of str, int or dict is refused too)."""
    payload = marshal.dumps(request)
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in, decoded objects out (frames may arrive in any chunking).

    `loads` decodes one payload: `pickle.loads` for replies, `marshal.loads` for requests.
    """

    def __init__(self, loads: Callable[[Any], Any] = pickle.loads) -> None:
        self._buf = bytearray()
        self._loads = loads

    def feed(self, data: bytes) -> list[Any]:
        """Every object completed by `data` (the rest is kept for the next call)."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        loads = self._loads
        start = 0
        try:
            while len(buf) - start >= 4:
                (size,) = HEADER.unpack_from(buf, start)
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes from the other end: out of sync")
                end = start + 4 + size
                if end > len(buf):
                    break
                out.append(loads(memoryview(buf)[start + 4 : end]))
                start = end
        finally:
            if start:
                del buf[:start]
        return out


def set_pipe_size(fd: int) -> None:
    """Ask for a `PIPE_SIZE` pipe buffer (Linux only; silently keeps the default else)."""
    setpipe = getattr(__import__("fcntl"), "F_SETPIPE_SZ", None)
    if setpipe is None:
        return
    try:
        __import__("fcntl").fcntl(fd, setpipe, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for this user: the default works, slower


# ---------------------------------------------------------------------- the child


class Job:
    """One request inside the writer: what to run, then its outcome."""

    __slots__ = ("error", "expires_at", "fn", "message", "offline_for", "op_id", "outbox", "result")

    def __init__(self, op_id: int, fn: bytes | None, margs: Any):
        self.op_id = op_id
        self.result: Any = None
        self.error: BaseException | None = None
        self.message: MessageRecord | None = None
        if fn is None:
            wire, offline_for, expires_at, wire_outbox = margs
            message = MessageRecord(*wire)
            outbox = tuple(OutboxRecord(*e) for e in wire_outbox)
            self.message = message
            self.offline_for: Sequence[str] = offline_for
            self.expires_at: int = expires_at
            self.outbox: Sequence[OutboxRecord] = outbox
            self.fn: Callable[[sqlite3.Connection], Any] = partial(
                S._insert_message_alone, message, offline_for, expires_at, outbox
            )
            return
        try:
            self.fn = pickle.loads(fn)
        except Exception as exc:  # e.g. a function this process cannot import
            error = StoreError(f"write op cannot be loaded by the writer: {exc!r}")
            self.fn = partial(_refuse, error)


def _refuse(error: StoreError, c: sqlite3.Connection) -> None:
    raise error


class BatchRunner:
    """Runs batches of jobs on the writer connection (group commit, optimistic first)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # (user, peer) pairs whose two direct_peers rows are known to be committed
        # (nothing deletes those rows), and the pairs the open batch adds.
        self.known_peers: set[tuple[str, str]] = set()
        self.new_peers: set[tuple[str, str]] = set()

    def run(self, batch: list[Job]) -> int | None:
        """Run and commit `batch`; every job ends with a result or an error.

        Returns how many jobs failed when known without counting (0 after a clean
        optimistic pass), else None.
        """
        conn = self.conn
        try:
            if self._run_optimistic(batch):
                return 0
            self._run_isolated(batch)
            return None
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failure = StoreUnavailable(f"SQLite commit failed: {exc}")
            for job in batch:
                if job.error is None:
                    job.result = None
                    job.error = failure
            return None

    def _run_optimistic(self, batch: list[Job]) -> bool:
        """The whole batch in one transaction with no savepoints; commit if all jobs pass.

        Returns False (everything rolled back, no outcome set) when a job raised: the
        caller then replays the batch with `_run_isolated`. A savepoint per job costs two
        statements per write; failing writes are rare (a duplicate, a missing row), so the
        common batch pays nothing for the isolation it did not need. A failure of COMMIT
        itself raises (the whole batch fails, as it would with savepoints).
        """
        conn = self.conn
        new_peers = self.new_peers
        new_peers.clear()
        conn.execute("BEGIN IMMEDIATE")
        try:
            end = len(batch)
            i = 0
            while i < end:
                if batch[i].message is not None:
                    j = i + 1
                    while j < end and batch[j].message is not None:
                        j += 1
                    self._insert_messages(batch[i:j] if j - i < end else batch)
                    i = j
                else:
                    batch[i].result = batch[i].fn(conn)
                    i += 1
        except Exception:
            for done in batch:
                done.result = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
        conn.execute("COMMIT")
        if new_peers:
            known = self.known_peers
            if len(known) + 2 * len(new_peers) > KNOWN_PEERS_MAX:
                known.clear()  # bounded: forgetting only costs a no-op upsert later
            for a, b in new_peers:
                known.add((a, b))
                known.add((b, a))
        return True

    def _insert_messages(self, jobs: list[Job]) -> None:
        """The optimistic pass of consecutive `insert_message` jobs: one statement a table.

        No duplicate-check SELECT: a repeated (sender, clientMessageId) makes the messages
        INSERT raise (unique index idx_messages_client_id), and the batch is replayed job
        by job, where `_insert_message_alone` returns the original. The same holds for any
        other failing row: every job's outcome is then decided by the per-job replay.
        """
        conn = self.conn
        messages: list[tuple[Any, ...]] = []
        known = self.known_peers
        new_peers = self.new_peers
        peers: list[tuple[str, str, int]] = []
        offline: list[tuple[str, str, int, int]] = []
        events: list[tuple[Any, ...]] = []
        for job in jobs:
            message = job.message
            assert message is not None
            messages.append(R.message_params(message))
            sender, recipient = message.sender_id, message.recipient_id
            if recipient is not None and recipient != sender:
                pair = (sender, recipient)
                if pair not in known and pair not in new_peers:
                    new_peers.add(pair)
                    peers.append((sender, recipient, message.created_at))
                    peers.append((recipient, sender, message.created_at))
            if job.offline_for:
                expires_at = job.expires_at
                at = message.created_at
                offline += [(u, message.id, at, expires_at) for u in job.offline_for]
            if job.outbox:
                events += [R.outbox_params(e) for e in job.outbox]
            job.result = None  # created: the parent holds the record
        S._insert_rows(conn, S._MESSAGE_INSERT, messages)
        if peers:
            S._insert_rows(conn, S._PEERS_UPSERT, peers)
        if offline:
            S._insert_rows(conn, S._OFFLINE_INSERT, offline)
        if events:
            S._insert_rows(conn, S._OUTBOX_INSERT, events)

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run the batch with one SAVEPOINT per job: a failing job rolls back only itself."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        for job in batch:
            conn.execute("SAVEPOINT op")
            try:
                result = job.fn(conn)
                # a created message is answered with None (see the module docstring)
                job.result = None if _created(job, result) else result
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled back the whole transaction (I/O error, disk full):
                    # the earlier jobs of the batch are lost too
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                job.result = None
                job.error = S._map_error(exc)
            else:
                conn.execute("RELEASE op")
        conn.execute("COMMIT")


def _created(job: Job, result: Any) -> bool:
    return job.message is not None and isinstance(result, InsertResult) and result.created


class Requests:
    """Reads request frames from a file descriptor into jobs, batch by batch."""

    def __init__(self, fd: int, policy: BatchPolicy) -> None:
        self.fd = fd
        self.policy = policy
        self.decoder = FrameDecoder(marshal.loads)
        self.pending: list[Job] = []
        self.eof = False

    def _read(self, block: bool) -> None:
        if not block and not select.select([self.fd], [], [], 0)[0]:
            return
        data = os.read(self.fd, READ_CHUNK)
        if not data:
            self.eof = True
            return
        self.pending += [Job(op_id, fn, margs) for op_id, fn, margs in self.decoder.feed(data)]

    def _drain(self) -> None:
        """Read everything already in the pipe (no waiting)."""
        while not self.eof and select.select([self.fd], [], [], 0)[0]:
            self._read(block=True)

    def next_batch(self) -> list[Job]:
        """The next batch per the policy; empty only at EOF with nothing pending."""
        while not self.pending and not self.eof:
            self._read(block=True)
        self._drain()
        limit = self.policy.batch_max
        linger = self.policy.linger_seconds(min(len(self.pending), limit))
        if linger > 0 and not self.eof:
            time.sleep(linger)
            self._drain()
        batch, self.pending = self.pending[:limit], self.pending[limit:]
        self.policy.batch_done(len(batch))
        return batch


def _reply(out: int, results: object) -> bool:
    """Write one frame to the parent; False once the parent is gone."""
    data = encode_frame(results)
    try:
        while data:
            n = os.write(out, data)
            data = data[n:]
    except (BrokenPipeError, OSError):
        return False
    return True


def _outcomes(batch: list[Job]) -> list[tuple[int, BaseException | None, Any]]:
    """Each job's outcome, checked to survive the trip (pickled AND unpickled: an
    exception whose __init__ takes other arguments pickles fine and fails to load)."""
    out: list[tuple[int, BaseException | None, Any]] = []
    for job in batch:
        entry = (job.op_id, job.error, job.result)
        try:
            pickle.loads(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:  # an op returned or raised what cannot cross: a bug
            error = StoreError(f"write outcome not transferable: {exc!r}: {job.error!r}")
            entry = (job.op_id, error, None)
        out.append(entry)
    return out


def serve(path: str, batch_max: int, batch_wait_ms: float, fd_in: int = 0, fd_out: int = 1) -> int:
    """The writer's main loop (see the module docstring). Returns the exit code."""
    # Ctrl-C in a terminal signals the whole process group, and a service manager may
    # signal it too: the writer must not die mid-batch under the server, whose shutdown
    # still sends it writes. It ends on EOF, i.e. when the server closes or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # as the server does (cli.tune_gc): the batches' records die by refcount; a young
    # collection every 700 allocations would only rescan the batch in progress
    gc.set_threshold(20_000, 20, 20)
    gc.freeze()
    set_pipe_size(fd_in)
    try:
        conn = S._connect(path, read_only=False)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise sqlite3.OperationalError(f"refused WAL mode (got {mode!r})")
    except (sqlite3.Error, OSError) as exc:
        _reply(fd_out, ("error", f"cannot open SQLite database {path}: {exc}"))
        return 1
    try:
        checkpointer = Checkpointer(path, conn)
    except sqlite3.Error as exc:
        conn.close()
        _reply(fd_out, ("error", f"cannot open SQLite database {path}: {exc}"))
        return 1
    runner = BatchRunner(conn)
    requests = Requests(fd_in, BatchPolicy(batch_max, batch_wait_ms))
    parent_alive = _reply(fd_out, ("ready", None))
    try:
        while True:
            batch = requests.next_batch()
            if not batch:
                return 0
            started = time.perf_counter()
            failed = runner.run(batch)
            seconds = time.perf_counter() - started
            checkpointer.committed()
            if not parent_alive:
                continue
            reply: tuple[str, Any]
            if failed == 0 and all(j.result is None for j in batch):
                reply = ("done", (seconds, [j.op_id for j in batch]))
            else:
                reply = ("batch", (seconds, failed, _outcomes(batch)))
            parent_alive = _reply(fd_out, reply)
    finally:
        checkpointer.close()
        conn.close()


class Checkpointer:
    """WAL checkpoints in a thread of the writer process, off the commit path.

    Why: SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past
    1,000 pages, so that batch's writers wait for it copying every frame since the last
    one (py-spy at 7,000 msg/s: ~16 % of the writer's samples were checkpoints inside
    COMMIT). Here a second connection runs a PASSIVE checkpoint (it never blocks the
    writer nor waits for readers) at most every `INTERVAL_S` after commits; sqlite3
    releases the GIL while it works, so it overlaps the next batch, and a page changed by
    many commits in between is copied once.

    The writer connection keeps an automatic checkpoint every `RESTART_PAGES`: under
    sustained writes the thread's checkpoint seldom catches up with the latest commit,
    and only a checkpoint that did lets the next transaction restart the WAL from its
    start (measured by review: without it the WAL grew to whatever the threshold
    allowed). When it fires, the thread has copied nearly every frame already, so it is
    short; the WAL file stays within ~`RESTART_PAGES` pages. Durability is the COMMIT's
    (WAL, synchronous=FULL), as before.
    """

    INTERVAL_S = 0.1
    RESTART_PAGES = 4_096  # 16 MiB of WAL at 4 KiB pages

    def __init__(self, path: str, writer: sqlite3.Connection) -> None:
        self._conn = S._connect(path, read_only=False)
        writer.execute(f"PRAGMA wal_autocheckpoint = {self.RESTART_PAGES}")
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A batch committed: checkpoint soon."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # cleared before the check: a close() between the two is seen now, or its
            # set() survives for the next wait (cleared after the check, it was lost)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception as exc:  # the writer's automatic checkpoint still runs
                print(f"sqlite writer: background checkpoint failed: {exc!r}", file=sys.stderr)
            time.sleep(self.INTERVAL_S)

    def close(self) -> None:
        """Stop the thread (after its checkpoint in progress) and close its connection."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._conn.close()


# ---------------------------------------------------------------------- test hooks


def hold_for_test(
    insert_sql: str | None, started_path: str, release_path: str, c: sqlite3.Connection
) -> None:
    """A write op for the contract tests: hold the writer inside its open batch.

    Runs `insert_sql` (uncommitted until released), creates `started_path`, then waits
    (bounded: 30 s) until `release_path` exists. Files, because the test runs in the
    parent process.
    """
    if insert_sql:
        c.execute(insert_sql)
    with open(started_path, "w"):
        pass
    deadline = time.monotonic() + 30
    while not os.path.exists(release_path) and time.monotonic() < deadline:
        time.sleep(0.002)


def execute_for_test(sql: str, c: sqlite3.Connection) -> None:
    """A write op for the contract tests: one raw statement."""
    c.execute(sql)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m securecollab.store.sqlite_writer PATH BATCH_MAX BATCH_WAIT_MS")
        return 2
    # stdout is the reply pipe: keep a private copy for replies and point fd 1 at
    # stderr, so a stray print (ours or a library's) cannot corrupt the protocol
    replies = os.dup(1)
    os.dup2(2, 1)
    return serve(argv[0], int(argv[1]), float(argv[2]), fd_out=replies)


if __name__ == "__main__":
    # run the imported module's main: one copy of this module in the process, the one
    # the parent's pickles (hold_for_test, ...) refer to
    from securecollab.store.sqlite_writer import main as _main

    sys.exit(_main(sys.argv[1:]))
