"""The hand-written JSON of the send path is byte for byte what the JSON encoder writes."""

from __future__ import annotations

import json

import pytest

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
