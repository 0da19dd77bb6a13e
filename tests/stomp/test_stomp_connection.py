"""The h11-style Connection: a client and a server pumping bytes to each other in memory."""

from __future__ import annotations

import pytest

import stomp
from stomp import CLOSED, NEED_DATA, Connection, Frame, HeartBeat, ProtocolError


def pump(data: bytes, to: Connection) -> list[stomp.Event]:
    to.receive_data(data)
    out: list[stomp.Event] = []
    while True:
        event = to.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)  # type: ignore[arg-type]


def handshake(
    client_hb: tuple[int, int] = (1000, 5000), server_hb: tuple[int, int] = (2000, 3000)
) -> tuple[Connection, Connection]:
    client = Connection("client", heart_beat=client_hb)
    server = Connection("server", heart_beat=server_hb)
    (connect,) = pump(client.send(Frame.make("CONNECT", {"host": "chat"})), server)
    assert isinstance(connect, Frame)
    assert connect.get("accept-version") == "1.0,1.1,1.2"
    (connected,) = pump(server.send(Frame("CONNECTED")), client)
    assert isinstance(connected, Frame)
    assert connected.get("version") == "1.2"
    return client, server


def test_handshake_negotiates_version_and_heartbeats() -> None:
    client, server = handshake()
    assert client.state == server.state == stomp.CONNECTED
    assert client.version == server.version == "1.2"
    # client sends every max(1000, 3000); server sends every max(2000, 5000)
    assert server.heartbeat == (5000, 3000)
    assert client.heartbeat == (3000, 5000)


def test_frames_flow_both_ways_with_escaping_and_heartbeats() -> None:
    client, server = handshake()
    send = Frame.make("SEND", {"destination": "/app/chat:send", "receipt": "r1"}, b"{}")
    got = pump(client.send(send) + client.send(HeartBeat), server)
    assert got == [send.with_header("content-length", "2"), HeartBeat]
    message = Frame.make(
        "MESSAGE", {"destination": "/a\nb", "message-id": "1", "subscription": "0"}, b"x"
    )
    (back,) = pump(server.send(message), client)
    assert isinstance(back, Frame)
    assert back.get("destination") == "/a\nb"


def test_disconnect_receipt_then_close() -> None:
    client, server = handshake()
    (disconnect,) = pump(client.send(Frame.make("DISCONNECT", {"receipt": "77"})), server)
    assert isinstance(disconnect, Frame)
    assert server.state == stomp.DONE
    (receipt,) = pump(server.send(Frame.make("RECEIPT", {"receipt-id": "77"})), client)
    assert isinstance(receipt, Frame)
    assert receipt.get("receipt-id") == "77"
    server.receive_data(b"")
    assert server.next_event() is CLOSED
    with pytest.raises(ValueError):
        client.send(Frame.make("SEND", {"destination": "/a"}))


def test_frame_before_connect_is_refused() -> None:
    server = Connection("server")
    server.receive_data(b"SEND\ndestination:/a\n\n\x00")
    with pytest.raises(ProtocolError) as err:
        server.next_event()
    assert err.value.reason == "not-connected"


def test_no_common_version() -> None:
    server = Connection("server", supported=("1.2",))
    server.receive_data(b"CONNECT\naccept-version:1.0,1.1\nhost:h\n\n\x00")
    with pytest.raises(ProtocolError) as err:
        server.next_event()
    assert err.value.reason == "bad-version"
    assert "1.2" in err.value.message


def test_stomp_1_0_client_without_accept_version() -> None:
    server = Connection("server")
    (connect,) = pump(b"CONNECT\nlogin:a\n\n\x00", server)
    assert isinstance(connect, Frame)
    assert server.version == "1.0"
    wire = server.send(Frame("CONNECTED", (("session", "s"),)))
    assert b"version:1.0" in wire
    # 1.0 does not escape: a backslash in a destination is literal
    (send,) = pump(b"SEND\ndestination:/a\\nb\n\n\x00", server)
    assert isinstance(send, Frame)
    assert send.get("destination") == "/a\\nb"


def test_events_before_an_error_come_first_then_truncation() -> None:
    client, server = handshake()
    server.receive_data(b"SEND\ndestination:/a\n\nok\x00BOGUS\n\n\x00")
    first = server.next_event()
    assert isinstance(first, Frame)
    assert first.body == b"ok"
    with pytest.raises(ProtocolError) as err:
        server.next_event()
    assert err.value.reason == "unknown-command"

    client2, server2 = handshake()
    server2.receive_data(b"SEND\ndestination:/a\n\nhal")
    assert server2.next_event() is NEED_DATA
    server2.receive_data(b"")
    with pytest.raises(ProtocolError) as err:
        server2.next_event()
    assert err.value.reason == "truncated-frame"
    del client, client2


def test_error_ends_the_session() -> None:
    client, server = handshake()
    wire = server.send(Frame.make("ERROR", {"message": "bad frame"}, b"details"))
    assert server.state == stomp.DONE
    (error,) = pump(wire, client)
    assert isinstance(error, Frame)
    assert client.state == stomp.DONE
    with pytest.raises(ValueError):
        server.send(
            Frame.make("MESSAGE", {"destination": "/a", "message-id": "1", "subscription": "0"})
        )
