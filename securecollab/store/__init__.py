"""Persistence port: the `Store` protocol, its records and its errors.

Two adapters implement it and pass one contract suite (`tests/store/`):

- `store/sqlite.py` (default): one SQLite file in WAL mode. All writes go through
  ONE writer process (`store/sqlite_writer.py`, a child of the server: it shares no
  GIL with the event loop) that group-commits: it takes every pending write (up to
  `[store] batch_max` or what arrived within `[store] batch_wait_ms`), runs them in
  one transaction (consecutive message inserts as one multi-row INSERT per table),
  commits once, then answers all of them at once. Only when a write fails is the batch
  replayed with one SAVEPOINT per write, so a failing write rolls back alone.
  Reads run on their own connections in worker threads and never wait for the writer.
- `store/postgres.py`: asyncpg under trio-asyncio; the same group commit through
  one writer task and one connection (consecutive message inserts as one statement
  over parallel arrays); a pool for reads.

`open_store(url)` picks the adapter from the URL (`sqlite:///path` or
`postgresql://...`). Times are integer milliseconds since the epoch everywhere.
Ids are strings (UUIDv7 for messages, see `securecollab.ids`).

A write method returns only after its batch committed: when it returns, the row is
durable (SQLite `synchronous=FULL` in WAL mode; PostgreSQL commit). The hot write has
a second form, `submit_message`, that queues the write and returns a `Committing`
handle at once, so a caller can queue its next write before this one committed (a
STOMP connection's pipelined SENDs); writes commit in the order they were submitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from securecollab.records import record


class StoreError(Exception):
    """Base of the store layer's exceptions."""


class Conflict(StoreError):
    """A unique key already exists (e.g. a userId taken at registration)."""


class NotFound(StoreError):
    """The row the write refers to does not exist."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer version of the code; refuse to start."""


class StoreUnavailable(StoreError):
    """The database cannot be reached."""


# --------------------------------------------------------------------------- records


@record
class UserRecord:
    user_id: str  # email-like, e.g. alice@example.com (case preserved, compared lowercased)
    password_hash: str  # argon2id encoded hash
    display_name: str
    roles: tuple[str, ...]  # e.g. ("ROLE_USER",)
    created_at: int
    deleted_at: int | None = None  # set when the account is gone (GDPR, later)
    deletion_scheduled_at: int | None = None  # GDPR grace period (later issue)


@record
class RefreshTokenRecord:
    token_hash: str  # sha256 hex of the opaque refresh token; the token itself is never stored
    user_id: str
    family_id: str  # all rotations of one login share a family
    issued_at: int
    expires_at: int
    used_at: int | None = None  # set when rotated; a second use means theft -> revoke family
    revoked_at: int | None = None
    device_id: str | None = None


@record
class AuditRecord:
    actor: str | None  # userId, or None for anonymous / system
    action: str  # e.g. "auth.register", "auth.login.failure", "channel.invite"
    target: str | None
    at: int
    ip: str | None = None
    detail: str | None = None  # short JSON text; never secrets
    id: int | None = None  # assigned by the store


@record
class DeviceKeyRecord:
    bundle_id: str
    user_id: str
    device_id: str
    public_key: str  # PEM
    registered_at: int
    last_used_at: int | None = None


@record
class ChannelRecord:
    id: str
    name: str
    description: str
    owner_id: str
    settings: dict[str, str]
    created_at: int


@record
class MemberRecord:
    channel_id: str
    user_id: str
    role: str  # "owner" | "admin" | "member"
    joined_at: int


@record
class MessageRecord:
    id: str  # UUIDv7 text: time-ordered, so ORDER BY id == ORDER BY time
    sender_id: str
    recipient_id: str | None  # 1:1 messages
    channel_id: str | None  # channel messages (exactly one of recipient/channel is set)
    encrypted_content: str  # base64 text as received
    iv: str  # base64 text
    keys: dict[str, str]  # deviceId -> base64 wrapped message key
    created_at: int
    client_message_id: str | None = None


@record
class OutboxRecord:
    id: str  # event id (the message id for message events)
    topic: str  # e.g. "chat.messages"
    key: str | None
    payload: bytes  # JSON
    created_at: int
    sent_at: int | None = None


@record
class OfflineEntry:
    user_id: str  # recipient
    message: MessageRecord
    queued_at: int
    expires_at: int


