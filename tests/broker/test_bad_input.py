"""Every bad input gets one ERROR with a precise message, then close; others keep working."""

from __future__ import annotations

import pytest

from .clients import tcp_client
from .harness import BrokerServer

CONNECT = b"CONNECT\naccept-version:1.2\nhost:x\npasscode:token-alice\n\n\x00"

CASES = [
    # (bytes after CONNECT, or None for "no CONNECT first"), expected message part, receipt-id
    (b"SEND\ndestination:/queue/a\n\nhi\x00", "expected CONNECT, got SEND", None, False),
    (CONNECT, "already connected", None, True),
    (b"FLY\nreceipt:r1\n\n\x00", "Unknown command 'FLY'", None, True),
    (b"SEND\nreceipt:r1\n\nx\x00", "SEND frame needs a 'destination' header", None, True),
    (b"SUBSCRIBE\ndestination:/queue/a\n\n\x00", "SUBSCRIBE frame needs a 'id' header", None, True),
    (
        b"SUBSCRIBE\ndestination:/queue/a\nid:1\nack:sometimes\n\n\x00",
        "ack must be auto, client or client-individual",
        None,
        True,
    ),
    (b"ACK\nid:nope\nreceipt:r2\n\n\x00", "ACK of unknown id nope", "r2", True),
    (b"NACK\nid:nope\n\n\x00", "NACK of unknown id nope", None, True),
    (b"COMMIT\ntransaction:t9\nreceipt:r3\n\n\x00", "COMMIT of unknown transaction t9", "r3", True),
    (b"ABORT\ntransaction:t9\n\n\x00", "ABORT of unknown transaction t9", None, True),
    (b"SEND\ndestination:/queue/a\ntransaction:t9\n\nx\x00", "unknown transaction t9", None, True),
    (
        b"BEGIN\ntransaction:t\n\n\x00BEGIN\ntransaction:t\n\n\x00",
        "transaction t already started",
        None,
        True,
    ),
    (b"UNSUBSCRIBE\nid:42\n\n\x00", "no subscription with id 42", None, True),
    (
        b"SUBSCRIBE\ndestination:/queue/a\nid:1\n\n\x00SUBSCRIBE\ndestination:/queue/b\nid:1\n\n\x00",
        "subscription id 1 is already in use",
        None,
        True,
    ),
    (
        b"SEND\ndestination:/nowhere\nreceipt:r4\n\nx\x00",
        "unknown destination /nowhere",
        "r4",
        True,
    ),
    (b"SEND\ndestination:/queue/../etc\n\nx\x00", "invalid destination /queue/../etc", None, True),
    (
        b"SEND\ndestination:/app/nothing-here\n\nx\x00",
        "no handler for /app/nothing-here",
        None,
        True,
    ),
    (
        b"SUBSCRIBE\ndestination:/app/chat/send\nid:1\n\n\x00",
        "cannot subscribe to /app/chat/send",
        None,
        True,
    ),
    (
        b"SUBSCRIBE\ndestination:/user/queue/\nid:1\n\n\x00",
        "invalid user destination /user/queue/",
        None,
        True,
    ),
    (
        b"SUBSCRIBE\ndestination:/queue/a\nid:1\n\nbody\x00",
        "SUBSCRIBE frame must not have a body",
        None,
        True,
    ),
    (
        b"SEND\ndestination:/queue/a\ncontent-length:5\n\nabcdefg\x00",
        "No NUL after the 5-byte body",
        None,
        True,
    ),
    (
        b"SEND\ndestination:/queue/a\nbroken header\n\nx\x00",
        "Header line 2 is not 'name:value'",
        None,
        True,
    ),
    (b"SEND\ndestination:/queue/a\nx:\\q\n\nx\x00", "Undefined escape sequence", None, True),
    (
        b"SEND\ndestination:/queue/a\n\n" + b"x" * 200_000 + b"\x00",
        "exceeds the limit of 102400 bytes",
        None,
        True,
    ),
    (
        b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(100)) + b"\n\x00",
        "more than 64 headers",
        None,
        True,
    ),
]


@pytest.mark.parametrize(
    ("data", "message", "receipt", "connect_first"), CASES, ids=[c[1][:40] for c in CASES]
)
async def test_bad_input_gets_error_then_close(
    server: BrokerServer, data: bytes, message: str, receipt: str | None, connect_first: bool
) -> None:
    async with tcp_client(server.tcp_port) as witness, tcp_client(server.tcp_port) as c:
        await witness.connect(passcode="token-bob")
        await witness.subscribe("/topic/witness")
        if connect_first:
            assert (await c.connect(passcode="token-alice")).command == "CONNECTED"
        await c.send_raw(data)
        err = await c.expect_error(message)
        assert err.get("receipt-id") == receipt
        assert err.body  # a human-readable detail
        # the server and other sessions are unaffected
        async with tcp_client(server.tcp_port) as p:
            await p.connect(passcode="token-carol")
            await p.receipt("SEND", {"destination": "/topic/witness"}, "still here")
        assert (await witness.next("MESSAGE")).body == b"still here"
