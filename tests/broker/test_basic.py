"""Smoke: connect, subscribe, send, receive over TCP and WebSocket."""

from __future__ import annotations

from .clients import tcp_client, ws_client
from .harness import BrokerServer


async def test_tcp_topic_roundtrip(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as a, tcp_client(server.tcp_port) as b:
        c = await a.connect(passcode="token-alice")
        assert c.command == "CONNECTED", c
        assert c.get("version") == "1.2"
        assert c.get("user-name") == "alice"
        await b.connect(passcode="token-bob")
        await b.subscribe("/topic/news")
        await a.receipt(
            "SEND", {"destination": "/topic/news", "content-type": "text/plain"}, "hello"
        )
        m = await b.next("MESSAGE")
        assert m.body == b"hello"
        assert m.get("destination") == "/topic/news"
        assert m.get("subscription") == "0"
        assert m.get("content-type") == "text/plain"
        assert m.get("content-length") == "5"


async def test_ws_topic_roundtrip(server: BrokerServer) -> None:
    async with ws_client(server.http_port) as a, ws_client(server.http_port) as b:
        assert (await a.connect(passcode="token-alice")).command == "CONNECTED"
        assert (await b.connect(passcode="token-bob")).command == "CONNECTED"
        await b.subscribe("/topic/news")
        await a.receipt("SEND", {"destination": "/topic/news"}, "hi")
        m = await b.next("MESSAGE")
        assert m.body == b"hi"
