"""Row <-> record conversion shared by the adapters (same column names on both).

A row is anything indexable by column name: `sqlite3.Row` or `asyncpg.Record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

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


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def user_key(user_id: str) -> str:
    """The case-insensitive identity of a userId (what the unique index is on)."""
    return user_id.lower()


def dumps(value: Mapping[str, str] | list[str] | tuple[str, ...]) -> str:
    """Compact JSON text for the JSON-as-TEXT columns (keys, settings, roles)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


USER_COLUMNS = (
    "user_id, password_hash, display_name, roles, created_at, deleted_at, deletion_scheduled_at"
)


def user_from_row(row: Row) -> UserRecord:
    return UserRecord(
        user_id=row["user_id"],
        password_hash=row["password_hash"],
        display_name=row["display_name"],
        roles=tuple(json.loads(row["roles"])),
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
        deletion_scheduled_at=row["deletion_scheduled_at"],
    )


TOKEN_COLUMNS = (
    "token_hash, user_id, family_id, issued_at, expires_at, used_at, revoked_at, device_id"
)


def token_from_row(row: Row) -> RefreshTokenRecord:
    return RefreshTokenRecord(
        token_hash=row["token_hash"],
        user_id=row["user_id"],
        family_id=row["family_id"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
        revoked_at=row["revoked_at"],
        device_id=row["device_id"],
    )


AUDIT_COLUMNS = "id, actor, action, target, at, ip, detail"


def audit_from_row(row: Row) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        at=row["at"],
        ip=row["ip"],
        detail=row["detail"],
    )


DEVICE_KEY_COLUMNS = "bundle_id, user_id, device_id, public_key, registered_at, last_used_at"


def device_key_from_row(row: Row) -> DeviceKeyRecord:
    return DeviceKeyRecord(
        bundle_id=row["bundle_id"],
        user_id=row["user_id"],
        device_id=row["device_id"],
        public_key=row["public_key"],
        registered_at=row["registered_at"],
        last_used_at=row["last_used_at"],
    )


CHANNEL_COLUMNS = "id, name, description, owner_id, settings, created_at"


def channel_from_row(row: Row) -> ChannelRecord:
    return ChannelRecord(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        owner_id=row["owner_id"],
        settings=json.loads(row["settings"]),
        created_at=row["created_at"],
    )


MEMBER_COLUMNS = "channel_id, user_id, role, joined_at"


def member_from_row(row: Row) -> MemberRecord:
    return MemberRecord(
        channel_id=row["channel_id"],
        user_id=row["user_id"],
        role=row["role"],
        joined_at=row["joined_at"],
    )


MESSAGE_COLUMNS = (
    "id, sender_id, recipient_id, channel_id, encrypted_content, iv, keys, created_at,"
    " client_message_id"
)


def message_from_row(row: Row) -> MessageRecord:
    return MessageRecord(
        id=row["id"],
        sender_id=row["sender_id"],
        recipient_id=row["recipient_id"],
        channel_id=row["channel_id"],
        encrypted_content=row["encrypted_content"],
        iv=row["iv"],
        keys=json.loads(row["keys"]),
        created_at=row["created_at"],
        client_message_id=row["client_message_id"],
    )


def message_params(m: MessageRecord) -> tuple[Any, ...]:
    """Parameters in MESSAGE_COLUMNS order."""
    return (
        m.id,
        m.sender_id,
        m.recipient_id,
        m.channel_id,
        m.encrypted_content,
        m.iv,
        dumps(m.keys),
        m.created_at,
        m.client_message_id,
    )


def offline_from_row(row: Row) -> OfflineEntry:
    """A joined offline_queue + messages row (queue columns prefixed `q_`)."""
    return OfflineEntry(
        user_id=row["q_user_id"],
        message=message_from_row(row),
        queued_at=row["q_queued_at"],
        expires_at=row["q_expires_at"],
    )


OUTBOX_COLUMNS = "id, topic, key, payload, created_at, sent_at"


def outbox_from_row(row: Row) -> OutboxRecord:
    return OutboxRecord(
        id=row["id"],
        topic=row["topic"],
        key=row["key"],
        payload=bytes(row["payload"]),
        created_at=row["created_at"],
        sent_at=row["sent_at"],
    )


def check_message(m: MessageRecord) -> None:
    """Refuse a message that is neither 1:1 nor channel (a caller bug, not client input)."""
    if (m.recipient_id is None) == (m.channel_id is None):
        raise ValueError("a message needs exactly one of recipient_id and channel_id")
