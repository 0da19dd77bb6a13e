"""The E2EE message envelope: shape checks on what a client sends, nothing more.

The server never decrypts; it only checks that an envelope is well formed so that
nothing else (and certainly no plaintext) is stored. Both doors (REST
`POST /api/chat/send-message` and STOMP `SEND /app/chat/send`) hand the parsed JSON
object to `parse_envelope`.

Accepted fields (any other field is refused, so nothing unchecked is ever stored):

- exactly one of `to` (recipient userId) or `channelId`;
- `encryptedContent`: standard base64, decoded size 1..max_content_bytes
  (`[messages] max_content_bytes`, default 64 KiB);
- `iv`: standard base64 of exactly 12 or 16 bytes;
- `keys` (optional): object key id -> standard base64 wrapped message key, at most
  `MAX_KEYS` entries; a key id ("userId/deviceId" in the SDK's format) is at most
  `MAX_KEY_ID_CHARS` characters; each
  wrapped key 1..`MAX_WRAPPED_KEY_BYTES` bytes decoded;
- `clientMessageId` (optional): 1..`MAX_CLIENT_MESSAGE_ID_CHARS` characters; a retry
  with the same value from the same sender returns the original message.

A plaintext field (`content`, `plaintext`, `text`, `message`, `body`) is refused with
"plaintext is not accepted".
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

from securecollab.records import record
from securecollab.services.errors import InvalidInput

MAX_KEYS = 256  # devices a message key may be wrapped for (recipients' + sender's)
MAX_KEY_ID_CHARS = 450  # the SDK's "userId/deviceId" (320 + 1 + 128), or a bare deviceId
MAX_WRAPPED_KEY_BYTES = 1024  # an X25519/P-256 wrap is ~100 bytes; this leaves room for others
MAX_CLIENT_MESSAGE_ID_CHARS = 128
MAX_USER_ID_CHARS = 320  # an e-mail address at most
MAX_CHANNEL_ID_CHARS = 64
IV_SIZES = (12, 16)

PLAINTEXT_FIELDS = frozenset({"content", "plaintext", "text", "message", "body"})
KNOWN_FIELDS = frozenset({"to", "channelId", "encryptedContent", "iv", "keys", "clientMessageId"})
_IV_CHARS = 4 * ((max(IV_SIZES) + 2) // 3)  # base64 text length of the largest iv
_WRAPPED_KEY_CHARS = 4 * ((MAX_WRAPPED_KEY_BYTES + 2) // 3)
_a2b_base64 = binascii.a2b_base64


@record  # built per message: not frozen at runtime (see securecollab.records)
class Envelope:
    """A validated envelope; base64 fields keep the exact text the client sent."""

    to: str | None
    channel_id: str | None
    encrypted_content: str
    iv: str
    keys: dict[str, str]
    client_message_id: str | None


def _b64_size(value: object, field: str, max_bytes: int, key: str | None = None) -> int:
    """Decoded byte length of a standard-base64 string; InvalidInput when it is not one.

    `key`: the entry of `field` being checked (named in the error as `field[key]`).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{_name(field, key)} must be a base64 string")
    # Reject by encoded length first so an oversize value is never decoded.
    if len(value) > 4 * ((max_bytes + 2) // 3):
        raise InvalidInput(f"{_name(field, key)} is larger than {max_bytes} bytes")
    try:
        # strict_mode: the same refusals as `base64.b64decode(validate=True)` (characters
        # outside the alphabet, misplaced or missing padding) without its regex pass
        size = len(binascii.a2b_base64(value, strict_mode=True))
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII str
        raise InvalidInput(f"{_name(field, key)} is not valid base64") from None
    if size > max_bytes:
        raise InvalidInput(f"{_name(field, key)} is larger than {max_bytes} bytes")
    return size


def _name(field: str, key: str | None) -> str:
    return field if key is None else f"{field}[{key}]"


def _optional_str(obj: Mapping[str, Any], field: str, max_chars: int) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} must be a non-empty string")
    if len(value) > max_chars:
        raise InvalidInput(f"{field} is longer than {max_chars} characters")
    return value


def parse_envelope(obj: object, *, max_content_bytes: int) -> Envelope:
    """Validate a decoded JSON value as a message envelope; raise InvalidInput with the reason."""
    if type(obj) is dict and obj.keys() <= KNOWN_FIELDS:
        env = _well_formed(obj, max_content_bytes)
        if env is not None:
            return env
    return _checked(obj, max_content_bytes)


def _b64_len(value: object, max_chars: int) -> int:
    """Decoded size of `value` if it is standard base64 of at most `max_chars`, else -1."""
    if type(value) is not str or len(value) > max_chars:
        return -1
    try:
        return len(_a2b_base64(value, strict_mode=True))
    except (binascii.Error, ValueError):
        return -1


