"""End-to-end encryption of chat messages: the `securecollab-e2ee-v1` envelope.

The exact format (byte layouts, associated data, HKDF parameters) is written down in
`ENVELOPE.md` beside this file; `tests/vectors/e2ee.json` pins it with test vectors.
In short:

- the body is encrypted with AES-256-GCM under a fresh random 256-bit message key and
  a fresh 96-bit nonce (`iv`); the associated data binds sender, recipient (or
  channel) and `clientMessageId`;
- the message key is wrapped for every device that may read the message with an
  ECIES-style box: a fresh ephemeral X25519 key per wrap, ECDH with the device's
  public key, HKDF-SHA256, AES-256-GCM;
- `keys` maps "userId/deviceId" to base64 of the wrapped key, because two users may
  both own a device called "laptop".

Pure functions, no I/O. Randomness comes from `rng` (default `os.urandom`) so test
vectors can be reproduced; never pass a deterministic `rng` in production.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LABEL = b"securecollab-e2ee-v1"
WRAP_VERSION = 0x01  # first byte of every wrapped key
HKDF_SALT = b"securecollab-e2ee-v1/key-wrap"
HKDF_INFO_LABEL = b"securecollab-e2ee-v1/wrap-key"
MESSAGE_KEY_LEN = 32
NONCE_LEN = 12
X25519_LEN = 32
TAG_LEN = 16
WRAPPED_KEY_LEN = 1 + X25519_LEN + NONCE_LEN + MESSAGE_KEY_LEN + TAG_LEN  # 93 bytes

# Device ids never contain "/", so "userId/deviceId" splits unambiguously at the last "/".
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")

Rng = Callable[[int], bytes]


class DecryptionError(Exception):
    """A message could not be decrypted; `reason` is a stable code, str() says what happened.

    Reasons: "malformed" (bad shape, base64 or lengths), "no-key-for-device" (the
    message was not encrypted for this device), "key-unwrap-failed" (wrapped key
    tampered with, or made for another key of this device id), "content-auth-failed"
    (ciphertext, iv, sender, recipient or clientMessageId altered), "not-utf8".
    A caller must never display the undecryptable bytes as text.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_device_id(device_id: str) -> str:
    """Return `device_id` if usable in a key id: 1-128 of [A-Za-z0-9._:@+-], no "/"."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-128 characters of A-Z a-z 0-9 . _ : @ + -"
        )
    return device_id


def device_key_id(user_id: str, device_id: str) -> str:
    """The key of a device in an envelope's `keys` map: "userId/deviceId"."""
    if not user_id:
        raise ValueError("user id must not be empty")
    return f"{user_id}/{check_device_id(device_id)}"


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648 section 4) with padding, as text."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 with padding; DecryptionError("malformed") otherwise."""
    if not isinstance(text, str):
        raise DecryptionError("malformed", f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecryptionError("malformed", f"{what} is not valid base64") from None


def public_key_from_pem(pem: str | bytes) -> X25519PublicKey:
    """Parse a SubjectPublicKeyInfo PEM that must hold an X25519 key; ValueError otherwise."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"public key is {type(key).__name__}, not X25519")
    return key


def public_key_to_pem(key: X25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC KEY-----") of an X25519 public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class DeviceKey:
    """One device's identity: its owner, its id and its X25519 key pair (secret!)."""

    user_id: str
    device_id: str
    private_key: X25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        device_key_id(self.user_id, self.device_id)  # validates both

    @classmethod
    def generate(cls, user_id: str, device_id: str) -> DeviceKey:
        """A new device identity with a fresh key pair from the OS's CSPRNG."""
        return cls(user_id, device_id, X25519PrivateKey.generate())

    @property
    def public_key(self) -> X25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        """This device's key in an envelope's `keys` map ("userId/deviceId")."""
        return device_key_id(self.user_id, self.device_id)

    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM, as `POST /api/keys/register` takes it."""
        return public_key_to_pem(self.public_key)

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (for the key store only)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def recipient(self) -> RecipientDevice:
        """This device as an encryption target (to include the sender's own devices)."""
        return RecipientDevice(self.user_id, self.device_id, self.public_key)


@dataclass(frozen=True)
class RecipientDevice:
    """A device a message key is wrapped for: owner, device id and public key."""

    user_id: str
    device_id: str
    public_key: X25519PublicKey

    @classmethod
    def from_pem(cls, user_id: str, device_id: str, pem: str | bytes) -> RecipientDevice:
        """Build from the key directory's PEM; ValueError if it is not an X25519 key."""
        return cls(user_id, device_id, public_key_from_pem(pem))

    @property
    def key_id(self) -> str:
        return device_key_id(self.user_id, self.device_id)


# ---------------------------------------------------------------- associated data


def _lp(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def associated_data(
    sender: str, *, to: str | None = None, channel_id: str | None = None, client_message_id: str
) -> bytes:
    """The AES-GCM associated data of a message (both body and wrapped keys use it).

    Five length-prefixed fields (4-byte big-endian length, then the bytes; text as
    UTF-8): "securecollab-e2ee-v1", "direct" or "channel", sender userId, recipient
    userId or channelId, clientMessageId.
    """
    if (to is None) == (channel_id is None):
        raise ValueError("exactly one of `to` and `channel_id` must be given")
    if not sender:
        raise ValueError("sender must not be empty")
    if not client_message_id:
        raise ValueError("client_message_id must not be empty")
    kind, target = ("direct", to) if to is not None else ("channel", channel_id)
    assert target is not None
    return b"".join(_lp(f) for f in (VERSION_LABEL, kind, sender, target, client_message_id))


# ---------------------------------------------------------------- key wrapping


def _wrap_key_kek(shared: bytes, eph_public: bytes, recipient_public: bytes, key_id: str) -> bytes:
    info = HKDF_INFO_LABEL + _lp(key_id) + eph_public + recipient_public
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=info).derive(shared)


def wrap_message_key(
    message_key: bytes,
    device: RecipientDevice,
    ad: bytes,
    *,
    ephemeral: X25519PrivateKey,
    nonce: bytes,
) -> bytes:
    """Wrap a 32-byte message key for one device; returns the 93-byte wrapped key.

    Layout: 0x01 | ephemeral public key (32) | nonce (12) | AES-256-GCM(kek, nonce,
    message_key, ad) (32 + 16-byte tag), with kek = HKDF-SHA256(X25519(ephemeral,
    device), salt, info binding key id, ephemeral and device public keys).
    """
    if len(message_key) != MESSAGE_KEY_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("message key must be 32 bytes and nonce 12 bytes")
    eph_pub = _raw_public(ephemeral.public_key())
    rcpt_pub = _raw_public(device.public_key)
    try:
        shared = ephemeral.exchange(device.public_key)
    except ValueError:  # all-zero shared secret: a small-order public key
        raise ValueError(f"public key of device {device.key_id!r} is invalid") from None
    kek = _wrap_key_kek(shared, eph_pub, rcpt_pub, device.key_id)
    return bytes([WRAP_VERSION]) + eph_pub + nonce + AESGCM(kek).encrypt(nonce, message_key, ad)


def unwrap_message_key(wrapped: bytes, device: DeviceKey, ad: bytes) -> bytes:
    """Recover the message key from a wrapped key made for `device`; DecryptionError if not."""
    if len(wrapped) != WRAPPED_KEY_LEN:
        raise DecryptionError(
            "malformed", f"wrapped key is {len(wrapped)} bytes, expected {WRAPPED_KEY_LEN}"
        )
    if wrapped[0] != WRAP_VERSION:
        raise DecryptionError("malformed", f"unknown wrapped key version {wrapped[0]}")
    eph_pub = wrapped[1 : 1 + X25519_LEN]
    nonce = wrapped[1 + X25519_LEN : 1 + X25519_LEN + NONCE_LEN]
    ct = wrapped[1 + X25519_LEN + NONCE_LEN :]
    try:
        shared = device.private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise DecryptionError(
            "key-unwrap-failed", "wrapped key has an invalid ephemeral key"
        ) from None
    kek = _wrap_key_kek(shared, eph_pub, _raw_public(device.public_key), device.key_id)
    try:
        return AESGCM(kek).decrypt(nonce, ct, ad)
    except InvalidTag:
        raise DecryptionError(
            "key-unwrap-failed",
            f"the wrapped key for {device.key_id} failed authentication: it was altered, "
            "or it was made for another key of this device (re-registered?)",
        ) from None


# ---------------------------------------------------------------- messages


def encrypt_message(
    plaintext: bytes | str,
    *,
    sender: str,
    devices: Iterable[RecipientDevice],
    to: str | None = None,
    channel_id: str | None = None,
    client_message_id: str | None = None,
    rng: Rng = os.urandom,
) -> dict[str, Any]:
    """Encrypt a message for `devices`; returns the JSON-able envelope to send.

    `devices` must hold every device that may read the message: each recipient
    device (every member's devices for a channel) and the sender's own devices,
    the sending one included if it wants to read its sent messages in history later.
    Exactly one of `to` (a userId) and `channel_id` is given. `client_message_id`
    defaults to a random UUID; a retry of the same send must reuse it (idempotency).

    Randomness is drawn from `rng` in this order (the test vectors rely on it):
    message key (32), iv (12), then for each device in ascending order of key id:
    ephemeral private key (32), wrap nonce (12).

    Returns {"to" | "channelId", "encryptedContent", "iv", "keys", "clientMessageId"}.
    """
    if isinstance(plaintext, str):
        plaintext = plaintext.encode("utf-8")
    if client_message_id is None:
        client_message_id = str(uuid.uuid4())  # not from `rng`: keeps the documented draw order
    ad = associated_data(sender, to=to, channel_id=channel_id, client_message_id=client_message_id)
    targets: dict[str, RecipientDevice] = {}
    for d in devices:
        if d.key_id in targets:
            raise ValueError(f"device {d.key_id!r} listed twice")
        targets[d.key_id] = d
    if not targets:
        raise ValueError("no devices to encrypt for: nobody could read this message")
    message_key = rng(MESSAGE_KEY_LEN)
    iv = rng(NONCE_LEN)
    if len(message_key) != MESSAGE_KEY_LEN or len(iv) != NONCE_LEN:
        raise ValueError("rng returned the wrong number of bytes")
    body = AESGCM(message_key).encrypt(iv, plaintext, ad)
    keys: dict[str, str] = {}
    for key_id in sorted(targets):
        ephemeral = X25519PrivateKey.from_private_bytes(rng(X25519_LEN))
        wrapped = wrap_message_key(
            message_key, targets[key_id], ad, ephemeral=ephemeral, nonce=rng(NONCE_LEN)
        )
        keys[key_id] = b64encode(wrapped)
    envelope: dict[str, Any] = {"to": to} if to is not None else {"channelId": channel_id}
    envelope.update(
        encryptedContent=b64encode(body),
        iv=b64encode(iv),
        keys=keys,
        clientMessageId=client_message_id,
    )
    return envelope


def _field(envelope: Mapping[str, Any], name: str) -> Any:
    value = envelope.get(name)
    return None if value in (None, "") else value


def decrypt_message(
    envelope: Mapping[str, Any], device: DeviceKey, *, sender: str | None = None
) -> bytes:
    """Decrypt an envelope as received (MESSAGE body, history entry) with this device's key.

    The sender is `envelope["from"]` (set by the server from the authenticated session)
    unless `sender` is given (e.g. for an envelope this client built itself).
    Raises DecryptionError (see its reasons); never returns unauthenticated bytes.
    """
    if not isinstance(envelope, Mapping):
        raise DecryptionError("malformed", "envelope is not a JSON object")
    sender = sender if sender is not None else _field(envelope, "from")
    to, channel_id = _field(envelope, "to"), _field(envelope, "channelId")
    cmid = _field(envelope, "clientMessageId")
    if not isinstance(sender, str):
        raise DecryptionError("malformed", "envelope has no sender ('from')")
    if (to is None) == (channel_id is None) or not isinstance(to or channel_id, str):
        raise DecryptionError("malformed", "envelope must have exactly one of 'to' and 'channelId'")
    if not isinstance(cmid, str):
        raise DecryptionError(
            "malformed", "envelope has no clientMessageId (bound into the encryption)"
        )
    ad = associated_data(sender, to=to, channel_id=channel_id, client_message_id=cmid)
    iv = b64decode(envelope.get("iv"), "iv")  # type: ignore[arg-type]
    if len(iv) != NONCE_LEN:
        raise DecryptionError("malformed", f"iv is {len(iv)} bytes; securecollab-e2ee-v1 uses 12")
    body = b64decode(envelope.get("encryptedContent"), "encryptedContent")  # type: ignore[arg-type]
    if len(body) < TAG_LEN:
        raise DecryptionError("malformed", "encryptedContent is shorter than a GCM tag")
    keys = envelope.get("keys")
    if not isinstance(keys, Mapping):
        raise DecryptionError(
            "no-key-for-device", f"message carries no keys; {device.key_id} cannot read it"
        )
    wrapped_b64 = keys.get(device.key_id)
    if wrapped_b64 is None:
        raise DecryptionError(
            "no-key-for-device",
            f"message was not encrypted for device {device.key_id} "
            "(sent before this device was registered, or the sender did not know it)",
        )
    message_key = unwrap_message_key(b64decode(wrapped_b64, f"keys[{device.key_id}]"), device, ad)
    try:
        return AESGCM(message_key).decrypt(iv, body, ad)
    except InvalidTag:
        raise DecryptionError(
            "content-auth-failed",
            "message content failed authentication: ciphertext, iv, sender, recipient "
            "or clientMessageId was altered",
        ) from None


def decrypt_text(
    envelope: Mapping[str, Any], device: DeviceKey, *, sender: str | None = None
) -> str:
    """`decrypt_message` for text messages: the plaintext as UTF-8 text."""
    data = decrypt_message(envelope, device, sender=sender)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError("not-utf8", "decrypted message is not UTF-8 text") from None