@record
class InsertResult:
    message: MessageRecord  # the stored message (the original one on an idempotent retry)
    created: bool  # False when (sender_id, client_message_id) already existed


@record
class Page:
    """History paging: newest first. All filters are optional and combine with AND."""

    limit: int = 50
    offset: int = 0
    from_date: int | None = None  # created_at >= from_date
    to_date: int | None = None  # created_at <= to_date
    before_id: str | None = None  # id < before_id (cursor paging)


@record
class BatchStats:
    size: int
    seconds: float


@dataclass(slots=True)
class StoreStats:
    """Counters the adapters update; exported by /metrics."""

    batches: int = 0
    writes: int = 0
    last_batches: list[BatchStats] = field(default_factory=list)


# --------------------------------------------------------------------------- the port


T_co = TypeVar("T_co", covariant=True)


class Committing(Protocol[T_co]):
    """A queued write: `wait()` returns its result once its batch committed, or raises
    its error. `wait()` may be called again after a cancelled wait (the write itself
    is not cancelled: it commits, or fails, with its batch)."""

    async def wait(self) -> T_co: ...


class Store(Protocol):
    """What the services need from persistence. Every method is async and trio-safe."""

    url: str

    # lifecycle -------------------------------------------------------------
    async def migrate(self) -> int:
        """Apply pending migrations (idempotent); return the schema version now in force.

        Raises SchemaTooNew when the database is newer than the code.
        """
        ...

    async def schema_version(self) -> int: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query succeeds (for /readyz)."""
        ...

    # users ------------------------------------------------------------------
    async def create_user(self, user: UserRecord) -> None:
        """Raise Conflict when the userId (case-insensitive) exists."""
        ...

    async def get_user(self, user_id: str) -> UserRecord | None:
        """Case-insensitive lookup; returns deleted users too (check deleted_at)."""
        ...

    async def existing_users(self, user_ids: Sequence[str]) -> set[str]:
        """The subset of user_ids that exist and are not deleted (as stored spelling)."""
        ...

    async def set_user_deleted(self, user_id: str, at: int) -> None: ...

    # refresh tokens -----------------------------------------------------------
    async def add_refresh_token(self, token: RefreshTokenRecord) -> None: ...

    async def get_refresh_token(self, token_hash: str) -> RefreshTokenRecord | None: ...

    async def rotate_refresh_token(self, old_hash: str, new: RefreshTokenRecord, at: int) -> bool:
        """Atomically mark `old_hash` used and insert `new`.

        Returns False (and inserts nothing) when the old token was already used or
        revoked: the caller then revokes the whole family.
        """
        ...

    async def revoke_token_family(self, family_id: str, at: int) -> int: ...

    async def family_revoked(self, family_id: str) -> bool:
        """True once the family was revoked (logout, refresh-token reuse): its access
        tokens stop working before they expire."""
        ...

    # audit log ----------------------------------------------------------------
    async def append_audit(self, entry: AuditRecord) -> None: ...

    async def list_audit(
        self, *, actor: str | None = None, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """Newest first."""
        ...

    async def prune_audit(self, older_than: int) -> int:
        """Delete entries with at < older_than; return how many."""
        ...

    # device keys ----------------------------------------------------------------
    async def upsert_device_key(self, key: DeviceKeyRecord) -> tuple[DeviceKeyRecord, bool]:
        """Insert or replace (user_id, device_id); returns (stored, replaced)."""
        ...

    async def get_device_key(self, user_id: str, device_id: str) -> DeviceKeyRecord | None: ...

    async def list_device_keys(self, user_id: str) -> list[DeviceKeyRecord]: ...

    async def delete_device_key(self, user_id: str, device_id: str) -> bool: ...

    async def touch_device_key(self, user_id: str, device_id: str, at: int) -> None: ...

    # channels -----------------------------------------------------------------------
    async def create_channel(self, channel: ChannelRecord) -> None:
        """Insert the channel and its owner as a member with role "owner"."""
        ...

    async def get_channel(self, channel_id: str) -> ChannelRecord | None: ...

    async def list_user_channels(self, user_id: str) -> list[ChannelRecord]: ...

    async def add_channel_members(
        self, channel_id: str, user_ids: Sequence[str], role: str, at: int
    ) -> list[str]:
        """Add members; return those newly added (existing members are skipped)."""
        ...

    async def remove_channel_member(self, channel_id: str, user_id: str) -> bool: ...

    async def get_member(self, channel_id: str, user_id: str) -> MemberRecord | None: ...

    async def list_channel_members(self, channel_id: str) -> list[MemberRecord]: ...

    async def peers_of(self, user_id: str) -> set[str]:
        """Users who share a channel or a 1:1 conversation with user_id (for presence)."""
        ...

    # messages ---------------------------------------------------------------------------
    async def insert_message(
        self,
        message: MessageRecord,
        *,
        offline_for: Sequence[str] = (),
        offline_expires_at: int = 0,
        outbox: Sequence[OutboxRecord] = (),
    ) -> InsertResult:
        """Write the message, its offline-queue entries and outbox rows in one commit.

        Idempotent on (sender_id, client_message_id): a retry returns the original
        message with created=False and writes nothing.
        """
        ...

    async def submit_message(
        self,
        message: MessageRecord,
        *,
        offline_for: Sequence[str] = (),
        offline_expires_at: int = 0,
        outbox: Sequence[OutboxRecord] = (),
    ) -> Committing[InsertResult]:
        """`insert_message`, queued: returns once the write is queued (a shape error
        raises here), before it commits; its handle's `wait()` gives the result.

        A write is queued or refused as a whole: cancellation never leaves it half-way
        (once this returns the write will commit or fail with its batch). Writes of one
        store commit in the order they were submitted.
        """
        ...

    async def get_message(self, message_id: str) -> MessageRecord | None: ...

    async def list_direct_messages(
        self, user_a: str, user_b: str, page: Page
    ) -> list[MessageRecord]:
        """Messages between the two users in either direction, newest first."""
        ...

    async def list_channel_messages(self, channel_id: str, page: Page) -> list[MessageRecord]: ...

    # offline queue ------------------------------------------------------------------------
    async def list_offline(self, user_id: str, *, now: int, limit: int = 500) -> list[OfflineEntry]:
        """Unexpired entries for user_id, oldest first."""
        ...

    async def ack_offline(self, user_id: str, message_ids: Sequence[str]) -> int:
        """Delete the user's entries for these messages; return how many were removed."""
        ...

    async def enqueue_offline(
        self, user_id: str, message_ids: Sequence[str], expires_at: int
    ) -> int:
        """Queue existing messages for user_id (hand-back of undelivered live messages).

        Idempotent on (user_id, message_id): an entry already queued keeps its expiry.
        Unknown ids and messages user_id sent itself are skipped (a user's own messages
        are never queued for it, as in `insert_message`). Entries are ordered like the
        others, by the message's created_at. Returns how many entries were added.
        """
        ...

    async def prune_offline(self, now: int) -> int:
        """Delete expired entries; return how many."""
        ...

    # outbox ------------------------------------------------------------------------------
    async def add_outbox(self, events: Sequence[OutboxRecord]) -> None: ...

    async def fetch_outbox(self, limit: int = 500) -> list[OutboxRecord]:
        """Unsent events, oldest first."""
        ...

    async def mark_outbox_sent(self, ids: Sequence[str], at: int) -> None: ...

    async def prune_outbox(self, sent_before: int) -> int: ...

    # observability -----------------------------------------------------------------------
    stats: StoreStats


def open_store(
    url: str, *, batch_max: int = 256, batch_wait_ms: float = 1.0, read_pool: int = 4
) -> AbstractAsyncContextManager[Store]:
    """Open the adapter named by `url`: ``async with open_store(url) as store: ...``.

    The context manager starts the writer (and, for PostgreSQL, the trio-asyncio
    loop and pools) and on exit drains pending writes, then closes everything.
    """
    if url.startswith("sqlite:"):
        from securecollab.store.sqlite import open_sqlite

        return open_sqlite(
            url, batch_max=batch_max, batch_wait_ms=batch_wait_ms, read_pool=read_pool
        )
    if url.startswith(("postgresql:", "postgres:")):
        from securecollab.store.postgres import open_postgres

        return open_postgres(
            url, batch_max=batch_max, batch_wait_ms=batch_wait_ms, read_pool=read_pool
        )
    raise ValueError(f"unsupported store url {url!r}: use sqlite:///path or postgresql://...")
