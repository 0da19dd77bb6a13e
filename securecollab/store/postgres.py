"""PostgreSQL adapter of the Store port: asyncpg under trio-asyncio, one writer task, a read pool.

asyncpg is asyncio-only, so the store opens its own trio-asyncio loop for its whole life
and runs every asyncpg coroutine on it through `loop.run_aio_coroutine` (the loop is held
explicitly, so any trio task may call the store, not only tasks started inside the loop).

Writes: every write method sends a `WriteOp` (an asyncio coroutine function taking the
connection) into a bounded memory channel read by ONE writer task that owns ONE connection.
The writer takes every pending op (up to `batch_max`; `groupcommit.BatchPolicy` decides on
the `batch_wait_ms` linger) and crosses into asyncio once per batch: one transaction, one
COMMIT, then every waiter is woken. The batch runs without savepoints first; if an op
raises, it is rolled back and replayed with a SAVEPOINT per op, so a failing op (unique
violation -> `Conflict`) fails alone. Crossing the trio/asyncio bridge once per batch
instead of once per statement matters: many small concurrent calls through the bridge are
slow (see DEPENDENCIES.md).

Reads: an asyncpg pool (`read_pool` connections); reads never queue behind the writer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import asyncpg  # type: ignore[import-untyped]
import trio
import trio_asyncio  # type: ignore[import-untyped]

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
from securecollab.store.schema import pending

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection"
Op = Callable[[Conn], Awaitable[T]]

ADAPTER = "postgres"
#: Arbitrary constant naming the advisory lock that serializes rival migrators.
MIGRATION_LOCK_ID = 0x5EC0_C011
CONNECT_TIMEOUT_S = 10.0
#: How long closing waits for queued writes to commit before giving up on them (s).
DRAIN_TIMEOUT_S = 15.0

_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # a connection whose backend was terminated mid-operation can fail with a protocol
    # state error ("cannot switch to state 12; another operation (2) is in progress")
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
)


def _map_error(exc: BaseException) -> BaseException:
    """asyncpg exceptions -> the store's exception family (others pass through)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(str(exc))
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound(str(exc))
    if isinstance(exc, _CONNECTION_ERRORS):
        return StoreUnavailable(f"PostgreSQL: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL: {exc}")
    return exc


def _log_asyncio_error(loop: Any, context: dict[str, Any]) -> None:
    """Log stray asyncio errors instead of letting trio-asyncio raise them into the loop.

    trio-asyncio's default handler re-raises any unhandled asyncio error inside the loop's
    nursery, which would tear down the whole store. asyncpg leaves such errors behind when
    a caller is cancelled mid-connect ("Future exception was never retrieved"): harmless
    noise, since the pool discards that connection and opens another.
    """
    exc = context.get("exception")
    log.warning(
        "asyncio error in the PostgreSQL store: %s%s",
        context.get("message", "unhandled"),
        f" ({exc!r})" if exc is not None else "",
    )


