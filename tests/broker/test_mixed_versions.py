"""A 1.2 sender's headers relayed to subscribers on older STOMP versions.

STOMP 1.0 escapes nothing (no CR/LF in a value, no ":" in a name) and 1.1 has no CR
escape. The broker adapts each relayed frame per recipient: CR/LF in values become
spaces, header names the version cannot write are dropped; subscribers on 1.2 get the
headers exactly as sent, and nothing else is affected (no crashed task, no closed
connection).
"""

from __future__ import annotations

import pytest

from .clients import tcp_client
from .harness import BrokerServer

# as a 1.2 client writes them on the wire: "\n" = LF, "\r" = CR, "\c" = ":"
RAW_SEND = (
    b"SEND\ndestination:%s\nreceipt:sent\n"
    b"x-note:line one\\nline two\\r\\nend\n"
    b"x\\cns:kept only where it can be written\n"
    b"plain:ok\n\nhello\x00"
)


@pytest.mark.parametrize("destination", ["/topic/mixed", "/queue/mixed"])
async def test_headers_a_subscriber_version_cannot_carry_are_adapted_per_recipient(
    server: BrokerServer, destination: str
) -> None:
    async with (
        tcp_client(server.tcp_port) as sender,
        tcp_client(server.tcp_port, version="1.0") as old,
        tcp_client(server.tcp_port, version="1.1") as mid,
        tcp_client(server.tcp_port) as new,
    ):
        await sender.connect(passcode="token-alice")
        await old.connect({"accept-version": "1.0"}, passcode="token-bob")
        await mid.connect({"accept-version": "1.1"}, passcode="token-carol")
        await new.connect(passcode="token-dave")
        for client in (old, mid, new):
            await client.subscribe(destination)
        # a queue has competing consumers: send one message per consumer
        copies = 3 if destination.startswith("/queue/") else 1
        for _ in range(copies):
            await sender.send_raw(RAW_SEND % destination.encode())
            assert (await sender.next("RECEIPT")).get("receipt-id") == "sent"
        got = {}
        for name, client in (("1.0", old), ("1.1", mid), ("1.2", new)):
            frame = await client.next("MESSAGE")
            assert frame.body == b"hello"
            got[name] = dict(frame.headers)
        assert got["1.2"]["x-note"] == "line one\nline two\r\nend"
        assert got["1.2"]["x:ns"] == "kept only where it can be written"
        assert got["1.1"]["x-note"] == "line one\nline two end"  # 1.1 escapes LF, not CR
        assert got["1.1"]["x:ns"] == "kept only where it can be written"
        assert got["1.0"]["x-note"] == "line one line two end"
        assert "x:ns" not in got["1.0"] and "x" not in got["1.0"]  # dropped, not mangled
        for headers in got.values():
            assert headers["plain"] == "ok"
        # everybody is still connected and served
        for client in (sender, old, mid, new):
            assert not client.closed.is_set()
        await sender.receipt("SEND", {"destination": destination}, "again")
        for client in (old, mid, new) if destination.startswith("/topic/") else (old,):
            assert (await client.next("MESSAGE")).body == b"again"
