"""CONNECT: credentials, versions, heart-beats, timeouts."""

from __future__ import annotations

import trio

from .clients import eventually, tcp_client, ws_client
from .harness import BrokerServer, broker_server


async def test_connect_with_jwt_passcode_and_login_optional(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        f = await c.connect(passcode="token-alice", login="ignored-when-passcode-is-a-token")
        assert f.command == "CONNECTED"
        assert f.get("user-name") == "alice"
        assert f.get("server", "").startswith("SecureCollab/")
        assert f.get("session")
        assert f.get("heart-beat") is not None


async def test_connect_with_username_and_password(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        f = await c.connect(login="bob", passcode="bob-password")
        assert f.command == "CONNECTED"
        assert f.get("user-name") == "bob"


async def test_connect_with_bearer_on_websocket_upgrade(server: BrokerServer) -> None:
    async with ws_client(server.http_port, headers=[("Authorization", "Bearer token-carol")]) as c:
        f = await c.connect()
        assert f.command == "CONNECTED"
        assert f.get("user-name") == "carol"


async def test_bad_bearer_on_upgrade_fails_connect(server: BrokerServer) -> None:
    async with ws_client(server.http_port, headers=[("Authorization", "Bearer forged")]) as c:
        await c.frame("CONNECT", {"accept-version": "1.2", "host": "x"})
        await c.expect_error("authentication failed")


async def test_wrong_password_gets_error_and_close(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        await c.frame(
            "CONNECT", {"accept-version": "1.2", "host": "x", "login": "bob", "passcode": "nope"}
        )
        err = await c.expect_error("authentication failed")
        assert b"invalid credentials" in err.body


async def test_missing_credentials_gets_error(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        await c.frame("CONNECT", {"accept-version": "1.2", "host": "x"})
        await c.expect_error("authentication failed")


async def test_version_negotiation_picks_highest_common(server: BrokerServer) -> None:
    for offered, expected in (("1.0,1.1", "1.1"), ("1.0", "1.0"), ("1.1,1.2", "1.2")):
        async with tcp_client(server.tcp_port) as c:
            f = await c.connect({"accept-version": offered}, passcode="token-alice")
            assert f.get("version") == expected


async def test_connect_without_accept_version_is_stomp_10(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port, version="1.0") as c:
        await c.frame("CONNECT", {"login": "alice", "passcode": "alice-password"})
        f = await c.next("CONNECTED")
        assert f.get("version") == "1.0"
        # a 1.0 client acks by message-id alone
        await c.subscribe("/topic/t", ack="client")
        await c.receipt("SEND", {"destination": "/topic/t"}, "x")
        m = await c.next("MESSAGE")
        assert m.get("ack") is None  # 1.2-only header
        await c.receipt("ACK", {"message-id": m.get("message-id", "")}, rid="acked")


async def test_stomp_command_and_unsupported_version(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        await c.frame("STOMP", {"accept-version": "1.2", "host": "x", "passcode": "token-alice"})
        assert (await c.next("CONNECTED")).get("version") == "1.2"
    async with tcp_client(server.tcp_port) as c:
        await c.frame("CONNECT", {"accept-version": "2.0", "host": "x", "passcode": "token-alice"})
        err = await c.expect_error("Supported protocol versions are 1.0,1.1,1.2")
        assert err.get("version") == "1.0,1.1,1.2"


async def test_connect_timeout_closes_silent_connection() -> None:
    async with broker_server(connect_timeout_s=0.3) as srv, tcp_client(srv.tcp_port) as c:
        await c.expect_error("no CONNECT frame received")


async def test_heartbeat_negotiation_and_server_beats() -> None:
    async with broker_server(heartbeat_send_ms=100, heartbeat_recv_ms=5000) as srv:
        async with tcp_client(srv.tcp_port) as c:
            f = await c.connect({"heart-beat": "5000,50"}, passcode="token-alice")
            # server sends every max(sx=100, cy=50); expects every max(cx=5000, sy=5000)
            assert f.get("heart-beat") == "100,5000"
            await eventually(lambda: c.heartbeats >= 3, "three heart-beats")
            assert not c.closed.is_set()
        async with tcp_client(srv.tcp_port) as c:
            f = await c.connect({"heart-beat": "0,0"}, passcode="token-alice")
            assert f.get("heart-beat") == "0,0"
            await trio.sleep(0.3)
            assert c.heartbeats == 0


async def test_silent_peer_is_disconnected_after_twice_its_interval() -> None:
    async with broker_server(heartbeat_send_ms=0, heartbeat_recv_ms=100) as srv:
        async with tcp_client(srv.tcp_port) as quiet, tcp_client(srv.tcp_port) as beating:
            f = await quiet.connect({"heart-beat": "100,0"}, passcode="token-alice")
            assert f.get("heart-beat") == "0,100"
            await beating.connect({"heart-beat": "100,0"}, passcode="token-bob")

            async def beat() -> None:
                while True:
                    await beating.send_raw(b"\n")
                    await trio.sleep(0.05)

            async with trio.open_nursery() as n:
                n.start_soon(beat)
                await quiet.expect_error("heart-beat timeout")
                await trio.sleep(0.3)  # 3 x the interval: the beating client survives
                assert not beating.closed.is_set()
                n.cancel_scope.cancel()
            await beating.subscribe("/user/queue/x")  # still served


async def test_device_id_header_and_token_device(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as a, tcp_client(server.tcp_port) as b:
        await a.connect({"device-id": "laptop"}, passcode="token-alice")
        await b.connect(passcode="token-alice@phone")
        devices = sorted(i.device_id for i in server.broker.user_sessions("alice"))
        assert devices == ["laptop", "phone"]


async def test_stomp_10_client_gets_headers_it_can_parse(server: BrokerServer) -> None:
    async with (
        tcp_client(server.tcp_port, version="1.0") as old,
        tcp_client(server.tcp_port) as new,
    ):
        await old.frame("CONNECT", {"login": "alice", "passcode": "alice-password"})
        await old.next("CONNECTED")
        await old.subscribe("/topic/t10")
        await new.connect(passcode="token-bob")
        # a 1.2 sender may put an (escaped) newline in a header value; 1.0 has no escaping
        await new.receipt("SEND", {"destination": "/topic/t10", "x-note": "two\nlines"}, "x")
        m = await old.next("MESSAGE")
        assert m.get("x-note") == "two lines" and m.body == b"x"