def _count(status: str) -> int:
    """Rows affected, from a command status like "UPDATE 3" or "INSERT 0 1"."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


class PostgresStore:
    """The PostgreSQL Store. Create with `open_postgres`; every method is trio-safe."""

    def __init__(
        self,
        url: str,
        loop: trio_asyncio.TrioEventLoop,
        *,
        batch_max: int,
        batch_wait_ms: float,
        read_pool: int,
    ) -> None:
        if read_pool < 1:
            raise ValueError("read_pool must be >= 1")
        self.url = url
        self.stats = StoreStats()
        self._loop = loop
        self._policy = BatchPolicy(batch_max, batch_wait_ms)
        self._metrics = BatchMetrics(ADAPTER)
        self._read_pool_size = read_pool
        self._pool: asyncpg.Pool | None = None
        self._writer_conn: Conn | None = None
        self._reload_schema = False
        # bounded: a full channel makes writers wait (back-pressure) instead of growing RAM
        send, recv = trio.open_memory_channel[WriteOp[Any]](max(1024, 4 * batch_max))
        self._send = send
        self._recv = recv
        self._writer_stopped = trio.Event()
        self._closing = False

    # ------------------------------------------------------------------ asyncio bridge

    async def _aio(self, coro: Awaitable[T]) -> T:
        """Run an asyncio coroutine on the store's loop from any trio task."""
        result: T = await self._loop.run_aio_coroutine(coro)
        return result

    async def _open(self) -> None:
        async def connect() -> None:
            # min_size == max_size: every read connection exists from the start, so a
            # read rarely has to connect (and a cancelled read rarely cancels a connect)
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._read_pool_size,
                max_size=self._read_pool_size,
                timeout=CONNECT_TIMEOUT_S,
            )
            self._writer_conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)

        try:
            await self._aio(connect())
        except Exception as exc:
            await self._close_connections()
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc

    async def _close_connections(self) -> None:
        async def close() -> None:
            if self._writer_conn is not None:
                await self._writer_conn.close(timeout=5)
                self._writer_conn = None
            if self._pool is not None:
                await self._pool.close()
                self._pool = None

        try:
            await self._aio(close())
        except Exception:  # closing a broken connection: nothing left to save
            if self._pool is not None:
                self._pool.terminate()
            if self._writer_conn is not None:
                self._writer_conn.terminate()

    # ------------------------------------------------------------------ writer task

    async def _writer_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        try:
            while True:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
                batch: list[WriteOp[Any]] = [first]
                await self._collect(batch)
                await self._run_batch(batch)
        finally:
            self._writer_stopped.set()

    async def _collect(self, batch: list[WriteOp[Any]]) -> None:
        limit = self._policy.batch_max
        while len(batch) < limit:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        linger = self._policy.linger_seconds(len(batch))
        if linger > 0:
            with trio.move_on_after(linger):
                while len(batch) < limit:
                    try:
                        batch.append(await self._recv.receive())
                    except trio.EndOfChannel:
                        break

    async def _run_batch(self, batch: list[WriteOp[Any]]) -> None:
        started = monotonic()
        try:
            await self._aio(self._run_batch_aio(batch))
        except BaseException as exc:
            # the whole transaction is gone (connection lost, commit failed, cancelled):
            # ops that looked fine were rolled back with it
            failure = _map_error(exc) if isinstance(exc, Exception) else None
            if not isinstance(failure, StoreUnavailable):
                failure = StoreUnavailable(f"PostgreSQL commit failed: {exc!r}")
            for op in batch:
                if op.error is None:
                    op.result = None
                    op.error = failure
            if not isinstance(exc, Exception):
                self._finish(batch, started)
                raise
        self._finish(batch, started)

    def _finish(self, batch: list[WriteOp[Any]], started: float) -> None:
        seconds = monotonic() - started
        self._policy.batch_done(len(batch))
        self._metrics.observe(batch, seconds, failed=None)
        finish_batch(self.stats, batch, seconds)

    async def _writer_connection(self) -> Conn:
        """The writer's connection, reconnected if the previous one broke (asyncio side)."""
        conn = self._writer_conn
        if conn is not None and conn.is_closed():
            conn = self._writer_conn = None
        if conn is None:
            conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)
            self._writer_conn = conn
        if self._reload_schema:
            await conn.reload_schema_state()
            self._reload_schema = False
        return conn

    async def _run_batch_aio(self, batch: list[WriteOp[Any]]) -> None:
        """One transaction, one COMMIT (asyncio side): optimistic first, isolated on failure.

        The batch first runs with no savepoints (saving a round trip per op). If an op
        raises (not a connection error), the transaction is rolled back and the batch
        replayed with one SAVEPOINT per op, so the failing op fails alone.
        """
        conn = await self._writer_connection()
        try:
            if not await self._run_optimistic(conn, batch):
                await self._run_isolated(conn, batch)
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                try:
                    await conn.execute("ROLLBACK")
                except BaseException:
                    conn.terminate()  # cannot even roll back: start afresh next batch
                    raise
            raise

    async def _run_optimistic(self, conn: Conn, batch: list[WriteOp[Any]]) -> bool:
        """Every op in one transaction, no savepoints; False (rolled back) if an op raised.

        Consecutive `insert_message` ops run as ONE statement (`_insert_messages`): one
        round trip for the lot instead of one per message.
        """
        await conn.execute("BEGIN")
        i, end = 0, len(batch)
        try:
            while i < end:
                if type(batch[i]) is _MessageWrite:
                    j = i + 1
                    while j < end and type(batch[j]) is _MessageWrite:
                        j += 1
                    if j - i > 1:
                        await _insert_messages(conn, batch[i:j])  # type: ignore[arg-type]
                        i = j
                        continue
                batch[i].result = await batch[i].fn(conn)
                i += 1
        except Exception as exc:
            if conn.is_closed() or isinstance(exc, _CONNECTION_ERRORS):
                raise
            for done in batch:
                done.result = None
            await conn.execute("ROLLBACK")
            return False
        await conn.execute("COMMIT")
        return True

    async def _run_isolated(self, conn: Conn, batch: list[WriteOp[Any]]) -> None:
        """One SAVEPOINT per op, one COMMIT.

        Savepoints are driven by hand rather than by nested `conn.transaction()` so that
        "release this op's savepoint" and "open the next one" travel in ONE round trip
        (a multi-statement simple query).
        """
        await conn.execute("BEGIN; SAVEPOINT op")
        last = len(batch) - 1
        for i, op in enumerate(batch):
            try:
                op.result = await op.fn(conn)
            except Exception as exc:
                if conn.is_closed() or isinstance(exc, _CONNECTION_ERRORS):
                    raise
                op.result = None
                op.error = _map_error(exc)
                # the savepoint survives ROLLBACK TO, ready for the next op
                await conn.execute("ROLLBACK TO SAVEPOINT op")
            else:
                if i < last:
                    await conn.execute("RELEASE SAVEPOINT op; SAVEPOINT op")
        await conn.execute("COMMIT")

    def _queued(self) -> int:
        """Writes waiting for the writer (not counting the batch in progress)."""
        return self._send.statistics().current_buffer_used

    async def _write(self, fn: Op[T]) -> T:
        """Queue `fn` (an asyncio coroutine function of the connection) for the writer."""
        op: WriteOp[T] = WriteOp(fn)
        await self._enqueue(op)
        return await op.wait()

    async def _enqueue(self, op: WriteOp[Any]) -> None:
        """Hand `op` to the writer. A cancelled enqueue leaves nothing queued: trio's
        channel send either took the item or raised Cancelled before it did."""
        if self._closing:
            raise StoreUnavailable("the store is closed")
        try:
            await self._send.send(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreUnavailable("the store is closed") from None

    # ------------------------------------------------------------------ readers

    async def _read(self, fn: Op[T]) -> T:
        """Run `fn` on a pooled connection (asyncio side); map errors to StoreError."""
        if self._closing or self._pool is None:
            raise StoreUnavailable("the store is closed")
        pool = self._pool

        async def run() -> T:
            try:
                async with pool.acquire() as conn:
                    return await fn(conn)
            except Exception as exc:
                mapped = _map_error(exc)
                if mapped is exc:
                    raise
                raise mapped from exc

        return await self._aio(run())

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._read(lambda c: c.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._read(lambda c: c.fetchrow(sql, *args))

    # ------------------------------------------------------------------ lifecycle

    async def migrate(self) -> int:
        """Apply pending migrations (idempotent); return the schema version now in force."""
        from securecollab.ids import now_ms

        now = now_ms()

        async def run(c: Conn) -> tuple[int, bool]:
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                await c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
                )
                current = int(
                    await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                )
                todo = pending(ADAPTER, current)
                for migration in todo:
                    await c.execute(migration.sql)
                    await c.execute(
                        "INSERT INTO schema_version (version, name, applied_at)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        now,
                    )
                    current = migration.version
                return current, bool(todo)

        version, changed = await self._read(run)
        if changed and self._pool is not None:
            # statements cached before the schema changed must be prepared again
            await self._aio(self._pool.expire_connections())
            self._reload_schema = True
        return version

    async def schema_version(self) -> int:
        async def run(c: Conn) -> int:
            if await c.fetchval("SELECT to_regclass('schema_version')") is None:
                return 0
            return int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

        return await self._read(run)

    async def ping(self) -> None:
        await self._read(lambda c: c.fetchval("SELECT 1"))

    # ------------------------------------------------------------------ users

    async def create_user(self, user: UserRecord) -> None:
        args = R.user_params(user)
        await self._write(
            lambda c: c.execute(
                "INSERT INTO users (user_key, user_id, password_hash, display_name, roles,"
                " created_at, deleted_at, deletion_scheduled_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                *args,
            )
        )

    async def get_user(self, user_id: str) -> UserRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.USER_COLUMNS} FROM users WHERE user_key = $1", R.user_key(user_id)
        )
        return R.user_from_row(row) if row is not None else None

    async def existing_users(self, user_ids: Sequence[str]) -> set[str]:
        if not user_ids:
            return set()
        rows = await self._fetch(
            "SELECT user_id FROM users WHERE deleted_at IS NULL AND user_key = ANY($1::text[])",
            [R.user_key(u) for u in user_ids],
        )
        return {row["user_id"] for row in rows}

    async def set_user_deleted(self, user_id: str, at: int) -> None:
        async def op(c: Conn) -> None:
            status = await c.execute(
                "UPDATE users SET deleted_at = $1 WHERE user_key = $2", at, R.user_key(user_id)
            )
            if _count(status) == 0:
                raise NotFound(f"no user {user_id!r}")

        await self._write(op)

    # ------------------------------------------------------------------ refresh tokens

    async def add_refresh_token(self, token: RefreshTokenRecord) -> None:
        await self._write(lambda c: _insert_token(c, token))

    async def get_refresh_token(self, token_hash: str) -> RefreshTokenRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.TOKEN_COLUMNS} FROM refresh_tokens WHERE token_hash = $1", token_hash
        )
        return R.token_from_row(row) if row is not None else None

    async def rotate_refresh_token(self, old_hash: str, new: RefreshTokenRecord, at: int) -> bool:
        async def op(c: Conn) -> bool:
            status = await c.execute(
                "UPDATE refresh_tokens SET used_at = $1"
                " WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL",
                at,
                old_hash,
            )
            if _count(status) == 0:
                return False
            await _insert_token(c, new)
            return True

        return await self._write(op)

    async def revoke_token_family(self, family_id: str, at: int) -> int:
        async def op(c: Conn) -> int:
            return _count(
                await c.execute(
                    "UPDATE refresh_tokens SET revoked_at = $1"
                    " WHERE family_id = $2 AND revoked_at IS NULL",
                    at,
                    family_id,
                )
            )

        return await self._write(op)

    async def family_revoked(self, family_id: str) -> bool:
        row = await self._fetchrow(
            "SELECT 1 FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NOT NULL LIMIT 1",
            family_id,
        )
        return row is not None

    # ------------------------------------------------------------------ audit log

    async def append_audit(self, entry: AuditRecord) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO audit_log (actor, action, target, at, ip, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                entry.actor,
                entry.action,
                entry.target,
                entry.at,
                entry.ip,
                entry.detail,
            )
        )

    async def list_audit(
        self, *, actor: str | None = None, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        where: list[str] = []
        args: list[Any] = []
        if actor is not None:
            args.append(actor)
            where.append(f"actor = ${len(args)}")
        if action_prefix:
            # left(), not LIKE: the prefix is literal (no % or _ wildcards)
            args += [len(action_prefix), action_prefix]
            where.append(f"left(action, ${len(args) - 1}) = ${len(args)}")
        sql = f"SELECT {R.AUDIT_COLUMNS} FROM audit_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        args.append(max(0, limit))
        sql += f" ORDER BY id DESC LIMIT ${len(args)}"
        return [R.audit_from_row(r) for r in await self._fetch(sql, *args)]

    async def prune_audit(self, older_than: int) -> int:
        async def op(c: Conn) -> int:
            return _count(await c.execute("DELETE FROM audit_log WHERE at < $1", older_than))

        return await self._write(op)

    # ------------------------------------------------------------------ device keys

    async def upsert_device_key(self, key: DeviceKeyRecord) -> tuple[DeviceKeyRecord, bool]:
        args = R.device_key_params(key)

        async def op(c: Conn) -> tuple[DeviceKeyRecord, bool]:
            status = await c.execute(
                "UPDATE device_keys SET bundle_id = $1, public_key = $2, registered_at = $3,"
                " last_used_at = $4 WHERE user_id = $5 AND device_id = $6",
                *args,
            )
            if _count(status):
                return key, True
            await c.execute(
                "INSERT INTO device_keys (bundle_id, public_key, registered_at, last_used_at,"
                " user_id, device_id) VALUES ($1, $2, $3, $4, $5, $6)",
                *args,
            )
            return key, False

        return await self._write(op)

    async def get_device_key(self, user_id: str, device_id: str) -> DeviceKeyRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.DEVICE_KEY_COLUMNS} FROM device_keys WHERE user_id = $1 AND device_id = $2",
            user_id,
            device_id,
        )
        return R.device_key_from_row(row) if row is not None else None

    async def list_device_keys(self, user_id: str) -> list[DeviceKeyRecord]:
        rows = await self._fetch(
            f"SELECT {R.DEVICE_KEY_COLUMNS} FROM device_keys WHERE user_id = $1"
            " ORDER BY registered_at, device_id",
            user_id,
        )
        return [R.device_key_from_row(r) for r in rows]

    async def delete_device_key(self, user_id: str, device_id: str) -> bool:
        async def op(c: Conn) -> bool:
            status = await c.execute(
                "DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2", user_id, device_id
            )
            return _count(status) > 0

        return await self._write(op)

    async def touch_device_key(self, user_id: str, device_id: str, at: int) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE device_keys SET last_used_at = $1 WHERE user_id = $2 AND device_id = $3",
                at,
                user_id,
                device_id,
            )
        )

    # ------------------------------------------------------------------ channels

    async def create_channel(self, channel: ChannelRecord) -> None:
        async def op(c: Conn) -> None:
            await c.execute(
                f"INSERT INTO channels ({R.CHANNEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
                *R.channel_params(channel),
            )
            await c.execute(
                "INSERT INTO channel_members (channel_id, user_id, role, joined_at)"
                " VALUES ($1, $2, 'owner', $3)",
                channel.id,
                channel.owner_id,
                channel.created_at,
            )

        await self._write(op)

    async def get_channel(self, channel_id: str) -> ChannelRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.CHANNEL_COLUMNS} FROM channels WHERE id = $1", channel_id
        )
        return R.channel_from_row(row) if row is not None else None

    async def list_user_channels(self, user_id: str) -> list[ChannelRecord]:
        rows = await self._fetch(
            "SELECT c.id, c.name, c.description, c.owner_id, c.settings, c.created_at"
            " FROM channel_members m JOIN channels c ON c.id = m.channel_id"
            " WHERE m.user_id = $1 ORDER BY c.created_at, c.id",
            user_id,
        )
        return [R.channel_from_row(r) for r in rows]

    async def add_channel_members(
        self, channel_id: str, user_ids: Sequence[str], role: str, at: int
    ) -> list[str]:
        wanted = list(dict.fromkeys(user_ids))  # keep order, drop repeats

        async def op(c: Conn) -> list[str]:
            if not wanted:
                # still report a missing channel, as the inserts would
                if await c.fetchval("SELECT 1 FROM channels WHERE id = $1", channel_id) is None:
                    raise NotFound(f"no channel {channel_id!r}")
                return []
            rows = await c.fetch(
                "INSERT INTO channel_members (channel_id, user_id, role, joined_at)"
                " SELECT $1, u, $3, $4 FROM unnest($2::text[]) WITH ORDINALITY AS t(u, n)"
                " ORDER BY n ON CONFLICT (channel_id, user_id) DO NOTHING RETURNING user_id",
                channel_id,
                wanted,
                role,
                at,
            )
            added = {r["user_id"] for r in rows}
            return [u for u in wanted if u in added]

        return await self._write(op)

    async def remove_channel_member(self, channel_id: str, user_id: str) -> bool:
        async def op(c: Conn) -> bool:
            status = await c.execute(
                "DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2",
                channel_id,
                user_id,
            )
            return _count(status) > 0

        return await self._write(op)

    async def get_member(self, channel_id: str, user_id: str) -> MemberRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.MEMBER_COLUMNS} FROM channel_members"
            " WHERE channel_id = $1 AND user_id = $2",
            channel_id,
            user_id,
        )
        return R.member_from_row(row) if row is not None else None

    async def list_channel_members(self, channel_id: str) -> list[MemberRecord]:
        rows = await self._fetch(
            f"SELECT {R.MEMBER_COLUMNS} FROM channel_members WHERE channel_id = $1"
            " ORDER BY joined_at, user_id",
            channel_id,
        )
        return [R.member_from_row(r) for r in rows]

    async def peers_of(self, user_id: str) -> set[str]:
        rows = await self._fetch(
            "SELECT other.user_id AS peer FROM channel_members mine"
            " JOIN channel_members other ON other.channel_id = mine.channel_id"
            " WHERE mine.user_id = $1 AND other.user_id <> $1"
            " UNION SELECT peer_id FROM direct_peers WHERE user_id = $1",
            user_id,
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
        write = await self.submit_message(
            message, offline_for=offline_for, offline_expires_at=offline_expires_at, outbox=outbox
        )
        return await write.wait()

    async def submit_message(
        self,
        message: MessageRecord,
        *,
        offline_for: Sequence[str] = (),
        offline_expires_at: int = 0,
        outbox: Sequence[OutboxRecord] = (),
    ) -> WriteOp[InsertResult]:
        R.check_message(message)
        offline = list(dict.fromkeys(offline_for))
        # outbox rows as parallel arrays (id, topic, key, payload, created_at, sent_at)
        events = [list(column) for column in zip(*map(R.outbox_params, outbox), strict=True)]
        if not events:
            events = [[], [], [], [], [], []]
        params = R.message_params(message)

        async def op(c: Conn) -> InsertResult:
            inserted = await c.fetchval(
                _INSERT_MESSAGE,
                *params,
                offline,
                offline_expires_at,
                *events,
            )
            if inserted is None:
                row = await c.fetchrow(
                    f"SELECT {R.MESSAGE_COLUMNS} FROM messages"
                    " WHERE sender_id = $1 AND client_message_id = $2",
                    message.sender_id,
                    message.client_message_id,
                )
                if row is None:  # pragma: no cover - the conflicting row is committed
                    raise StoreError("clientMessageId conflict but no original message")
                return InsertResult(R.message_from_row(row), created=False)
            return InsertResult(message, created=True)

        write = _MessageWrite(op, message, offline, offline_expires_at, tuple(outbox))
        await self._enqueue(write)
        return write

    async def get_message(self, message_id: str) -> MessageRecord | None:
        row = await self._fetchrow(
            f"SELECT {R.MESSAGE_COLUMNS} FROM messages WHERE id = $1", message_id
        )
        return R.message_from_row(row) if row is not None else None

    async def list_direct_messages(
        self, user_a: str, user_b: str, page: Page
    ) -> list[MessageRecord]:
        args: list[Any] = [user_a, user_b]
        filters = _page_filters(page, args)
        limit, offset = max(0, page.limit), max(0, page.offset)
        args += [offset + limit, limit, offset]
        n = len(args)
        inner, lim, off = f"${n - 2}", f"${n - 1}", f"${n}"

        def branch(sender: str, recipient: str) -> str:
            return (
                f"(SELECT {R.MESSAGE_COLUMNS} FROM messages"
                f" WHERE sender_id = {sender} AND recipient_id = {recipient}{filters}"
                f" ORDER BY id DESC LIMIT {inner})"
            )

        # One index range scan per direction, each already cut to offset+limit rows, then
        # merged: the cost follows the page, not the length of the conversation.
        if user_a == user_b:
            sql = branch("$1", "$1")
        else:
            sql = branch("$1", "$2") + " UNION ALL " + branch("$2", "$1")
        sql += f" ORDER BY id DESC LIMIT {lim} OFFSET {off}"
        return [R.message_from_row(r) for r in await self._fetch(sql, *args)]

    async def list_channel_messages(self, channel_id: str, page: Page) -> list[MessageRecord]:
        args: list[Any] = [channel_id]
        filters = _page_filters(page, args)
        args += [max(0, page.limit), max(0, page.offset)]
        rows = await self._fetch(
            f"SELECT {R.MESSAGE_COLUMNS} FROM messages WHERE channel_id = $1{filters}"
            f" ORDER BY id DESC LIMIT ${len(args) - 1} OFFSET ${len(args)}",
            *args,
        )
        return [R.message_from_row(r) for r in rows]

    # ------------------------------------------------------------------ offline queue

    async def list_offline(self, user_id: str, *, now: int, limit: int = 500) -> list[OfflineEntry]:
        rows = await self._fetch(
            "SELECT q.user_id AS q_user_id, q.queued_at AS q_queued_at,"
            " q.expires_at AS q_expires_at,"
            " m.id, m.sender_id, m.recipient_id, m.channel_id, m.encrypted_content, m.iv,"
            " m.keys, m.created_at, m.client_message_id"
            " FROM offline_queue q JOIN messages m ON m.id = q.message_id"
            " WHERE q.user_id = $1 AND q.expires_at > $2"
            ' ORDER BY q.queued_at, q.message_id COLLATE "C" LIMIT $3',
            user_id,
            now,
            max(0, limit),
        )
        return [R.offline_from_row(r) for r in rows]

    async def ack_offline(self, user_id: str, message_ids: Sequence[str]) -> int:
        if not message_ids:
            return 0
        ids = list(message_ids)

        async def op(c: Conn) -> int:
            return _count(
                await c.execute(
                    "DELETE FROM offline_queue WHERE user_id = $1 AND message_id = ANY($2::text[])",
                    user_id,
                    ids,
                )
            )

        return await self._write(op)

    async def prune_offline(self, now: int) -> int:
        async def op(c: Conn) -> int:
            return _count(await c.execute("DELETE FROM offline_queue WHERE expires_at <= $1", now))

        return await self._write(op)

    async def enqueue_offline(
        self, user_id: str, message_ids: Sequence[str], expires_at: int
    ) -> int:
        if not message_ids:
            return 0
        ids = list(dict.fromkeys(message_ids))

        async def op(c: Conn) -> int:
            return _count(
                await c.execute(
                    "INSERT INTO offline_queue (user_id, message_id, queued_at, expires_at)"
                    " SELECT $1, m.id, m.created_at, $2 FROM messages m"
                    " WHERE m.id = ANY($3::text[]) AND m.sender_id <> $1"
                    " ON CONFLICT (user_id, message_id) DO NOTHING",
                    user_id,
                    expires_at,
                    ids,
                )
            )

        return await self._write(op)

    # ------------------------------------------------------------------ outbox

    async def add_outbox(self, events: Sequence[OutboxRecord]) -> None:
        if not events:
            return
        params = [R.outbox_params(e) for e in events]
        await self._write(lambda c: c.executemany(_OUTBOX_INSERT, params))

    async def fetch_outbox(self, limit: int = 500) -> list[OutboxRecord]:
        rows = await self._fetch(
            f"SELECT {R.OUTBOX_COLUMNS} FROM outbox WHERE sent_at IS NULL"
            " ORDER BY created_at, id LIMIT $1",
            max(0, limit),
        )
        return [R.outbox_from_row(r) for r in rows]

    async def mark_outbox_sent(self, ids: Sequence[str], at: int) -> None:
        if not ids:
            return
        id_list = list(ids)
        await self._write(
            lambda c: c.execute(
                "UPDATE outbox SET sent_at = $1 WHERE sent_at IS NULL AND id = ANY($2::text[])",
                at,
                id_list,
            )
        )

    async def prune_outbox(self, sent_before: int) -> int:
        async def op(c: Conn) -> int:
            return _count(
                await c.execute(
                    "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1", sent_before
                )
            )

        return await self._write(op)


# ---------------------------------------------------------------------- helpers


async def _insert_token(c: Conn, t: RefreshTokenRecord) -> None:
    await c.execute(
        f"INSERT INTO refresh_tokens ({R.TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        t.token_hash,
        t.user_id,
        t.family_id,
        t.issued_at,
        t.expires_at,
        t.used_at,
        t.revoked_at,
        t.device_id,
    )


# insert_message in ONE statement (one round trip): the message, then (only if it was
# inserted) the direct_peers pair, the offline-queue entries and the outbox rows.
# ON CONFLICT on the (sender, clientMessageId) index: a retry racing the original on
# another node waits for it, then finds it, instead of failing. $1-$9 message columns,
# $10 offline user ids, $11 their expiry, $12-$17 outbox columns as arrays.
_INSERT_MESSAGE = f"""
WITH m AS (
    INSERT INTO messages ({R.MESSAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (sender_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING id, sender_id, recipient_id, created_at
), peers AS (
    INSERT INTO direct_peers (user_id, peer_id, since)
    SELECT v.a, v.b, m.created_at
    FROM m CROSS JOIN LATERAL (VALUES (m.sender_id, m.recipient_id),
                                      (m.recipient_id, m.sender_id)) AS v (a, b)
    WHERE m.recipient_id IS NOT NULL AND m.recipient_id <> m.sender_id
    ON CONFLICT (user_id, peer_id) DO NOTHING
), queued AS (
    INSERT INTO offline_queue (user_id, message_id, queued_at, expires_at)
    SELECT u, m.id, m.created_at, $11 FROM m, unnest($10::text[]) AS u
    ON CONFLICT (user_id, message_id) DO NOTHING
), events AS (
    INSERT INTO outbox ({R.OUTBOX_COLUMNS})
    SELECT e.id, e.topic, e.key, e.payload, e.created_at, e.sent_at
    FROM m, unnest($12::text[], $13::text[], $14::text[], $15::bytea[], $16::bigint[],
                   $17::bigint[]) AS e (id, topic, key, payload, created_at, sent_at)
)
SELECT id FROM m
"""

_OUTBOX_INSERT = f"INSERT INTO outbox ({R.OUTBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"


class _MessageWrite(WriteOp[InsertResult]):
    """A queued `insert_message`: its own op (`fn`, for a lone message and the per-op
    replay) plus what `_insert_messages` needs to write it with its batch neighbours."""

    __slots__ = ("expires_at", "message", "offline_for", "outbox")

    def __init__(
        self,
        fn: Op[InsertResult],
        message: MessageRecord,
        offline_for: list[str],
        expires_at: int,
        outbox: tuple[OutboxRecord, ...],
    ) -> None:
        super().__init__(fn)
        self.message = message
        self.offline_for = offline_for
        self.expires_at = expires_at
        self.outbox = outbox


async def _insert_messages(c: Conn, ops: list[_MessageWrite]) -> None:
    """Consecutive `insert_message` ops of a batch in ONE statement (asyncio side).

    The rows travel as parallel arrays; a message whose (sender, clientMessageId) already
    exists (stored before, or earlier in this very batch) is skipped by ON CONFLICT DO
    NOTHING together with its peers/queue/outbox rows, and its op gets the original, as a
    lone `insert_message` would. Any other failure raises: the batch is then replayed op
    by op with savepoints.
    """
    if len({op.message.id for op in ops}) != len(ops):
        # the same message id twice (a retry of one record): rows could not be told
        # apart by id, so run these as lone inserts, in order (exactly their semantics)
        for op in ops:
            op.result = await op.fn(c)
        return
    columns: list[list[Any]] = [[] for _ in range(9)]
    offline: list[list[Any]] = [[], [], []]  # message id, user, expires_at
    events: list[list[Any]] = [[] for _ in range(7)]  # owner message id + outbox columns
    for op in ops:
        m = op.message
        for column, value in zip(columns, R.message_params(m), strict=True):
            column.append(value)
        for user in op.offline_for:
            offline[0].append(m.id)
            offline[1].append(user)
            offline[2].append(op.expires_at)
        for e in op.outbox:
            events[0].append(m.id)
            for column, value in zip(events[1:], R.outbox_params(e), strict=True):
                column.append(value)
    inserted = {r["id"] for r in await c.fetch(_INSERT_MESSAGES, *columns, *offline, *events)}
    for op in ops:
        m = op.message
        if m.id in inserted:
            op.result = InsertResult(m, created=True)
            continue
        row = await c.fetchrow(
            f"SELECT {R.MESSAGE_COLUMNS} FROM messages"
            " WHERE sender_id = $1 AND client_message_id = $2",
            m.sender_id,
            m.client_message_id,
        )
        if row is None:  # not inserted and no original: not a clientMessageId repeat
            raise StoreError(f"message {m.id} was neither inserted nor a repeat")
        op.result = InsertResult(R.message_from_row(row), created=False)


_INSERT_MESSAGES = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::bigint[], $9::text[]) WITH ORDINALITY
        AS t ({R.MESSAGE_COLUMNS}, ord)
), m AS (
    INSERT INTO messages ({R.MESSAGE_COLUMNS})
    SELECT {R.MESSAGE_COLUMNS} FROM input ORDER BY ord
    ON CONFLICT (sender_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING id, sender_id, recipient_id, created_at
), peers AS (
    -- per pair, the first message in queue order sets `since` (as lone inserts would)
    INSERT INTO direct_peers (user_id, peer_id, since)
    SELECT DISTINCT ON (v.a, v.b) v.a, v.b, m.created_at
    FROM m JOIN input ON input.id = m.id
    CROSS JOIN LATERAL (VALUES (m.sender_id, m.recipient_id),
                               (m.recipient_id, m.sender_id)) AS v (a, b)
    WHERE m.recipient_id IS NOT NULL AND m.recipient_id <> m.sender_id
    ORDER BY v.a, v.b, input.ord
    ON CONFLICT (user_id, peer_id) DO NOTHING
), queued AS (
    INSERT INTO offline_queue (user_id, message_id, queued_at, expires_at)
    SELECT q.u, m.id, m.created_at, q.x
    FROM unnest($10::text[], $11::text[], $12::bigint[]) AS q (mid, u, x)
    JOIN m ON m.id = q.mid
    ON CONFLICT (user_id, message_id) DO NOTHING
), events AS (
    INSERT INTO outbox ({R.OUTBOX_COLUMNS})
    SELECT e.id, e.topic, e.key, e.payload, e.created_at, e.sent_at
    FROM unnest($13::text[], $14::text[], $15::text[], $16::text[], $17::bytea[],
                $18::bigint[], $19::bigint[])
         AS e (mid, id, topic, key, payload, created_at, sent_at)
    JOIN m ON m.id = e.mid
)
SELECT id FROM m
"""


def _page_filters(page: Page, args: list[Any]) -> str:
    """SQL conditions for the page's filters; appends their values to `args`."""
    sql = ""
    if page.from_date is not None:
        args.append(page.from_date)
        sql += f" AND created_at >= ${len(args)}"
    if page.to_date is not None:
        args.append(page.to_date)
        sql += f" AND created_at <= ${len(args)}"
    if page.before_id is not None:
        args.append(page.before_id)
        sql += f" AND id < ${len(args)}"
    return sql


@asynccontextmanager
async def open_postgres(
    url: str, *, batch_max: int = 256, batch_wait_ms: float = 1.0, read_pool: int = 4
) -> AsyncIterator[PostgresStore]:
    """Open the PostgreSQL store at `url` (a libpq URL: postgresql://user@host:port/db).

    Opens a trio-asyncio loop for the store's whole life, the read pool and the writer's
    connection, and starts the writer task. On exit, queued writes are committed (up to
    DRAIN_TIMEOUT_S), then everything is closed. Migrations are not applied here: call
    `await store.migrate()` (the app does at startup).
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        store = PostgresStore(
            url, loop, batch_max=batch_max, batch_wait_ms=batch_wait_ms, read_pool=read_pool
        )
        await store._open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store._writer_loop)
                try:
                    yield store
                finally:
                    store._closing = True
                    store._send.close()  # the writer commits what is queued, then returns
                    with trio.CancelScope(shield=True) as drain:
                        drain.deadline = trio.current_time() + DRAIN_TIMEOUT_S
                        await store._writer_stopped.wait()
                    if not store._writer_stopped.is_set():
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await store._close_connections()


__all__ = ["PostgresStore", "open_postgres"]
