"""SQLite adapter of the Store port: one file in WAL mode, one writer process, pooled readers.

Writes: every write method sends a write op to ONE writer process owned by the store
(`sqlite_writer`, started by `open_sqlite`, gone when the store closes or the server
dies). Each op is encoded when submitted (one small frame, `sqlite_writer.encode_request`);
the frames of one scheduler tick go in one pipe write (`os.writev`); the writer takes every op
sent (up to `batch_max`; see `groupcommit.BatchPolicy` for the `batch_wait_ms` linger),
runs them all in one `BEGIN IMMEDIATE` transaction, commits once (`synchronous=FULL`:
durable when COMMIT returns), then answers the whole batch in one frame, which wakes
every waiter here. The batch first runs without savepoints; if any op raises, the
transaction is rolled back and the batch replayed with one SAVEPOINT per op, so a failing
op (e.g. a unique violation -> `Conflict`) fails only itself.

Why a process: a writer thread had to win the GIL back from the event loop after every
statement, which made it the bottleneck of 1:1 messaging (see `sqlite_writer`). A write op
is therefore a `functools.partial` of a module-level function (connection last): it is
pickled to the writer (inside its request's marshal frame). If the writer process dies,
every unanswered and later write fails with StoreUnavailable, and `ping` (readiness)
fails: restart the server.

`insert_message`, the hot write, has a fast path in that optimistic pass: consecutive
message ops of a batch run as ONE multi-row INSERT per table (messages, direct_peers,
offline_queue, outbox; `_insert_rows`) instead of several statements per op, with no
duplicate-check SELECT: a repeated (sender, clientMessageId) fails the messages INSERT on
its unique index, which sends the batch to the per-op replay, where each op looks for its
original first (created=False) exactly as before. The `direct_peers` upsert is skipped for
a pair the writer saw committed (`BatchRunner.known_peers`): those rows are never deleted.

Reads: a small pool of separate read-only connections used from `trio.to_thread`; in WAL
mode they read the last committed snapshot and never wait for the writer.
Nothing here blocks the trio thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, TypeVar, cast

import trio

from securecollab.store import (
    AuditRecord,
    ChannelRecord,
    Conflict,
    DeviceKeyRecord,
    InsertResult,
    MemberRecord,
    MessageRecord,
    NotFound,
    OfflineEntry,
    OutboxRecord,
    Page,
    RefreshTokenRecord,
    StoreError,
    StoreStats,
    StoreUnavailable,
    UserRecord,
)
from securecollab.store import rows as R
from securecollab.store import sqlite_writer as W
from securecollab.store.groupcommit import BatchMetrics, BatchPolicy, WriteOp, finish_batch
from securecollab.store.schema import latest_version, pending

T = TypeVar("T")

ADAPTER = "sqlite"
#: How long a connection waits for another process's lock before failing (ms).
BUSY_TIMEOUT_MS = 5000

#: How long the writer process may take to open the database and say "ready" (s).
WRITER_START_TIMEOUT_S = 30.0
#: How long closing waits for the writer to commit what was sent and exit (s).
WRITER_STOP_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)


def _python_path() -> str:
    """PYTHONPATH for the writer: the directory of the `securecollab` package this
    process runs first, then the inherited entries (no empty one: that is the cwd)."""
    import securecollab

    root = os.path.dirname(os.path.dirname(os.path.abspath(securecollab.__file__)))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([root, *rest])


def path_from_url(url: str) -> str:
    """`sqlite:///rel/path.db` -> `rel/path.db`; `sqlite:////abs/path.db` -> `/abs/path.db`."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(
            f"bad SQLite url {url!r}: use sqlite:///relative/path.db or sqlite:////abs.db"
        )
    path = url[len(prefix) :]
    if "?" in path or path == ":memory:":
        raise ValueError(
            f"bad SQLite url {url!r}: a file path is required (no :memory:, no query string)"
        )
    return path