def _well_formed(obj: dict[str, Any], max_content_bytes: int) -> Envelope | None:
    """The envelope when `obj` (a dict of known fields) passes every check; else None, and
    `_checked` finds the reason.

    Why: every message goes through here. The same checks as `_checked`, each a yes/no
    with no message to build, in one pass over the fields (~2 us less per message). It
    only ever accepts what `_checked` accepts, with the same result (a test compares both).
    """
    get = obj.get
    to = get("to")
    channel_id = get("channelId")
    if to is None:
        if (
            type(channel_id) is not str
            or len(channel_id) > MAX_CHANNEL_ID_CHARS
            or not channel_id.strip()
        ):
            return None
    elif channel_id is not None or (
        type(to) is not str or len(to) > MAX_USER_ID_CHARS or not to.strip()
    ):
        return None
    cmid = get("clientMessageId")
    if cmid is not None and (
        type(cmid) is not str or len(cmid) > MAX_CLIENT_MESSAGE_ID_CHARS or not cmid.strip()
    ):
        return None
    content = get("encryptedContent")
    size = _b64_len(content, 4 * ((max_content_bytes + 2) // 3))
    if size <= 0 or size > max_content_bytes:
        return None
    iv = get("iv")
    if _b64_len(iv, _IV_CHARS) not in IV_SIZES:
        return None
    keys_in = get("keys")
    if keys_in is None:
        keys: dict[str, str] = {}
    else:
        if type(keys_in) is not dict or len(keys_in) > MAX_KEYS:
            return None
        for key_id, wrapped in keys_in.items():
            if type(key_id) is not str or not key_id or len(key_id) > MAX_KEY_ID_CHARS:
                return None
            size = _b64_len(wrapped, _WRAPPED_KEY_CHARS)
            if size <= 0 or size > MAX_WRAPPED_KEY_BYTES:
                return None
        keys = keys_in.copy()
    # content and iv are str: _b64_len said so (mypy cannot follow it)
    return Envelope(to, channel_id, content, iv, keys, cmid)  # type: ignore[arg-type]


def _checked(obj: object, max_content_bytes: int) -> Envelope:
    """`parse_envelope` field by field, raising InvalidInput with the first reason found."""
    if not isinstance(obj, Mapping):
        raise InvalidInput("the message must be a JSON object")
    if not obj.keys() <= KNOWN_FIELDS:  # plaintext fields are not known fields either
        if PLAINTEXT_FIELDS & obj.keys():
            raise InvalidInput(
                "plaintext is not accepted: send encryptedContent, iv and keys",
                code="plaintext_not_accepted",
            )
        unknown = sorted(str(k) for k in obj.keys() - KNOWN_FIELDS)
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")

    to = _optional_str(obj, "to", MAX_USER_ID_CHARS)
    channel_id = _optional_str(obj, "channelId", MAX_CHANNEL_ID_CHARS)
    if (to is None) == (channel_id is None):
        raise InvalidInput("exactly one of to or channelId is required")

    if "encryptedContent" not in obj:
        raise InvalidInput("encryptedContent is required")
    if _b64_size(obj["encryptedContent"], "encryptedContent", max_content_bytes) == 0:
        raise InvalidInput("encryptedContent is empty")

    if "iv" not in obj:
        raise InvalidInput("iv is required")
    if _b64_size(obj["iv"], "iv", max(IV_SIZES)) not in IV_SIZES:
        raise InvalidInput("iv must be 12 or 16 bytes")

    keys_in = obj.get("keys")
    keys: dict[str, str] = {}
    if keys_in is not None:
        if not isinstance(keys_in, Mapping):
            raise InvalidInput(
                "keys must be an object mapping a device key id to a base64 wrapped key"
            )
        if len(keys_in) > MAX_KEYS:
            raise InvalidInput(f"keys has more than {MAX_KEYS} entries")
        for key_id, wrapped in keys_in.items():
            if not isinstance(key_id, str) or not key_id or len(key_id) > MAX_KEY_ID_CHARS:
                raise InvalidInput(f"keys: a key id must be 1..{MAX_KEY_ID_CHARS} characters")
            if _b64_size(wrapped, "keys", MAX_WRAPPED_KEY_BYTES, key_id) == 0:
                raise InvalidInput(f"keys[{key_id}] is empty")
            keys[key_id] = wrapped

    return Envelope(
        to=to,
        channel_id=channel_id,
        encrypted_content=obj["encryptedContent"],
        iv=obj["iv"],
        keys=keys,
        client_message_id=_optional_str(obj, "clientMessageId", MAX_CLIENT_MESSAGE_ID_CHARS),
    )
