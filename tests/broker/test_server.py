"""The broker inside the real server: AuthService credentials, presence, typing, REST, shutdown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from tests.support.server import (
    PASSWORD,
    ServerHandle,
    bearer,
    free_port,
    register_and_login,
    running_server,
)

from .clients import TcpClient, WsClient, eventually, tcp_client, ws_client

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"


@asynccontextmanager
async def chat_server(tmp_path: Path) -> AsyncIterator[tuple[ServerHandle, dict[str, str]]]:
    """A real server with three users; alice and bob are peers (share a channel "c1")."""
    # [stomp] port 0 disables the TCP listener: take a free port instead
    async with (
        running_server(tmp_path, stomp__port=free_port()) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        tokens = {u: (await register_and_login(http, u))["token"] for u in (A, B, C)}
        hooks = srv.ctx.broker.hooks  # what the messaging part provides, reduced to one channel
        members = {"c1": {A, B}}

        async def peers_of(user_id: str) -> set[str]:
            return {m for ms in members.values() if user_id in ms for m in ms} - {user_id}

        async def is_member(user_id: str, channel_id: str) -> bool:
            return user_id in members.get(channel_id, set())

        async def channel_members(channel_id: str) -> set[str]:
            return set(members.get(channel_id, set()))

        hooks.peers_of, hooks.can_subscribe_channel, hooks.channel_members = (
            peers_of,
            is_member,
            channel_members,
        )
        yield srv, tokens


async def test_connect_with_real_tokens_and_passwords(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as (srv, tokens):
        port = srv.ports["stomp"]
        async with tcp_client(port) as c:
            f = await c.connect(passcode=tokens[A])
            assert f.get("user-name") == A
        async with tcp_client(port) as c:
            f = await c.connect(login=B, passcode=PASSWORD)
            assert f.get("user-name") == B
        async with tcp_client(port) as c:
            await c.frame(
                "CONNECT", {"accept-version": "1.2", "host": "x", "login": B, "passcode": "wrong"}
            )
            await c.expect_error("authentication failed")
        async with tcp_client(port) as c:
            await c.frame(
                "CONNECT",
                {"accept-version": "1.2", "host": "x", "passcode": tokens[A][:-3] + "abc"},
            )
            await c.expect_error("authentication failed")
        async with ws_client(srv.port, headers=[("Authorization", f"Bearer {tokens[C]}")]) as c:
            assert (await c.connect()).get("user-name") == C


async def _presence_events(c: TcpClient | WsClient, n: int) -> list[dict[str, object]]:
    return [json.loads((await c.next("MESSAGE")).body) for _ in range(n)]


async def test_presence_transitions_reach_peers_only(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as (srv, tokens):
        port = srv.ports["stomp"]
        async with tcp_client(port) as bob, tcp_client(port) as carol:
            await bob.connect(passcode=tokens[B])
            await carol.connect(passcode=tokens[C])
            await bob.subscribe("/topic/presence")
            await carol.subscribe("/topic/presence")
            async with tcp_client(port) as alice1:
                await alice1.connect({"device-id": "laptop"}, passcode=tokens[A])
                (ev,) = await _presence_events(bob, 1)
                assert (
                    ev["userId"] == A and ev["status"] == "ONLINE" and ev["devices"] == ["laptop"]
                )
                async with ws_client(srv.port) as alice2:
                    await alice2.connect({"device-id": "phone"}, passcode=tokens[A])
                    (ev,) = await _presence_events(bob, 1)
                    assert ev["devices"] == ["laptop", "phone"] and ev["status"] == "ONLINE"
                    await alice2.receipt(
                        "SEND", {"destination": "/app/presence"}, '{"status":"AWAY"}'
                    )
                    (ev,) = await _presence_events(bob, 1)
                    assert ev["status"] == "AWAY"
                    await alice2.receipt(
                        "SEND", {"destination": "/app/presence"}, '{"status":"ONLINE"}'
                    )
                    assert (await _presence_events(bob, 1))[0]["status"] == "ONLINE"
                (ev,) = await _presence_events(bob, 1)  # phone left: laptop still on
                assert ev["status"] == "ONLINE" and ev["devices"] == ["laptop"]
            (ev,) = await _presence_events(bob, 1)
            assert ev["status"] == "OFFLINE" and ev["devices"] == [] and ev["lastSeen"]
            assert await carol.quiet(0.2) == []  # not a peer of alice: heard nothing


async def test_presence_stops_once_a_peer_unsubscribes_everywhere(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as (srv, tokens):
        port = srv.ports["stomp"]
        async with tcp_client(port) as bob1, tcp_client(port) as bob2:
            for c in (bob1, bob2):
                await c.connect(passcode=tokens[B])
                await c.subscribe("/topic/presence", "p")
            await bob1.receipt("UNSUBSCRIBE", {"id": "p"})
            async with tcp_client(port) as alice:
                await alice.connect({"device-id": "laptop"}, passcode=tokens[A])
                (ev,) = await _presence_events(bob2, 1)  # bob's other session still listens
                assert ev["userId"] == A and ev["status"] == "ONLINE"
                await bob2.receipt("UNSUBSCRIBE", {"id": "p"})
            assert await bob1.quiet(0.2) == []
            assert await bob2.quiet(0.2) == []  # alice went offline: nobody listens now


async def test_presence_over_rest_is_authenticated_and_filtered(tmp_path: Path) -> None:
    async with (
        chat_server(tmp_path) as (srv, tokens),
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        r = await http.get("/api/presence", params={"userIds": A})
        assert r.status_code == 401
        async with tcp_client(srv.ports["stomp"]) as alice:
            await alice.connect({"device-id": "laptop"}, passcode=tokens[A])
            r = await http.get(
                "/api/presence", params={"userIds": f"{A},{C}"}, headers=bearer(tokens[B])
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["users"] == [
                {
                    "userId": A,
                    "status": "ONLINE",
                    "devices": ["laptop"],
                    "lastSeen": body["users"][0]["lastSeen"],
                }
            ]
            assert body["hidden"] == [C]  # carol shares nothing with bob
        await eventually(lambda: not srv.ctx.broker.user_sessions(A))
        r = await http.get("/api/presence", params={"userIds": A}, headers=bearer(tokens[B]))
        assert r.json()["users"][0]["status"] == "OFFLINE"
        r = await http.get("/api/presence", params={"userIds": ""}, headers=bearer(tokens[B]))
        assert r.status_code == 422 and r.json()["error"] == "missing_user_ids"


async def test_bad_presence_status_is_an_error(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as (srv, tokens), tcp_client(srv.ports["stomp"]) as a:
        await a.connect(passcode=tokens[A])
        await a.frame(
            "SEND", {"destination": "/app/presence", "receipt": "p"}, '{"status":"INVISIBLE"}'
        )
        err = await a.expect_error("status must be one of ONLINE, AWAY")
        assert err.get("receipt-id") == "p"


async def test_typing_relay_direct_and_channel(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as (srv, tokens):
        port = srv.ports["stomp"]
        async with tcp_client(port) as a, tcp_client(port) as b, tcp_client(port) as c:
            for client, user in ((a, A), (b, B), (c, C)):
                await client.connect(passcode=tokens[user])
                await client.subscribe("/user/queue/typing")
            await a.receipt("SEND", {"destination": "/app/typing"}, json.dumps({"to": C}))
            ev = json.loads((await c.next("MESSAGE")).body)
            assert ev["from"] == A and ev["to"] == C and ev["typing"] is True
            await a.receipt(
                "SEND",
                {"destination": "/app/typing"},
                json.dumps({"channelId": "c1", "typing": False}),
            )
            ev = json.loads((await b.next("MESSAGE")).body)
            assert ev == {"from": A, "channelId": "c1", "typing": False, "at": ev["at"]}
            assert (
                await a.quiet(0.1) == [] and await c.quiet(0.1) == []
            )  # not to self, not to non-members
            await c.frame("SEND", {"destination": "/app/typing"}, json.dumps({"channelId": "c1"}))
            await c.expect_error("not a member of channel c1")
            await a.frame("SEND", {"destination": "/app/typing"}, "not json")
            await a.expect_error("invalid JSON body for /app/typing")


async def test_shutdown_tells_clients_and_closes_websockets_1001(tmp_path: Path) -> None:
    # [stomp] port 0 disables the TCP listener: take a free port instead
    async with (
        running_server(tmp_path, stomp__port=free_port()) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        token = (await register_and_login(http, A))["token"]
        ws_cm, tcp_cm = ws_client(srv.port), tcp_client(srv.ports["stomp"])
        ws, tcp = await ws_cm.__aenter__(), await tcp_cm.__aenter__()
        try:
            await ws.connect(passcode=token)
            await tcp.connect(passcode=token)
            with trio.fail_after(10):
                srv.ctx.shutdown.set()
                assert (await ws.next("ERROR")).get("message") == "server shutting down"
                assert (await tcp.next("ERROR")).get("message") == "server shutting down"
                await ws.wait_closed()
                await tcp.wait_closed()
            assert ws.ws.closed is not None and ws.ws.closed.code == 1001
        finally:
            await tcp_cm.__aexit__(None, None, None)
            await ws_cm.__aexit__(None, None, None)


async def test_metrics_count_connections_and_frames(tmp_path: Path) -> None:
    async with (
        chat_server(tmp_path) as (srv, tokens),
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        async with ws_client(srv.port) as a:
            await a.connect(passcode=tokens[A])
            text = (await http.get("/metrics")).text
            assert 'securecollab_stomp_connections_open{transport="ws"}' in text
            assert 'securecollab_stomp_frames_in_total{command="CONNECT"}' in text
            assert 'securecollab_presence_users{status="ONLINE"}' in text
