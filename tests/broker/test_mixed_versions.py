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


async def test_one_fan_out_gives_each_subscriber_its_own_subscription_and_ack_headers(
    server: BrokerServer,
) -> None:
    # a fan-out encodes once per (version, subscription id, destination): subscribers
    # sharing those get the same bytes, the others their own ids; client-ack ones an ack id
    async with (
        tcp_client(server.tcp_port) as sender,
        tcp_client(server.tcp_port) as a,
        tcp_client(server.tcp_port) as b,
        tcp_client(server.tcp_port) as c,
        tcp_client(server.tcp_port, version="1.1") as d,
    ):
        await sender.connect(passcode="token-alice")
        await a.connect(passcode="token-bob")
        await b.connect(passcode="token-carol")
        await c.connect(passcode="token-dave")
        await d.connect({"accept-version": "1.1"}, passcode="token-bob@phone")
        await a.subscribe("/topic/shared", "s-1")
        await a.subscribe("/topic/shared", "s-2")
        await b.subscribe("/topic/shared", "s-1")
        await c.subscribe("/topic/shared", "s-1", ack="client")
        await d.subscribe("/topic/shared", "s-1")
        await sender.receipt("SEND", {"destination": "/topic/shared", "x-k": "v"}, "hi")
        frames = [await a.next("MESSAGE"), await a.next("MESSAGE")]
        frames += [await b.next("MESSAGE"), await c.next("MESSAGE"), await d.next("MESSAGE")]
        assert sorted(f.get("subscription") for f in frames[:2]) == ["s-1", "s-2"]
        assert [f.get("subscription") for f in frames[2:]] == ["s-1"] * 3
        assert len({f.get("message-id") for f in frames}) == 1
        for f in frames:
            assert f.body == b"hi" and f.get("x-k") == "v"
            assert f.get("destination") == "/topic/shared"
        assert c.frames == [] and frames[3].get("ack")  # client ack: its own ack id
        assert all(f.get("ack") is None for f in frames[:3] + frames[4:])
        await c.receipt("ACK", {"id": frames[3].get("ack")})
