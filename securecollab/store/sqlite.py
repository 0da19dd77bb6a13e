"""SQLite adapter of the Store port: one file in WAL mode, one writer thread, pooled readers.

Writes: every write method queues a `WriteOp` to ONE writer thread owned by the store. The
thread takes every pending op (up to `batch_max`; see `groupcommit.BatchPolicy` for the
`batch_wait_ms` linger), runs them all in one `BEGIN IMMEDIATE` transaction, commits once
(`synchronous=FULL`: durable when COMMIT returns), then hands the whole batch back to the
trio thread in one `run_sync_soon`, which wakes every waiter. The batch first runs without
savepoints; if any op raises, the transaction is rolled back and the batch replayed with one
SAVEPOINT per op, so a failing op (e.g. a unique violation -> `Conflict`) fails only itself.

`insert_message`, the hot write, has a fast path in that optimistic pass: consecutive
message ops of a batch run as ONE executemany per table (messages, direct_peers,
offline_queue, outbox) instead of several statements per op, with no duplicate-check
SELECT: a repeated (sender, clientMessageId) fails the messages INSERT on its unique index,
which sends the batch to the per-op replay, where each op looks for its original first
(created=False) exactly as before. The `direct_peers` upsert is skipped for a pair the
writer saw committed (`_known_peers`): those rows are never deleted.

Reads: a small pool of separate read-only connections used from `trio.to_thread`; in WAL
mode they read the last committed snapshot and never wait for the writer.
Nothing here blocks the trio thread.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
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
from securecollab.store.groupcommit import (
    BatchMetrics,
    BatchPolicy,
    WriteOp,
    finish_batch,
    monotonic,
)
from securecollab.store.schema import latest_version, pending

T = TypeVar("T")

ADAPTER = "sqlite"
#: How long a connection waits for another process's lock before failing (ms).
BUSY_TIMEOUT_MS = 5000

_STOP = object()  # sentinel: the writer drains what was queued before it, then exits


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
        self.url = url
        self.path = path
        self.stats = StoreStats()
        self._policy = BatchPolicy(batch_max, batch_wait_ms)
        self._metrics = BatchMetrics(ADAPTER)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer_conn: sqlite3.Connection | None = None
        self._writer_thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._readers: list[sqlite3.Connection] = []
        self._read_slots = trio.Semaphore(read_pool)
        self._read_limiter = trio.CapacityLimiter(read_pool)
        self._read_pool = read_pool
        self._closing = False
        # Writer thread only. (user, peer) pairs whose two direct_peers rows are known to
        # be committed (nothing deletes those rows), and the pairs the open batch adds.
        self._known_peers: set[tuple[str, str]] = set()
        self._new_peers: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ lifecycle (internal)

    def _open_sync(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        conn = _connect(self.path, read_only=False)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreUnavailable(f"SQLite at {self.path} refused WAL mode (got {mode!r})")
        self._writer_conn = conn
        try:
            for _ in range(self._read_pool):
                self._readers.append(_connect(self.path, read_only=True))
        except BaseException:
            for reader in self._readers:
                reader.close()
            conn.close()
            raise

    def _start_writer(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._writer_thread = threading.Thread(
            target=self._writer_main, name=f"sqlite-writer:{self.path}", daemon=True
        )
        self._writer_thread.start()

    async def _close(self) -> None:
        """Drain queued writes, stop the writer thread, close every connection."""
        self._closing = True
        if self._writer_thread is not None:
            self._queue.put(_STOP)
            await trio.to_thread.run_sync(self._writer_thread.join)
        # readers: wait until no read holds a connection, then close them all
        for _ in range(self._read_pool):
            await self._read_slots.acquire()
        for conn in self._readers:
            conn.close()
        self._readers = []

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self) -> None:
        conn = self._writer_conn
        assert conn is not None
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is _STOP:
                    break
                batch: list[WriteOp[Any]] = [item]
                stop = self._collect(batch)
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _collect(self, batch: list[WriteOp[Any]]) -> bool:
        """Add pending ops to `batch` per the policy; return True if the stop sentinel came.

        The linger is one sleep followed by a second drain, not a wait on the queue: a
        writer blocked in `get` is woken (a futex wake, then a GIL hand-over) by every op
        queued, where a sleeping one lets the stragglers queue for free.
        """
        limit = self._policy.batch_max
        if self._drain(batch, limit):
            return True
        linger = self._policy.linger_seconds(len(batch))
        if linger > 0:
            time.sleep(linger)
            return self._drain(batch, limit)
        return False

    def _drain(self, batch: list[WriteOp[Any]], limit: int) -> bool:
        """Move queued ops into `batch` (up to `limit`); True if the stop sentinel came."""
        get = self._queue.get_nowait
        while len(batch) < limit:
            try:
                item = get()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _run_batch(self, conn: sqlite3.Connection, batch: list[WriteOp[Any]]) -> None:
        started = monotonic()
        failed: int | None = 0
        try:
            if not self._run_optimistic(conn, batch):
                failed = None  # some op failed: count them
                self._run_isolated(conn, batch)
        except Exception as exc:
            failed = None
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failure = StoreUnavailable(f"SQLite commit failed: {exc}")
            for op in batch:
                if op.error is None:
                    op.result = None
                    op.error = failure
        seconds = monotonic() - started
        self._policy.batch_done(len(batch))
        self._metrics.observe(batch, seconds, failed=failed)
        assert self._token is not None
        try:
            self._token.run_sync_soon(finish_batch, self.stats, batch, seconds)
        except trio.RunFinishedError:  # the trio run is gone: nobody is waiting any more
            pass

    def _run_optimistic(self, conn: sqlite3.Connection, batch: list[WriteOp[Any]]) -> bool:
        """Run the whole batch in one transaction with no savepoints; commit if all ops pass.

        Returns False (everything rolled back, no op's outcome set) when an op raised: the
        caller then replays the batch with `_run_isolated`. A savepoint per op costs two
        statements per write; failing writes are rare (a duplicate, a missing row), so the
        common batch pays nothing for the isolation it did not need. A failure of COMMIT
        itself raises (the whole batch fails, as it would with savepoints).
        """
        new_peers = self._new_peers
        new_peers.clear()
        conn.execute("BEGIN IMMEDIATE")
        try:
            end = len(batch)
            i = 0
            while i < end:
                op = batch[i]
                if type(op) is _MessageWrite:
                    j = i + 1
                    while j < end and type(batch[j]) is _MessageWrite:
                        j += 1
                    run = batch[i:j] if j - i < end else batch
                    self._insert_messages(conn, cast("list[_MessageWrite]", run))
                    i = j
                else:
                    op.result = op.fn(conn)
                    i += 1
        except Exception:
            for done in batch:
                done.result = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
        conn.execute("COMMIT")
        if new_peers:
            known = self._known_peers
            if len(known) + 2 * len(new_peers) > KNOWN_PEERS_MAX:
                known.clear()  # bounded: forgetting only costs a no-op upsert later
            for a, b in new_peers:
                known.add((a, b))
                known.add((b, a))
        return True

    def _insert_messages(self, conn: sqlite3.Connection, ops: list[_MessageWrite]) -> None:
        """The optimistic pass of consecutive `insert_message` ops: one executemany a table.

        No duplicate-check SELECT: a repeated (sender, clientMessageId) makes the messages
        INSERT raise (unique index idx_messages_client_id), and the batch is replayed op by
        op, where `_insert_message_alone` returns the original. The same holds for any
        other failing row: every op's outcome is then decided by the per-op replay.
        """
        _insert_rows(conn, _MESSAGE_INSERT, [R.message_params(op.message) for op in ops])
        known = self._known_peers
        new_peers = self._new_peers
        peers: list[tuple[str, str, int]] = []
        offline: list[tuple[str, str, int, int]] = []
        events: list[tuple[Any, ...]] = []
        for op in ops:
            message = op.message
            sender, recipient = message.sender_id, message.recipient_id
            if recipient is not None and recipient != sender:
                pair = (sender, recipient)
                if pair not in known and pair not in new_peers:
                    new_peers.add(pair)
                    peers.append((sender, recipient, message.created_at))
                    peers.append((recipient, sender, message.created_at))
            if op.offline_for:
                expires_at = op.expires_at
                offline += [(u, message.id, message.created_at, expires_at) for u in op.offline_for]
            if op.outbox:
                events += [_outbox_params(e) for e in op.outbox]
            op.result = InsertResult(message, created=True)
        if peers:
            _insert_rows(conn, _PEERS_UPSERT, peers)
        if offline:
            _insert_rows(conn, _OFFLINE_INSERT, offline)
        if events:
            _insert_rows(conn, _OUTBOX_INSERT, events)

    def _run_isolated(self, conn: sqlite3.Connection, batch: list[WriteOp[Any]]) -> None:
        """Run the batch with one SAVEPOINT per op: a failing op rolls back only itself."""
        conn.execute("BEGIN IMMEDIATE")
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                op.result = op.fn(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled back the whole transaction (I/O error, disk full):
                    # the earlier ops of the batch are lost too
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                op.result = None
                op.error = _map_error(exc)
            else:
                conn.execute("RELEASE op")
        conn.execute("COMMIT")

    def _queued(self) -> int:
        """Writes waiting for the writer thread (not counting the batch in progress)."""
        return self._queue.qsize()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Queue `fn` for the writer thread; return its result once its batch committed."""
        return await self._submit(WriteOp(fn))

    async def _submit(self, op: WriteOp[T]) -> T:
        if self._closing or self._writer_thread is None:
            raise StoreUnavailable("the store is closed")
        self._queue.put(op)
        return await op.wait()

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
        R.check_message(message)
        return await self._submit(_MessageWrite(message, offline_for, offline_expires_at, outbox))

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
        params = [_outbox_params(e) for e in events]
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
        (
            R.user_key(user.user_id),
            user.user_id,
            user.password_hash,
            user.display_name,
            R.dumps(list(user.roles)),
            user.created_at,
            user.deleted_at,
            user.deletion_scheduled_at,
        ),
    )


