"""Device key directory: each device's public key, so senders can wrap message keys.

The server holds public keys only. A key is a PEM `-----BEGIN PUBLIC KEY-----`
(SubjectPublicKeyInfo) of type X25519 (what the SDK and web client make) or ECDH
P-256 (for WebCrypto clients without X25519); it must parse with `cryptography`,
anything else is InvalidInput. The stored PEM is the re-serialized key, so what others
fetch is canonical.

- register: insert or replace (userId, deviceId); a replacement is audited as
  `keys.replace` (a changed key is what a key-substitution attack looks like),
  a first registration as `keys.register`.
- any authenticated user may read any user's keys (senders need every device of
  every recipient);
- a user may delete only their own devices (the route takes no userId at all).
- `touch` records `lastUsedAt` when a device fetches its messages.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from securecollab.ids import new_id, now_ms
from securecollab.services.audit import AuditService
from securecollab.services.errors import InvalidInput, NotFoundError
from securecollab.store import DeviceKeyRecord, Store

MAX_PEM_CHARS = 4096
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")


def key_json(k: DeviceKeyRecord) -> dict[str, Any]:
    """The client-facing shape of one device key."""
    return {
        "bundleId": k.bundle_id,
        "userId": k.user_id,
        "deviceId": k.device_id,
        "publicKey": k.public_key,
        "registeredAt": k.registered_at,
        "lastUsedAt": k.last_used_at,
    }


def check_device_id(device_id: object) -> str:
    """A device id: 1..128 of letters, digits and . _ : @ + - ; InvalidInput otherwise."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise InvalidInput("deviceId must be 1..128 characters of letters, digits and . _ : @ + -")
    return device_id


def canonical_public_key(pem: object) -> str:
    """Parse a PEM public key (X25519 or P-256) and return its canonical PEM text."""
    if not isinstance(pem, str) or not pem.strip():
        raise InvalidInput("publicKey must be a PEM string")
    if len(pem) > MAX_PEM_CHARS:
        raise InvalidInput(f"publicKey is longer than {MAX_PEM_CHARS} characters")
    try:
        key = serialization.load_pem_public_key(pem.strip().encode())
    except (ValueError, TypeError, UnicodeError):
        raise InvalidInput("publicKey is not a parseable PEM public key") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for unknown key types
        raise InvalidInput("publicKey is of an unsupported type") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidInput("publicKey: only X25519 and P-256 keys are accepted")
    elif not isinstance(key, x25519.X25519PublicKey):
        raise InvalidInput("publicKey: only X25519 and P-256 keys are accepted")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


class KeyService:
    """Register, read, delete and touch device public keys."""

    def __init__(self, store: Store, audit: AuditService) -> None:
        self.store = store
        self.audit = audit

    async def register(
        self, user_id: str, payload: object, *, ip: str | None = None
    ) -> DeviceKeyRecord:
        """Register (or replace) the caller's device key: payload {deviceId, publicKey}."""
        if not isinstance(payload, dict):
            raise InvalidInput("the request must be a JSON object")
        device_id = check_device_id(payload.get("deviceId"))
        pem = canonical_public_key(payload.get("publicKey"))
        stored, replaced = await self.store.upsert_device_key(
            DeviceKeyRecord(
                bundle_id=new_id(),
                user_id=user_id,
                device_id=device_id,
                public_key=pem,
                registered_at=now_ms(),
            )
        )
        await self.audit.record(
            user_id,
            "keys.replace" if replaced else "keys.register",
            f"{user_id}/{device_id}",
            ip,
            {"deviceId": device_id, "bundleId": stored.bundle_id},
        )
        return stored

    async def get(self, user_id: str, device_id: str) -> DeviceKeyRecord:
        """One device's key; NotFoundError when the user or device has none."""
        user = await self.store.get_user(user_id)
        key = await self.store.get_device_key(user.user_id, device_id) if user else None
        if key is None:
            raise NotFoundError(f"no key for device {device_id} of {user_id}")
        return key

    async def list(self, user_id: str) -> list[DeviceKeyRecord]:
        """All of a user's device keys; NotFoundError for an unknown user."""
        user = await self.store.get_user(user_id)
        if user is None or user.deleted_at is not None:
            raise NotFoundError(f"user {user_id} does not exist")
        return await self.store.list_device_keys(user.user_id)

    async def delete(self, user_id: str, device_id: str, *, ip: str | None = None) -> None:
        """Delete one of the caller's own devices; NotFoundError if it has no such device."""
        if not await self.store.delete_device_key(user_id, device_id):
            raise NotFoundError(f"you have no device {device_id}")
        await self.audit.record(
            user_id, "keys.delete", f"{user_id}/{device_id}", ip, {"deviceId": device_id}
        )

    async def touch(self, user_id: str, device_id: str | None) -> None:
        """Record that `device_id` fetched its messages now (no-op without a device)."""
        if device_id:
            await self.store.touch_device_key(user_id, device_id, now_ms())
