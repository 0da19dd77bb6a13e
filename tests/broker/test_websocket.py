"""STOMP over /ws: subprotocols, message framing both ways, shutdown."""

from __future__ import annotations

import trio
import trio_websocket

from securecollab.backplane import Delivery

from .clients import eventually, ws_client
from .harness import BrokerServer, broker_server


async def test_subprotocol_negotiation(server: BrokerServer) -> None:
    async with ws_client(server.http_port, subprotocols=["v10.stomp", "v11.stomp"]) as c:
        assert c.ws.subprotocol == "v11.stomp"
        assert (await c.connect({"accept-version": "1.1"}, passcode="token-alice")).get(
            "version"
        ) == "1.1"
    async with ws_client(server.http_port, subprotocols=[]) as c:  # offers none: CONNECT decides
        assert c.ws.subprotocol is None
        assert (await c.connect(passcode="token-alice")).get("version") == "1.2"


async def test_several_frames_in_one_message_and_one_frame_across_messages(
    server: BrokerServer,
) -> None:
    async with ws_client(server.http_port) as c:
        await c.send_message(
            "CONNECT\naccept-version:1.2\nhost:x\npasscode:token-alice\n\n\x00"
            "SUBSCRIBE\ndestination:/topic/w\nid:0\n\n\x00"
            "SEND\ndestination:/topic/w\n\nfirst\x00"
        )
        assert (await c.next()).command == "CONNECTED"
        assert (await c.next("MESSAGE")).body == b"first"
        frame = b"SEND\ndestination:/topic/w\nreceipt:r\ncontent-length:6\n\nsec\x00nd\x00"
        for part in (frame[:3], frame[3:20], frame[20:34], frame[34:]):
            await c.send_message(part)  # binary messages, split anywhere
        m = await c.next("MESSAGE")
        assert m.body == b"sec\x00nd"
        assert (await c.next("RECEIPT")).get("receipt-id") == "r"


async def test_one_frame_per_message_text_or_binary(server: BrokerServer) -> None:
    async with ws_client(server.http_port) as c:
        await c.connect(passcode="token-alice")
        await c.subscribe("/user/queue/bin")
        c.messages.clear()
        for body in (b'{"text":"h\xc3\xa9"}', b"\xff\xfe\x00binary"):
            await server.backplane.publish(Delivery("user", "/user/queue/bin", body, (), "alice"))
        assert (await c.next("MESSAGE")).body == b'{"text":"h\xc3\xa9"}'
        assert (await c.next("MESSAGE")).body == b"\xff\xfe\x00binary"
        assert len(c.messages) == 2  # exactly one STOMP frame per WebSocket message
        assert isinstance(c.messages[0], str) and c.messages[0].startswith("MESSAGE\n")
        assert isinstance(c.messages[1], bytes) and c.messages[1].endswith(b"binary\x00")


async def test_always_binary_option() -> None:
    async with broker_server(ws_always_binary=True) as srv, ws_client(srv.http_port) as c:
        await c.connect(passcode="token-alice")
        assert all(isinstance(m, bytes) for m in c.messages)


async def test_shutdown_sends_error_and_closes_1001() -> None:
    async with broker_server() as srv:
        async with ws_client(srv.http_port) as c:
            await c.connect(passcode="token-alice")
            with trio.fail_after(5):
                await srv.broker.shutdown(2.0)
            err = await c.next("ERROR")
            assert err.get("message") == "server shutting down"
            await c.wait_closed()
            assert isinstance(c.ws.closed, trio_websocket.CloseReason)
            assert c.ws.closed.code == 1001


async def test_client_closing_the_socket_ends_the_session(server: BrokerServer) -> None:
    async with ws_client(server.http_port) as c:
        await c.connect(passcode="token-alice")
        assert server.broker.user_sessions("alice")
    await eventually(lambda: not server.broker.user_sessions("alice"))


async def test_only_ws_path_is_a_stomp_door(server: BrokerServer) -> None:
    # the ASGI door takes /ws only; any other WebSocket path is the HTTP app's (no such
    # route: the upgrade is refused with 404), and /ws?query still reaches the broker
    try:
        async with trio_websocket.open_websocket(
            "127.0.0.1", server.http_port, "/wsx", use_ssl=False
        ):
            raise AssertionError("upgrade to /wsx was accepted")
    except trio_websocket.ConnectionRejected as exc:
        assert exc.status_code == 404
    async with trio_websocket.open_websocket(
        "127.0.0.1", server.http_port, "/ws?x=1", use_ssl=False, subprotocols=["v12.stomp"]
    ) as ws:
        assert ws.subprotocol == "v12.stomp"
        await ws.send_message("CONNECT\naccept-version:1.2\npasscode:token-bob\n\n\x00")
        assert str(await ws.get_message()).startswith("CONNECTED\n")
