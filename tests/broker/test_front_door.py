"""The HTTP port's front door (`transport/front.py`): routing, RFC 6455 details, ordering."""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Sequence

import pytest
import trio
from prometheus_client import REGISTRY
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

import stomp
from securecollab.backplane import Delivery
from securecollab.broker.session import Outbound

from .harness import BrokerServer, broker_server


class RawWs:
    """A wsproto client on a plain trio socket: frames exactly as a test wants them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[object] = []
        self.text = ""

    async def handshake(self, prefix: bytes = b"", first: bytes = b"") -> AcceptConnection:
        req = self.ws.send(Request(host="x", target="/ws", subprotocols=["v12.stomp"]))
        await self.stream.send_all(prefix + req + first)
        events = await self.next_events()
        event = events.pop(0)
        if not isinstance(event, AcceptConnection):
            raise AssertionError(f"handshake answered with {event!r}")
        # the server may answer the first frame in the same read as the 101 (when it
        # came in the upgrade's packet): keep what followed the acceptance
        self.events = events
        return event

    async def next_events(self) -> list[object]:
        if self.events:
            events, self.events = self.events, []
            return events
        with trio.fail_after(5):
            while True:
                events = list(self.ws.events())
                if events:
                    return events
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def frames(self, count: int) -> list[str]:
        """The next `count` STOMP frames (one per WebSocket message, checked)."""
        out: list[str] = []
        part = ""
        while len(out) < count:
            for event in await self.next_events():
                assert isinstance(event, TextMessage | BytesMessage), event
                part += event.data if isinstance(event.data, str) else event.data.decode()
                if not event.message_finished:
                    continue  # wsproto hands over what has arrived so far
                data, part = part, ""
                if data == "\n":
                    continue  # heart-beat
                assert data.endswith("\x00") and data.count("\x00") == 1
                out.append(data)
        return out


async def open_raw(port: int) -> RawWs:
    return RawWs(await trio.open_tcp_stream("127.0.0.1", port))


CONNECT = "CONNECT\naccept-version:1.2\nhost:x\npasscode:token-alice\n\n\x00"


async def http_get(stream: trio.SocketStream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    with trio.fail_after(5):
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head


async def test_http_requests_go_to_the_http_app(server: BrokerServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    head = await http_get(stream, "/nothing-here")
    assert head.startswith(b"HTTP/1.1 404")
    head = await http_get(stream, "/ws-not-quite")  # keep-alive, a path that starts alike
    assert head.startswith(b"HTTP/1.1 404")
    await stream.aclose()


async def test_upgrade_after_a_keep_alive_request_reaches_the_asgi_door(
    server: BrokerServer,
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    assert (await http_get(stream, "/nothing-here")).startswith(b"HTTP/1.1 404")
    c = RawWs(stream)
    accepted = await c.handshake()
    assert accepted.subprotocol == "v12.stomp"
    await c.send_text(CONNECT)
    assert (await c.frames(1))[0].startswith("CONNECTED\n")


async def test_first_frame_in_the_same_packet_as_the_upgrade(server: BrokerServer) -> None:
    c = await open_raw(server.http_port)
    # masked by hand: the frame follows the request head in the same write
    key = os.urandom(4)
    payload = CONNECT.encode()
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    frame = bytes((0x81, 0x80 | len(payload))) + key + masked
    await c.handshake(first=frame)
    assert (await c.frames(1))[0].startswith("CONNECTED\n")


async def test_ping_is_answered_with_pong_and_close_is_echoed(server: BrokerServer) -> None:
    c = await open_raw(server.http_port)
    await c.handshake()
    await c.send_text(CONNECT)
    await c.frames(1)
    await c.stream.send_all(c.ws.send(Ping(payload=b"are you there")))
    events = await c.next_events()
    assert any(isinstance(e, Pong) and e.payload == b"are you there" for e in events)
    await c.stream.send_all(c.ws.send(CloseConnection(code=4000, reason="bye")))
    events = await c.next_events()
    assert any(isinstance(e, CloseConnection) and e.code == 4000 for e in events)


async def test_unmasked_client_frame_closes_with_1002(server: BrokerServer) -> None:
    c = await open_raw(server.http_port)
    await c.handshake()
    await c.stream.send_all(bytes((0x81, len(CONNECT))) + CONNECT.encode())  # no mask bit
    data = b""
    with trio.fail_after(5):
        while len(data) < 4:
            chunk = await c.stream.receive_some(100)
            if not chunk:
                break
            data += chunk
    assert data[0] == 0x88  # a close frame
    assert struct.unpack("!H", data[2:4])[0] == 1002


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ],
)
async def test_malformed_http_gets_a_json_400(server: BrokerServer, request_bytes: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    await stream.send_all(request_bytes)
    data = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:80]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert error["error"] == "bad_request" and error["detail"]


async def test_malformed_upgrade_is_answered_by_the_http_server(server: BrokerServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"  # no Sec-WebSocket-Key
    )
    with trio.fail_after(5):
        data = await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 4"), data[:80]


async def test_a_15_byte_key_is_not_an_upgrade() -> None:
    # the front door takes only 16-byte keys; hypercorn (behind it) is laxer and accepts
    # this one through the ASGI door: either way the client gets an answer
    async with broker_server() as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.http_port)
        key = base64.b64encode(os.urandom(15)).decode()
        await stream.send_all(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 "), data[:80]


@pytest.mark.parametrize("write_pass", [True, False], ids=["write-pass", "direct"])
async def test_a_reader_that_stalls_gets_every_frame_in_order(write_pass: bool) -> None:
    # big messages fill the socket buffers: direct writes stop part-way, the rest is
    # buffered and written later, strictly in order, none lost or duplicated
    count, size = 300, 20_000
    async with broker_server(outbound_queue_bytes=64 * 1024 * 1024, write_pass=write_pass) as srv:
        c = await open_raw(srv.http_port)
        await c.handshake()
        await c.send_text(CONNECT)
        await c.frames(1)
        await c.send_text("SUBSCRIBE\ndestination:/user/queue/big\nid:0\nreceipt:s\n\n\x00")
        assert (await c.frames(1))[0].startswith("RECEIPT\n")
        for i in range(count):
            body = f"{i:06d}".encode() + b"x" * size
            await srv.backplane.publish(Delivery("user", "/user/queue/big", body, (), "alice"))
        await trio.sleep(0.2)  # the server has written what the kernel takes by now
        frames = await c.frames(count)
        seen = [int(f.split("\n\n", 1)[1][:6]) for f in frames]
        assert seen == list(range(count))


@pytest.mark.parametrize("write_pass", [True, False], ids=["write-pass", "direct"])
async def test_frames_queued_in_one_pass_share_one_send(write_pass: bool) -> None:
    # with the broker's write pass, frames a connection gets in one scheduler pass go
    # out in one send(); without it, each is written by the task that produced it
    async with broker_server(write_pass=write_pass) as srv:
        c = await open_raw(srv.http_port)
        await c.handshake()
        await c.send_text(CONNECT)
        await c.frames(1)
        (session,) = srv.broker.sessions.values()
        send_nowait = session._send_nowait
        assert send_nowait is not None
        calls: list[int] = []

        def counting(items: Sequence[Outbound]) -> bool:
            calls.append(len(items))
            return send_nowait(items)

        session._send_nowait = counting
        writes = REGISTRY.get_sample_value("securecollab_stomp_writes_total") or 0.0
        for i in range(3):
            assert session.push_frame(stomp.Frame("RECEIPT", (("receipt-id", f"r{i}"),)))
        frames = await c.frames(3)
        assert [f.split("\n")[1] for f in frames] == [
            "receipt-id:r0",
            "receipt-id:r1",
            "receipt-id:r2",
        ]
        assert calls == ([3] if write_pass else [1, 1, 1])
        assert REGISTRY.get_sample_value("securecollab_stomp_writes_total") == writes + len(calls)
