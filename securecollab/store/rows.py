"""Row <-> record conversion shared by the adapters (same column names on both).

A row is anything indexable by column name: `sqlite3.Row` or `asyncpg.Record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from securecollab import ids
from securecollab.store import (
    AuditRecord,
    ChannelRecord,
    DeviceKeyRecord,
    MemberRecord,
    MessageRecord,
    OfflineEntry,
    OutboxRecord,
    RefreshTokenRecord,
    UserRecord,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


# Every record's field names ARE its table's column names, in column order; the column
# lists and the plain conversions below are derived from the dataclasses, not kept by hand.
R_ = TypeVar("R_", bound="DataclassInstance")


def columns(record: type[Any]) -> str:
    """The record's columns, comma-separated in field order (for SELECT and INSERT)."""
    return ", ".join(f.name for f in fields(record))


def from_row(record: type[R_], row: Row, **decoded: Any) -> R_:
    """Build `record` from a row; `decoded` overrides columns that need decoding (JSON...)."""
    return record(
        **{f.name: decoded[f.name] if f.name in decoded else row[f.name] for f in fields(record)}
    )


def user_key(user_id: str) -> str:
    """The case-insensitive identity of a userId (what the unique index is on)."""
    return ids.user_key(user_id)


# one encoder for every call: json.dumps with options builds a new JSONEncoder each time
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def dumps(value: Mapping[str, str] | list[str] | tuple[str, ...]) -> str:
    """Compact JSON text for the JSON-as-TEXT columns (keys, settings, roles)."""
    return _ENCODER.encode(value)


USER_COLUMNS = columns(UserRecord)
TOKEN_COLUMNS = columns(RefreshTokenRecord)
AUDIT_COLUMNS = columns(AuditRecord)
DEVICE_KEY_COLUMNS = columns(DeviceKeyRecord)
CHANNEL_COLUMNS = columns(ChannelRecord)
MEMBER_COLUMNS = columns(MemberRecord)
MESSAGE_COLUMNS = columns(MessageRecord)
OUTBOX_COLUMNS = columns(OutboxRecord)


def user_from_row(row: Row) -> UserRecord:
    return from_row(UserRecord, row, roles=tuple(json.loads(row["roles"])))


def token_from_row(row: Row) -> RefreshTokenRecord:
    return from_row(RefreshTokenRecord, row)


def audit_from_row(row: Row) -> AuditRecord:
    return from_row(AuditRecord, row)


def device_key_from_row(row: Row) -> DeviceKeyRecord:
    return from_row(DeviceKeyRecord, row)


def channel_from_row(row: Row) -> ChannelRecord:
    return from_row(ChannelRecord, row, settings=json.loads(row["settings"]))


def member_from_row(row: Row) -> MemberRecord:
    return from_row(MemberRecord, row)


def message_from_row(row: Row) -> MessageRecord:
    return from_row(MessageRecord, row, keys=json.loads(row["keys"]))


def message_fields(m: MessageRecord) -> tuple[Any, ...]:
    """The record's fields in order (`MessageRecord(*t)` rebuilds it; keys stay a dict)."""
    return (
        m.id,
        m.sender_id,
        m.recipient_id,
        m.channel_id,
        m.encrypted_content,
        m.iv,
        m.keys,
        m.created_at,
        m.client_message_id,
    )


def message_params(m: MessageRecord) -> tuple[Any, ...]:
    """Parameters in MESSAGE_COLUMNS order (keys as JSON text)."""
    f = message_fields(m)
    return (*f[:6], dumps(m.keys), *f[7:])


def user_params(u: UserRecord) -> tuple[Any, ...]:
    """Parameters of a users row: user_key, then USER_COLUMNS order (roles as JSON)."""
    return (
        user_key(u.user_id),
        u.user_id,
        u.password_hash,
        u.display_name,
        dumps(list(u.roles)),
        u.created_at,
        u.deleted_at,
        u.deletion_scheduled_at,
    )


def device_key_params(k: DeviceKeyRecord) -> tuple[Any, ...]:
    """(bundle_id, public_key, registered_at, last_used_at, user_id, device_id): the
    UPDATE's SET values then its key, and the INSERT's column order."""
    return (k.bundle_id, k.public_key, k.registered_at, k.last_used_at, k.user_id, k.device_id)


def channel_params(ch: ChannelRecord) -> tuple[Any, ...]:
    """Parameters in CHANNEL_COLUMNS order (settings as JSON)."""
    return (ch.id, ch.name, ch.description, ch.owner_id, dumps(ch.settings), ch.created_at)


def outbox_params(e: OutboxRecord) -> tuple[Any, ...]:
    """Parameters in OUTBOX_COLUMNS order (`OutboxRecord(*t)` rebuilds it)."""
    return (e.id, e.topic, e.key, bytes(e.payload), e.created_at, e.sent_at)


def offline_from_row(row: Row) -> OfflineEntry:
    """A joined offline_queue + messages row (queue columns prefixed `q_`)."""
    return OfflineEntry(
        user_id=row["q_user_id"],
        message=message_from_row(row),
        queued_at=row["q_queued_at"],
        expires_at=row["q_expires_at"],
    )


def outbox_from_row(row: Row) -> OutboxRecord:
    return from_row(OutboxRecord, row, payload=bytes(row["payload"]))


def check_message(m: MessageRecord) -> None:
    """Refuse a message that is neither 1:1 nor channel (a caller bug, not client input)."""
    if (m.recipient_id is None) == (m.channel_id is None):
        raise ValueError("a message needs exactly one of recipient_id and channel_id")
    if not m.id:  # the SQLite multi-row INSERT filters rows on their first column (id)
        raise ValueError("a message needs an id")