def _connect(path: str, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the writer issues BEGIN/COMMIT itself
    # and readers run each SELECT in its own snapshot. check_same_thread=False because
    # reader connections move between trio's worker threads (one thread at a time).
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
        cached_statements=256,
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _map_error(exc: BaseException) -> BaseException:
    """sqlite3 exceptions -> the store's exception family (others pass through)."""
    if isinstance(exc, sqlite3.IntegrityError):
        text = str(exc)
        if "UNIQUE" in text or "PRIMARY KEY" in text:
            return Conflict(text)
        if "FOREIGN KEY" in text:
            return NotFound(text)
        return StoreError(text)
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        return StoreUnavailable(f"SQLite: {exc}")
    return exc


def _split_statements(script: str) -> list[str]:
    """Split a SQL script into complete statements (sqlite3 knows where each one ends)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current)
            current = ""
    if current.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at end of migration: {current[:80]!r}")
    return statements


def _read_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _migrate_sync(path: str, now: int) -> int:
    """Apply pending migrations in one IMMEDIATE transaction (serializes rival migrators)."""
    conn = _connect(path, read_only=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            current = _read_version(conn)
            for migration in pending(ADAPTER, current):
                for statement in _split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, now),
                )
                current = migration.version
            conn.execute("COMMIT")
            return current
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


class SQLiteStore:
    """The SQLite Store. Create with `open_sqlite`; every method is trio-safe."""

    def __init__(
        self, url: str, path: str, *, batch_max: int, batch_wait_ms: float, read_pool: int
    ) -> None:
        if read_pool < 1:
            raise ValueError("read_pool must be >= 1")
        BatchPolicy(batch_max, batch_wait_ms)  # validates both before anything starts
        self.url = url
        self.path = path
        self.stats = StoreStats()
        self._batch_max = batch_max
        self._batch_wait_ms = batch_wait_ms
        self._metrics = BatchMetrics(ADAPTER)
        self._readers: list[sqlite3.Connection] = []
        self._read_slots = trio.Semaphore(read_pool)
        self._read_limiter = trio.CapacityLimiter(read_pool)
        self._read_pool = read_pool
        self._closing = False
        # the writer process (sqlite_writer) and its pipes: we write requests to
        # _to_writer and read replies from _from_writer, both non-blocking
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_writer = -1
        self._from_writer = -1
        self._writer_gone: str | None = None  # why writes fail from now on
        self._writer_done = trio.Event()  # set once the writer exited and was reaped
        self._inflight: dict[int, WriteOp[Any]] = {}  # sent or about to be, not answered
        self._next_op = 0
        # request frames of this scheduler tick, not sent yet (memoryview: a partial write)
        self._outgoing: list[bytes | memoryview] = []
        self._flusher: trio.lowlevel.Task | None = None  # parked, waiting for requests
        self._sending = False  # the flusher is writing frames (never interleave others)
        self._io_running = False  # the flusher and the receive loop are alive
        self._decoder = W.FrameDecoder()

    # ------------------------------------------------------------------ lifecycle (internal)

    def _open_sync(self) -> None:
        """Create the directory, switch the file to WAL, open the read pool."""
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        conn = _connect(self.path, read_only=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        finally:
            conn.close()
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"SQLite at {self.path} refused WAL mode (got {mode!r})")
        try:
            for _ in range(self._read_pool):
                self._readers.append(_connect(self.path, read_only=True))
        except BaseException:
            for reader in self._readers:
                reader.close()
            self._readers = []
            raise

    def _spawn_writer(self) -> None:
        """Start the writer process (blocking: run in a worker thread)."""
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # no cwd on sys.path: the child imports the parent's securecollab
                "-m",
                "securecollab.store.sqlite_writer",
                self.path,
                str(self._batch_max),
                repr(self._batch_wait_ms),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env={**os.environ, "PYTHONPATH": _python_path()},
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to_writer = self._proc.stdin.fileno()
        self._from_writer = self._proc.stdout.fileno()
        W.set_pipe_size(self._to_writer)
        os.set_blocking(self._to_writer, False)
        os.set_blocking(self._from_writer, False)

    async def _start_writer(self) -> None:
        """Spawn the writer and wait for its "ready" (or its reason for not starting).

        On failure, timeout or cancellation the writer is killed and reaped, and the
        store is marked unusable before the exception propagates.
        """
        await trio.to_thread.run_sync(self._spawn_writer)
        why = f"the SQLite writer process for {self.path} did not start"
        try:
            with trio.move_on_after(WRITER_START_TIMEOUT_S):
                answer = await self._first_answer()
                if answer is not None and answer[0] == "ready":
                    return
                if answer is not None:
                    why = str(answer[1])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._kill_writer(why)
            raise
        with trio.CancelScope(shield=True):
            await self._kill_writer(why)
        raise StoreUnavailable(why)

    async def _kill_writer(self, why: str) -> None:
        """Kill and reap the writer; fail every unanswered and later write with `why`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        await self._reap()
        self._writer_died(why)
        self._writer_done.set()

    async def _first_answer(self) -> tuple[str, Any] | None:
        """The writer's first frame ("ready" or "error"), or None if it exited first."""
        while True:
            await trio.lowlevel.wait_readable(self._from_writer)
            try:
                data = os.read(self._from_writer, W.READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                return None
            answers = self._decoder.feed(data)
            if answers:
                # a "batch" cannot come before "ready": nothing was sent yet
                return cast("tuple[str, Any]", answers[0])

    async def _run_writer_io(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The two tasks talking to the writer: send requests, receive batch outcomes.

        `_opened` runs this shielded and cancels it only after `_close`: a cancellation
        from outside (a second Ctrl-C, a timeout around the store) must not take the
        writer's pipes away while close still needs them.
        """
        self._io_running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_loop)
                task_status.started()
                await self._receive_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._io_running = False

    async def _receive_loop(self) -> None:
        """Complete ops as their batches' outcomes arrive; on EOF fail what is left."""
        fd = self._from_writer
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, W.READ_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    break
                for kind, detail in self._decoder.feed(data):
                    if kind == "done":
                        self._batch_committed(*detail)
                    elif kind == "batch":
                        self._batch_done(*detail)
        except Exception as exc:  # a broken protocol: this writer cannot be trusted
            log.error("SQLite writer process: %r; stopping it", exc)
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        code = await self._reap()
        self._writer_died(
            "the store is closed"
            if self._closing
            else f"the SQLite writer process exited (code {code}); restart the server"
        )
        self._writer_done.set()

    def _batch_committed(self, seconds: float, op_ids: list[int]) -> None:
        """A batch whose ops all succeeded with the result they already hold (None, or
        the `InsertResult` of a created message, set by `insert_message`)."""
        pop = self._inflight.pop
        # an id we never sent is a protocol bug: the KeyError stops this writer
        ops = [pop(op_id) for op_id in op_ids]
        self._metrics.observe(ops, seconds, failed=0)
        finish_batch(self.stats, ops, seconds)

    def _batch_done(
        self, seconds: float, failed: int | None, outcomes: list[tuple[int, Any, Any]]
    ) -> None:
        """A batch with a failed op or a result to deliver (each op's own outcome)."""
        ops: list[WriteOp[Any]] = []
        inflight = self._inflight
        for op_id, error, result in outcomes:
            op = inflight.pop(op_id, None)
            if op is None:  # pragma: no cover - an id we never sent: protocol bug
                log.error("SQLite writer answered unknown write %d", op_id)
                continue
            if error is not None:
                op.error = error
            elif result is not None:  # None: keep the result the op holds
                op.result = result
            ops.append(op)
        self._metrics.observe(ops, seconds, failed=failed)
        finish_batch(self.stats, ops, seconds)

    def _writer_died(self, why: str) -> None:
        """Fail every write not answered yet, and every write from now on."""
        if self._writer_gone is None:
            self._writer_gone = why
            if not self._closing:
                log.error("%s: %d writes failed", why, len(self._inflight))
        failure = StoreUnavailable(why)
        ops = list(self._inflight.values())
        self._inflight.clear()
        self._outgoing.clear()
        for op in ops:
            op.result = None
            op.error = failure
            op.complete()

    async def _flush_loop(self) -> None:
        """Send the request frames queued during one scheduler tick."""
        while True:
            if not self._outgoing:
                self._flusher = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_flusher)
            frames, self._outgoing = self._outgoing, []
            self._sending = True
            try:
                await self._send(frames)
            finally:
                self._sending = False

    def _abort_flusher(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._flusher = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _send(self, frames: list[bytes | memoryview]) -> None:
        """Write `frames` in order, `_IOV_MAX` per `os.writev` (no joined copy of them)."""
        fd = self._to_writer
        i = 0
        while i < len(frames):
            chunk = frames[i : i + _IOV_MAX]
            try:
                n = os.writev(fd, chunk)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:  # the writer is gone; the receive loop reports it
                log.error("SQLite writer process: %s", exc)
                await trio.sleep_forever()
            for frame in chunk:  # skip what was written; keep the rest of a partial frame
                if n < len(frame):
                    frames[i] = memoryview(frame)[n:]
                    break
                n -= len(frame)
                i += 1

    async def _reap(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        code = await trio.to_thread.run_sync(proc.wait)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return code

    async def _close(self) -> None:
        """Send what is queued, let the writer finish it, close every connection."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.stdin is not None and self._writer_gone is None:
            with trio.move_on_after(WRITER_STOP_TIMEOUT_S) as scope:
                # the flusher is the only task writing the pipe (two writers could
                # interleave frames): wait until it sent everything
                while self._io_running and (self._outgoing or self._sending):  # noqa: ASYNC110
                    await trio.sleep(0.001)
                if not self._io_running:  # pragma: no cover - _opened shields the I/O tasks
                    await self._kill_writer("the store is closed")
                else:
                    proc.stdin.close()  # EOF: the writer finishes, answers, exits
                    await self._writer_done.wait()
            if scope.cancelled_caught:
                log.error("SQLite writer still busy after %.0f s: killed", WRITER_STOP_TIMEOUT_S)
                proc.kill()
                with trio.move_on_after(5):
                    await self._writer_done.wait()
        # readers: wait until no read holds a connection, then close them all
        for _ in range(self._read_pool):
            await self._read_slots.acquire()
        for conn in self._readers:
            conn.close()
        self._readers = []

    def _queued(self) -> int:
        """Writes sent (or about to be) to the writer and not answered yet."""
        return len(self._inflight)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the writer; return its result once its batch committed.

        `fn` must pickle: a `functools.partial` of a module-level function.
        """
        try:
            pickled = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise StoreError(f"write op cannot be sent to the writer: {exc!r}") from exc
        op: WriteOp[T] = WriteOp(fn)
        self._queue(op, pickled, None)
        return await op.wait()

    def _queue(self, op: WriteOp[Any], fn: bytes | None, message_args: Any) -> None:
        """Encode the request (see `sqlite_writer`) and queue it for the flusher; the
        caller then awaits `op.wait()` (not in here: one coroutine less per write). A
        request that cannot be encoded or is too large fails alone, here."""
        if self._writer_gone is not None or self._closing:
            raise StoreUnavailable(self._writer_gone or "the store is closed")
        op_id = self._next_op = self._next_op + 1
        try:
            frame = W.encode_request((op_id, fn, message_args))
        except ValueError as exc:
            raise StoreError(f"write op cannot be sent to the writer: {exc!r}") from exc
        if len(frame) > W.FRAME_LIMIT:
            raise StoreError("write too large for one frame to the writer")
        self._inflight[op_id] = op
        self._outgoing.append(frame)
        flusher = self._flusher
        if flusher is not None:
            self._flusher = None
            trio.lowlevel.reschedule(flusher)

    # ------------------------------------------------------------------ readers

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on a pooled read connection in a worker thread."""
        if self._closing:
            raise StoreUnavailable("the store is closed")
        async with self._read_slots:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(
                    _run_read, fn, conn, limiter=self._read_limiter
                )
            finally:
                self._readers.append(conn)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await self._read(lambda c: c.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        # fetchall, not fetchone: a half-read cursor would keep its read snapshot open
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------ lifecycle

    async def migrate(self) -> int:
        """Apply pending migrations (idempotent); return the schema version now in force."""
        from securecollab.ids import now_ms

        try:
            return await trio.to_thread.run_sync(_migrate_sync, self.path, now_ms())
        except sqlite3.Error as exc:
            raise _map_error(exc) from exc

    async def schema_version(self) -> int:
        return await self._read(_read_version)

    async def ping(self) -> None:
        if self._writer_gone is not None:  # reads would work, writes would not
            raise StoreUnavailable(self._writer_gone)
        try:
            await self._fetchall("SELECT 1")
        except StoreError:
            raise
        except Exception as exc:  # pragma: no cover - _read maps sqlite errors already
            raise StoreUnavailable(str(exc)) from exc

    # ------------------------------------------------------------------ users

    async def create_user(self, user: UserRecord) -> None:
        await self._write(partial(_op_create_user, user))

    async def get_user(self, user_id: str) -> UserRecord | None:
        row = await self._fetchone(
            f"SELECT {R.USER_COLUMNS} FROM users WHERE user_key = ?", (R.user_key(user_id),)
        )
        return R.user_from_row(row) if row is not None else None

    async def existing_users(self, user_ids: Sequence[str]) -> set[str]:
        if not user_ids:
            return set()
        keys = R.dumps([R.user_key(u) for u in user_ids])
        rows = await self._fetchall(
            "SELECT user_id FROM users WHERE deleted_at IS NULL"
            " AND user_key IN (SELECT value FROM json_each(?))",
            (keys,),
        )
        return {row["user_id"] for row in rows}

    async def set_user_deleted(self, user_id: str, at: int) -> None:
        await self._write(partial(_op_set_user_deleted, user_id, at))

    # ------------------------------------------------------------------ refresh tokens

    async def add_refresh_token(self, token: RefreshTokenRecord) -> None:
        await self._write(partial(_op_insert_token, token))

    async def get_refresh_token(self, token_hash: str) -> RefreshTokenRecord | None:
        row = await self._fetchone(
            f"SELECT {R.TOKEN_COLUMNS} FROM refresh_tokens WHERE token_hash = ?", (token_hash,)
        )
        return R.token_from_row(row) if row is not None else None

    async def rotate_refresh_token(self, old_hash: str, new: RefreshTokenRecord, at: int) -> bool:
        return await self._write(partial(_op_rotate_token, old_hash, new, at))

    async def revoke_token_family(self, family_id: str, at: int) -> int:
        return await self._write(
            partial(
                _op_rowcount,
                "UPDATE refresh_tokens SET revoked_at = ?"
                " WHERE family_id = ? AND revoked_at IS NULL",
                (at, family_id),
            )
        )

    async def family_revoked(self, family_id: str) -> bool:
        row = await self._fetchone(
            "SELECT 1 FROM refresh_tokens WHERE family_id = ? AND revoked_at IS NOT NULL LIMIT 1",
            (family_id,),
        )
        return row is not None

    # ------------------------------------------------------------------ audit log

    async def append_audit(self, entry: AuditRecord) -> None:
        await self._write(
            partial(
                _op_rowcount,
                "INSERT INTO audit_log (actor, action, target, at, ip, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (entry.actor, entry.action, entry.target, entry.at, entry.ip, entry.detail),
            )
        )

    async def list_audit(
        self, *, actor: str | None = None, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        if actor is not None:
            where.append("actor = ?")
            params.append(actor)
        if action_prefix:
            # substr, not LIKE: SQLite's LIKE is case-insensitive and treats % and _ specially
            where.append("substr(action, 1, ?) = ?")
            params += [len(action_prefix), action_prefix]
        sql = f"SELECT {R.AUDIT_COLUMNS} FROM audit_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(max(0, limit))
        return [R.audit_from_row(r) for r in await self._fetchall(sql, params)]

    async def prune_audit(self, older_than: int) -> int:
        return await self._write(
            partial(_op_rowcount, "DELETE FROM audit_log WHERE at < ?", (older_than,))
        )

    # ------------------------------------------------------------------ device keys

    async def upsert_device_key(self, key: DeviceKeyRecord) -> tuple[DeviceKeyRecord, bool]:
        return await self._write(partial(_op_upsert_device_key, key))

    async def get_device_key(self, user_id: str, device_id: str) -> DeviceKeyRecord | None:
        row = await self._fetchone(
            f"SELECT {R.DEVICE_KEY_COLUMNS} FROM device_keys WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        )
        return R.device_key_from_row(row) if row is not None else None

    async def list_device_keys(self, user_id: str) -> list[DeviceKeyRecord]:
        rows = await self._fetchall(
            f"SELECT {R.DEVICE_KEY_COLUMNS} FROM device_keys WHERE user_id = ?"
            " ORDER BY registered_at, device_id",
            (user_id,),
        )
        return [R.device_key_from_row(r) for r in rows]

    async def delete_device_key(self, user_id: str, device_id: str) -> bool:
        deleted: int = await self._write(
            partial(
                _op_rowcount,
                "DELETE FROM device_keys WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
        )
        return deleted > 0

    async def touch_device_key(self, user_id: str, device_id: str, at: int) -> None:
        await self._write(
            partial(
                _op_rowcount,
                "UPDATE device_keys SET last_used_at = ? WHERE user_id = ? AND device_id = ?",
                (at, user_id, device_id),
            )
        )

    # ------------------------------------------------------------------ channels

    async def create_channel(self, channel: ChannelRecord) -> None:
        await self._write(partial(_op_create_channel, channel))

    async def get_channel(self, channel_id: str) -> ChannelRecord | None:
        row = await self._fetchone(
            f"SELECT {R.CHANNEL_COLUMNS} FROM channels WHERE id = ?", (channel_id,)
        )
        return R.channel_from_row(row) if row is not None else None

    async def list_user_channels(self, user_id: str) -> list[ChannelRecord]:
        rows = await self._fetchall(
            "SELECT c.id, c.name, c.description, c.owner_id, c.settings, c.created_at"
            " FROM channel_members m JOIN channels c ON c.id = m.channel_id"
            " WHERE m.user_id = ? ORDER BY c.created_at, c.id",
            (user_id,),
        )
        return [R.channel_from_row(r) for r in rows]

    async def add_channel_members(
        self, channel_id: str, user_ids: Sequence[str], role: str, at: int
    ) -> list[str]:
        wanted = list(dict.fromkeys(user_ids))  # keep order, drop repeats
        return await self._write(partial(_op_add_members, channel_id, wanted, role, at))

    async def remove_channel_member(self, channel_id: str, user_id: str) -> bool:
        removed: int = await self._write(
            partial(
                _op_rowcount,
                "DELETE FROM channel_members WHERE channel_id = ? AND user_id = ?",
                (channel_id, user_id),
            )
        )
        return removed > 0

    async def get_member(self, channel_id: str, user_id: str) -> MemberRecord | None:
        row = await self._fetchone(
            f"SELECT {R.MEMBER_COLUMNS} FROM channel_members WHERE channel_id = ? AND user_id = ?",
            (channel_id, user_id),
        )
        return R.member_from_row(row) if row is not None else None

    async def list_channel_members(self, channel_id: str) -> list[MemberRecord]:
        rows = await self._fetchall(
            f"SELECT {R.MEMBER_COLUMNS} FROM channel_members WHERE channel_id = ?"
            " ORDER BY joined_at, user_id",
            (channel_id,),
        )
        return [R.member_from_row(r) for r in rows]

    async def peers_of(self, user_id: str) -> set[str]:
        rows = await self._fetchall(
            "SELECT other.user_id AS peer FROM channel_members mine"
            " JOIN channel_members other ON other.channel_id = mine.channel_id"
            " WHERE mine.user_id = ? AND other.user_id <> ?"
            " UNION SELECT peer_id FROM direct_peers WHERE user_id = ?",
            (user_id, user_id, user_id),
        )
        return {row["peer"] for row in rows}

    # ------------------------------------------------------------------ messages

    async def insert_message(
        self,
        message: MessageRecord,
        *,
        offline_for: Sequence[str] = (),
        offline_expires_at: int = 0,
        outbox: Sequence[OutboxRecord] = (),
    ) -> InsertResult:
        op = await self.submit_message(
            message, offline_for=offline_for, offline_expires_at=offline_expires_at, outbox=outbox
        )
        return await op.wait()

    async def submit_message(
        self,
        message: MessageRecord,
        *,
        offline_for: Sequence[str] = (),
        offline_expires_at: int = 0,
        outbox: Sequence[OutboxRecord] = (),
    ) -> WriteOp[InsertResult]:
        # no await in here: queued as a whole or refused, never cancelled half-way
        R.check_message(message)
        # the result of a created message, set now: the writer answers it with None
        op = WriteOp(_runs_in_the_writer, InsertResult(message, created=True))
        request = (
            R.message_fields(message),
            tuple(offline_for),
            offline_expires_at,
            [R.outbox_params(e) for e in outbox],
        )
        self._queue(op, None, request)
        return op

    async def get_message(self, message_id: str) -> MessageRecord | None:
        row = await self._fetchone(
            f"SELECT {R.MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        )
        return R.message_from_row(row) if row is not None else None

    async def list_direct_messages(
        self, user_a: str, user_b: str, page: Page
    ) -> list[MessageRecord]:
        filters, fparams = _page_filters(page)
        limit, offset = max(0, page.limit), max(0, page.offset)
        branch = (
            f"SELECT * FROM (SELECT {R.MESSAGE_COLUMNS} FROM messages"
            f" WHERE sender_id = ? AND recipient_id = ?{filters} ORDER BY id DESC LIMIT ?)"
        )
        # One index range scan per direction, each already cut to offset+limit rows, then
        # merged: the cost follows the page, not the length of the conversation.
        if user_a == user_b:
            sql = branch + " ORDER BY id DESC LIMIT ? OFFSET ?"
            params = [user_a, user_a, *fparams, offset + limit, limit, offset]
        else:
            sql = branch + " UNION ALL " + branch + " ORDER BY id DESC LIMIT ? OFFSET ?"
            params = [
                *(user_a, user_b, *fparams, offset + limit),
                *(user_b, user_a, *fparams, offset + limit),
                limit,
                offset,
            ]
        return [R.message_from_row(r) for r in await self._fetchall(sql, params)]

    async def list_channel_messages(self, channel_id: str, page: Page) -> list[MessageRecord]:
        filters, fparams = _page_filters(page)
        rows = await self._fetchall(
            f"SELECT {R.MESSAGE_COLUMNS} FROM messages WHERE channel_id = ?{filters}"
            " ORDER BY id DESC LIMIT ? OFFSET ?",
            [channel_id, *fparams, max(0, page.limit), max(0, page.offset)],
        )
        return [R.message_from_row(r) for r in rows]

    # ------------------------------------------------------------------ offline queue

    async def list_offline(self, user_id: str, *, now: int, limit: int = 500) -> list[OfflineEntry]:
        rows = await self._fetchall(
            "SELECT q.user_id AS q_user_id, q.queued_at AS q_queued_at,"
            " q.expires_at AS q_expires_at,"
            " m.id, m.sender_id, m.recipient_id, m.channel_id, m.encrypted_content, m.iv,"
            " m.keys, m.created_at, m.client_message_id"
            " FROM offline_queue q JOIN messages m ON m.id = q.message_id"
            " WHERE q.user_id = ? AND q.expires_at > ?"
            " ORDER BY q.queued_at, q.message_id LIMIT ?",
            (user_id, now, max(0, limit)),
        )
        return [R.offline_from_row(r) for r in rows]

    async def ack_offline(self, user_id: str, message_ids: Sequence[str]) -> int:
        if not message_ids:
            return 0
        ids = R.dumps(list(message_ids))
        return await self._write(
            partial(
                _op_rowcount,
                "DELETE FROM offline_queue WHERE user_id = ?"
                " AND message_id IN (SELECT value FROM json_each(?))",
                (user_id, ids),
            )
        )

    async def prune_offline(self, now: int) -> int:
        return await self._write(
            partial(_op_rowcount, "DELETE FROM offline_queue WHERE expires_at <= ?", (now,))
        )

    async def enqueue_offline(
        self, user_id: str, message_ids: Sequence[str], expires_at: int
    ) -> int:
        if not message_ids:
            return 0
        ids = R.dumps(list(dict.fromkeys(message_ids)))
        return await self._write(
            partial(
                _op_rowcount,
                "INSERT INTO offline_queue (user_id, message_id, queued_at, expires_at)"
                " SELECT ?, m.id, m.created_at, ? FROM messages m"
                " WHERE m.id IN (SELECT value FROM json_each(?)) AND m.sender_id <> ?"
                " ON CONFLICT (user_id, message_id) DO NOTHING",
                (user_id, expires_at, ids, user_id),
            )
        )

    # ------------------------------------------------------------------ outbox

    async def add_outbox(self, events: Sequence[OutboxRecord]) -> None:
        if not events:
            return
        params = [R.outbox_params(e) for e in events]
        await self._write(partial(_op_executemany, _OUTBOX_INSERT, params))

    async def fetch_outbox(self, limit: int = 500) -> list[OutboxRecord]:
        rows = await self._fetchall(
            f"SELECT {R.OUTBOX_COLUMNS} FROM outbox WHERE sent_at IS NULL"
            " ORDER BY created_at, id LIMIT ?",
            (max(0, limit),),
        )
        return [R.outbox_from_row(r) for r in rows]

    async def mark_outbox_sent(self, ids: Sequence[str], at: int) -> None:
        if not ids:
            return
        id_list = R.dumps(list(ids))
        await self._write(
            partial(
                _op_rowcount,
                "UPDATE outbox SET sent_at = ? WHERE sent_at IS NULL"
                " AND id IN (SELECT value FROM json_each(?))",
                (at, id_list),
            )
        )

    async def prune_outbox(self, sent_before: int) -> int:
        return await self._write(
            partial(
                _op_rowcount,
                "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ?",
                (sent_before,),
            )
        )


# ---------------------------------------------------------------------- helpers


def _run_read(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    try:
        return fn(conn)
    except sqlite3.Error as exc:
        raise _map_error(exc) from exc


# Write ops: module-level functions, the connection last, bound with functools.partial.
# A partial of a module-level function pickles by reference, which is how a write reaches
# the writer process (`sqlite_writer`); a closure or lambda would not.


def _op_rowcount(sql: str, params: Sequence[Any], c: sqlite3.Connection) -> int:
    """One statement; the number of rows it changed."""
    return c.execute(sql, params).rowcount


def _op_executemany(sql: str, rows: Sequence[Sequence[Any]], c: sqlite3.Connection) -> None:
    c.executemany(sql, rows)


def _op_create_user(user: UserRecord, c: sqlite3.Connection) -> None:
    c.execute(
        "INSERT INTO users (user_key, user_id, password_hash, display_name, roles,"
        " created_at, deleted_at, deletion_scheduled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        R.user_params(user),
    )


def _op_set_user_deleted(user_id: str, at: int, c: sqlite3.Connection) -> None:
    cur = c.execute("UPDATE users SET deleted_at = ? WHERE user_key = ?", (at, R.user_key(user_id)))
    if cur.rowcount == 0:
        raise NotFound(f"no user {user_id!r}")


def _op_insert_token(t: RefreshTokenRecord, c: sqlite3.Connection) -> None:
    c.execute(
        f"INSERT INTO refresh_tokens ({R.TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            t.token_hash,
            t.user_id,
            t.family_id,
            t.issued_at,
            t.expires_at,
            t.used_at,
            t.revoked_at,
            t.device_id,
        ),
    )


def _op_rotate_token(
    old_hash: str, new: RefreshTokenRecord, at: int, c: sqlite3.Connection
) -> bool:
    cur = c.execute(
        "UPDATE refresh_tokens SET used_at = ?"
        " WHERE token_hash = ? AND used_at IS NULL AND revoked_at IS NULL",
        (at, old_hash),
    )
    if cur.rowcount == 0:
        return False
    _op_insert_token(new, c)
    return True


def _op_upsert_device_key(
    key: DeviceKeyRecord, c: sqlite3.Connection
) -> tuple[DeviceKeyRecord, bool]:
    params = R.device_key_params(key)
    cur = c.execute(
        "UPDATE device_keys SET bundle_id = ?, public_key = ?, registered_at = ?,"
        " last_used_at = ? WHERE user_id = ? AND device_id = ?",
        params,
    )
    if cur.rowcount:
        return key, True
    c.execute(
        "INSERT INTO device_keys (bundle_id, public_key, registered_at, last_used_at,"
        " user_id, device_id) VALUES (?, ?, ?, ?, ?, ?)",
        params,
    )
    return key, False


def _op_create_channel(channel: ChannelRecord, c: sqlite3.Connection) -> None:
    c.execute(
        f"INSERT INTO channels ({R.CHANNEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        R.channel_params(channel),
    )
    c.execute(
        "INSERT INTO channel_members (channel_id, user_id, role, joined_at)"
        " VALUES (?, ?, 'owner', ?)",
        (channel.id, channel.owner_id, channel.created_at),
    )


def _op_add_members(
    channel_id: str, user_ids: Sequence[str], role: str, at: int, c: sqlite3.Connection
) -> list[str]:
    added: list[str] = []
    for user_id in user_ids:
        cur = c.execute(
            "INSERT INTO channel_members (channel_id, user_id, role, joined_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (channel_id, user_id) DO NOTHING",
            (channel_id, user_id, role, at),
        )
        if cur.rowcount:
            added.append(user_id)
    return added


#: Frames per `os.writev` (Linux's IOV_MAX).
_IOV_MAX = 1024

_OUTBOX_INSERT = f"INSERT INTO outbox ({R.OUTBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_MESSAGE_INSERT = f"INSERT INTO messages ({R.MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_MESSAGE_BY_CLIENT_ID = (
    f"SELECT {R.MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND client_message_id = ?"
)
_PEERS_UPSERT = (
    "INSERT INTO direct_peers (user_id, peer_id, since) VALUES (?, ?, ?)"
    " ON CONFLICT (user_id, peer_id) DO NOTHING"
)
_OFFLINE_INSERT = (
    "INSERT INTO offline_queue (user_id, message_id, queued_at, expires_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, message_id) DO NOTHING"
)


def _runs_in_the_writer(c: sqlite3.Connection) -> InsertResult:  # pragma: no cover
    raise AssertionError("insert_message runs in the writer process (sqlite_writer.Job)")


def _insert_message_alone(
    message: MessageRecord,
    offline_for: Sequence[str],
    expires_at: int,
    outbox: Sequence[OutboxRecord],
    c: sqlite3.Connection,
) -> InsertResult:
    """One insert_message by itself: return the original of a repeated clientMessageId, or
    insert the message, its direct_peers pair, offline-queue entries and outbox rows."""
    if message.client_message_id is not None:
        row = c.execute(
            _MESSAGE_BY_CLIENT_ID, (message.sender_id, message.client_message_id)
        ).fetchone()
        if row is not None:
            return InsertResult(R.message_from_row(row), created=False)
    c.execute(_MESSAGE_INSERT, R.message_params(message))
    sender, recipient, at = message.sender_id, message.recipient_id, message.created_at
    if recipient is not None and recipient != sender:
        c.executemany(_PEERS_UPSERT, [(sender, recipient, at), (recipient, sender, at)])
    if offline_for:
        c.executemany(_OFFLINE_INSERT, [(u, message.id, at, expires_at) for u in offline_for])
    if outbox:
        c.executemany(_OUTBOX_INSERT, [R.outbox_params(e) for e in outbox])
    return InsertResult(message, created=True)


_MULTI_SQL: dict[tuple[str, int], str] = {}
#: Row counts of the multi-row INSERTs: a batch's rows for one table are padded up to the
#: next size (padding rows are all NULL and filtered out), so one table costs one
#: statement per batch and the statement cache holds at most 4 texts per table.
_SIZES = (4, 16, 64, 256)


def _multi_sql(sql: str, n: int) -> str:
    """`sql` (`INSERT INTO t (cols) VALUES (?, ...) [tail]`) as an n-row INSERT ... SELECT.

    The rows come from a VALUES list filtered on its first column, so all-NULL padding
    rows insert nothing (every table's first column is NOT NULL).
    """
    key = (sql, n)
    text = _MULTI_SQL.get(key)
    if text is None:
        head, rest = sql.split(" VALUES ", 1)
        close = rest.index(")") + 1
        row, tail = rest[:close], rest[close:]
        text = _MULTI_SQL[key] = (
            f"{head} SELECT * FROM (VALUES {', '.join([row] * n)}) WHERE column1 IS NOT NULL{tail}"
        )
    return text


def _insert_rows(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` with as few statements as possible (one per 256 rows).

    Why: `executemany` steps (and releases and re-takes the GIL) once per row; one
    statement for the batch costs less in the writer (measured while the writer was
    still a thread: 2,500 -> 3,000 msg/s sustained in workload 1).
    """
    top = _SIZES[-1]
    for i in range(0, len(rows), top):
        chunk = rows[i : i + top]
        if len(chunk) == 1:
            conn.execute(sql, chunk[0])
            continue
        size = next(s for s in _SIZES if s >= len(chunk))
        params = [v for r in chunk for v in r]
        params += [None] * (len(chunk[0]) * (size - len(chunk)))
        conn.execute(_multi_sql(sql, size), params)


def _page_filters(page: Page) -> tuple[str, list[Any]]:
    sql = ""
    params: list[Any] = []
    if page.from_date is not None:
        sql += " AND created_at >= ?"
        params.append(page.from_date)
    if page.to_date is not None:
        sql += " AND created_at <= ?"
        params.append(page.to_date)
    if page.before_id is not None:
        sql += " AND id < ?"
        params.append(page.before_id)
    return sql, params


def open_sqlite(
    url: str, *, batch_max: int = 256, batch_wait_ms: float = 1.0, read_pool: int = 4
) -> AbstractAsyncContextManager[SQLiteStore]:
    """Open the SQLite store at `url` (parent directories are created).

    Starts the writer process; on exit, lets it commit every write already sent, waits
    for it to exit, and closes every connection.
    Migrations are not applied here: call `await store.migrate()` (the app does at startup).
    A malformed url raises ValueError at once, before anything is opened.
    """
    store = SQLiteStore(
        url,
        path_from_url(url),
        batch_max=batch_max,
        batch_wait_ms=batch_wait_ms,
        read_pool=read_pool,
    )
    return _opened(store)


@asynccontextmanager
async def _opened(store: SQLiteStore) -> AsyncIterator[SQLiteStore]:
    try:
        await trio.to_thread.run_sync(store._open_sync)
    except (sqlite3.Error, OSError) as exc:
        raise StoreUnavailable(f"cannot open SQLite database {store.path}: {exc}") from exc
    try:
        await store._start_writer()  # kills and reaps the writer itself on failure
    except BaseException:
        with trio.CancelScope(shield=True):
            await store._close()
        raise
    io_scope = trio.CancelScope(shield=True)  # cancelled by us only, after _close

    async def run_io(*, task_status: trio.TaskStatus[None]) -> None:
        with io_scope:
            await store._run_writer_io(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_io)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                await store._close()
            io_scope.cancel()


__all__ = ["SQLiteStore", "latest_version", "open_sqlite", "path_from_url"]
