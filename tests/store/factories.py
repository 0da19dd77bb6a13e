"""Record builders for the contract suite (realistic values, unique ids)."""

from __future__ import annotations

import base64
import os

from securecollab.ids import new_id, uuid7
from securecollab.store import (
    ChannelRecord,
    DeviceKeyRecord,
    MessageRecord,
    OutboxRecord,
    RefreshTokenRecord,
    UserRecord,
)

T0 = 1_700_000_000_000  # a fixed ms epoch so tests control time


def user(user_id: str, *, at: int = T0) -> UserRecord:
    return UserRecord(
        user_id=user_id,
        password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        display_name=user_id.split("@")[0].title(),
        roles=("ROLE_USER",),
        created_at=at,
    )


def token(
    user_id: str, family: str, *, at: int = T0, device_id: str | None = None
) -> RefreshTokenRecord:
    return RefreshTokenRecord(
        token_hash=os.urandom(32).hex(),
        user_id=user_id,
        family_id=family,
        issued_at=at,
        expires_at=at + 30 * 86_400_000,
        device_id=device_id,
    )


def device_key(user_id: str, device_id: str, *, at: int = T0) -> DeviceKeyRecord:
    body = base64.b64encode(os.urandom(44)).decode()
    return DeviceKeyRecord(
        bundle_id=new_id(),
        user_id=user_id,
        device_id=device_id,
        public_key=f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n",
        registered_at=at,
    )


def channel(owner: str, name: str = "general", *, at: int = T0) -> ChannelRecord:
    return ChannelRecord(
        id=new_id(),
        name=name,
        description=f"{name} talk",
        owner_id=owner,
        settings={"encryption": "E2EE"},
        created_at=at,
    )


def message(
    sender: str,
    *,
    to: str | None = None,
    channel_id: str | None = None,
    at: int = T0,
    client_id: str | None = None,
) -> MessageRecord:
    return MessageRecord(
        id=uuid7(),
        sender_id=sender,
        recipient_id=to,
        channel_id=channel_id,
        encrypted_content=base64.b64encode(os.urandom(96)).decode(),
        iv=base64.b64encode(os.urandom(12)).decode(),
        keys={"phone": base64.b64encode(os.urandom(60)).decode(), "laptop": "d3JhcHBlZA=="},
        created_at=at,
        client_message_id=client_id,
    )


def outbox_for(m: MessageRecord, *, topic: str = "chat.messages") -> OutboxRecord:
    return OutboxRecord(
        id=m.id,
        topic=topic,
        key=m.recipient_id or m.channel_id,
        payload=b'{"id":"' + m.id.encode() + b'"}',
        created_at=m.created_at,
    )
