"""Presence and private-queue registrations live as long as the node renews them.

The node renews every live session's backplane registrations every ttl/3, whatever the
client sends: an idle client with heart-beats off stays ONLINE. A node that stops
renewing (crashed) lets them lapse after the TTL.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from securecollab.ids import now_ms
from tests.support.server import bearer, free_port, register_and_login, running_server

from .clients import tcp_client
from .harness import broker_server

A = "alice@example.com"
PRIVATE = "/user/queue/private"


async def test_idle_client_without_heartbeats_stays_online_past_the_ttl(tmp_path: Path) -> None:
    ttl_s = 5  # the smallest the config allows; renewed every ttl/3
    async with (
        running_server(tmp_path, stomp__port=free_port(), presence__ttl_s=ttl_s) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        token = (await register_and_login(http, A))["token"]
        async with tcp_client(srv.ports["stomp"]) as alice:
            await alice.connect({"heart-beat": "0,0", "device-id": "tab"}, passcode=token)
            await alice.subscribe(PRIVATE)
            await trio.sleep(ttl_s + 2)  # silent for longer than the TTL
            r = await http.get("/api/presence", params={"userIds": A}, headers=bearer(token))
            assert r.status_code == 200, r.text
            [me] = r.json()["users"]
            assert (me["status"], me["devices"]) == ("ONLINE", ["tab"])
            backplane = srv.ctx.backplane
            assert await backplane.subscribed_users(PRIVATE, [A], now_ms()) == {A}
            assert not alice.closed.is_set()


async def test_registrations_lapse_when_the_node_stops_renewing() -> None:
    async with broker_server(presence_ttl_s=0.5, presence_refresh_s=0.1) as srv:
        async with trio.open_nursery() as nursery, tcp_client(srv.tcp_port) as bob:
            await bob.connect({"heart-beat": "0,0"}, passcode="token-bob")
            await bob.subscribe(PRIVATE)
            refresher = trio.CancelScope()

            async def renew() -> None:
                with refresher:
                    await srv.broker.refresh_forever()

            nursery.start_soon(renew)
            await trio.sleep(1.0)  # two TTLs: alive only because the node renews
            assert await srv.backplane.subscribed_users(PRIVATE, ["bob"], now_ms()) == {"bob"}
            refresher.cancel()  # the node "crashes": nobody renews any more
            await trio.sleep(0.7)
            assert await srv.backplane.subscribed_users(PRIVATE, ["bob"], now_ms()) == set()
