"""The hand-written JSON of the send path is byte for byte what the JSON encoder writes."""

from __future__ import annotations

import base64
import json
import os

import pytest

from securecollab.services.envelope import parse_envelope
from securecollab.services.messages import (
    _compact_json,
    message_body,
    message_json,
    outbox_payload,
)
from securecollab.store import MessageRecord

ODD = [
    "plain",
    'quo"te',
    "back\\slash",
    "tab\tnew\nline\x00nul\x1f",
    "ünïcødé",
    "😀 astral",
    "</script>",
    "",
]


def record(i: int, *, channel: bool = False, cmid: str | None = "c") -> MessageRecord:
    s = ODD[i % len(ODD)]
    return MessageRecord(
        id=f"018f-{s}",
        sender_id=f"a{s}@example.com",
        recipient_id=None if channel else f"b{s}@example.com",
        channel_id=f"ch-{s}" if channel else None,
        encrypted_content="QUJD" + s,
        iv="AAAAAAAAAAAAAAAA",
        keys={f"k{s}/phone": "d3JhcA==", f"{s}": s, "x": ""} if i % 3 else {},
        created_at=1_764_150_000_000 + i,
        client_message_id=None if cmid is None else cmid + s,
    )


@pytest.mark.parametrize("i", range(len(ODD)))
@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize("cmid", ["c", None])
def test_message_body_is_the_compact_encoding_of_message_json(
    i: int, channel: bool, cmid: str | None
) -> None:
    m = record(i, channel=channel, cmid=cmid)
    assert message_body(m) == _compact_json(message_json(m)).encode()
    assert json.loads(message_body(m)) == message_json(m)


@pytest.mark.parametrize("i", range(len(ODD)))
@pytest.mark.parametrize("channel", [False, True])
def test_outbox_payload_is_the_compact_encoding_of_its_fields(i: int, channel: bool) -> None:
    m = record(i, channel=channel)
    fields = {
        "id": m.id,
        "from": m.sender_id,
        "to": m.recipient_id,
        "channelId": m.channel_id,
        "createdAt": m.created_at,
        "contentBytes": 300 + i,
    }
    assert outbox_payload(m, 300 + i) == _compact_json(fields).encode()


@pytest.mark.parametrize("i", range(len(ODD)))
@pytest.mark.parametrize("channel", [False, True])
def test_a_checked_envelope_body_is_the_same_bytes(i: int, channel: bool) -> None:
    """A send's own delivery quotes its base64 fields without the escaper: only fields
    that passed `parse_envelope` may be, and for them the bytes do not change."""
    s = ODD[i % len(ODD)]
    env = parse_envelope(
        {
            ("channelId" if channel else "to"): f"b{s}@example.com" if s.strip() else "b",
            "encryptedContent": base64.b64encode(os.urandom(40 + i)).decode(),
            "iv": base64.b64encode(os.urandom(12 if i % 2 else 16)).decode(),
            "keys": {f"k{s}/phone": base64.b64encode(os.urandom(1 + i)).decode(), s or "x": "+/=="},
            "clientMessageId": f"c{s}",
        },
        max_content_bytes=65536,
    )
    m = MessageRecord(
        id=f"018f-{s}",
        sender_id=f"a{s}@example.com",
        recipient_id=env.to,
        channel_id=env.channel_id,
        encrypted_content=env.encrypted_content,
        iv=env.iv,
        keys=env.keys,
        created_at=1_764_150_000_000 + i,
        client_message_id=env.client_message_id,
    )
    assert message_body(m, base64_checked=True) == message_body(m)
    assert message_body(m, base64_checked=True) == _compact_json(message_json(m)).encode()