def _op_set_user_deleted(user_id: str, at: int, c: sqlite3.Connection) -> None:
    cur = c.execute("UPDATE users SET deleted_at = ? WHERE user_key = ?", (at, R.user_key(user_id)))
    if cur.rowcount == 0:
        raise NotFound(f"no user {user_id!r}")


def _op_insert_token(t: RefreshTokenRecord, c: sqlite3.Connection) -> None:
    _insert_token(c, t)


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
    _insert_token(c, new)
    return True


def _op_upsert_device_key(
    key: DeviceKeyRecord, c: sqlite3.Connection
) -> tuple[DeviceKeyRecord, bool]:
    params = (
        key.bundle_id,
        key.public_key,
        key.registered_at,
        key.last_used_at,
        key.user_id,
        key.device_id,
    )
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
        (
            channel.id,
            channel.name,
            channel.description,
            channel.owner_id,
            R.dumps(channel.settings),
            channel.created_at,
        ),
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


def _insert_token(c: sqlite3.Connection, t: RefreshTokenRecord) -> None:
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

#: Bound on the writer's set of known direct_peers pairs (each pair counts twice).
KNOWN_PEERS_MAX = 100_000


class _MessageWrite(WriteOp[InsertResult]):
    """A queued `insert_message`: what the caller passed, as it passed it.

    The rows' parameters are made by the writer thread, not here: the trio thread runs the
    event loop, while the writer's Python mostly overlaps the loop's system calls. `fn`
    is the op on its own (`_insert_message_alone`: the per-op replay); the optimistic pass
    runs consecutive message ops together (`SQLiteStore._insert_messages`).
    """

    __slots__ = ("expires_at", "message", "offline_for", "outbox")

    def __init__(
        self,
        message: MessageRecord,
        offline_for: Sequence[str],
        offline_expires_at: int,
        outbox: Sequence[OutboxRecord],
    ) -> None:
        # tuples: a caller whose wait is cancelled cannot change them under the writer
        offline_for, outbox = tuple(offline_for), tuple(outbox)
        # a partial of a plain function, not a bound method: no op -> fn -> op cycle, so
        # an op is freed by its refcount when its waiter is done with it
        super().__init__(
            partial(_insert_message_alone, message, offline_for, offline_expires_at, outbox)
        )
        self.message = message
        self.offline_for = offline_for
        self.expires_at = offline_expires_at
        self.outbox = outbox


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
        c.executemany(_OUTBOX_INSERT, [_outbox_params(e) for e in outbox])
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

    Why: the sqlite3 module releases the GIL for every statement it steps, and winning
    it back from a busy event-loop thread is the writer's main cost (py-spy: 30-40 % of
    its wall time waiting for the GIL); `executemany` steps once per row.
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


def _outbox_params(e: OutboxRecord) -> tuple[Any, ...]:
    return (e.id, e.topic, e.key, bytes(e.payload), e.created_at, e.sent_at)


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

    Starts the writer thread; on exit, drains queued writes and closes every connection.
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
    store._start_writer()
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store._close()


__all__ = ["SQLiteStore", "latest_version", "open_sqlite", "path_from_url"]
