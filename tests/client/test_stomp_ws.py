"""The SDK's STOMP-over-WebSocket session against the real broker on loopback."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

import stomp
from securecollab.broker.hooks import BrokerHooks, InitialMessage
from securecollab.client.rest import ServerUnavailable
from securecollab.client.stomp_ws import (
    Backoff,
    ConnectionLost,
    StompAuthError,
    StompError,
    open_stomp,
    ws_url,
)

from .broker_harness import Restartable, broker_on

FAST = Backoff(initial_s=0.05, max_s=0.2)


def token(value: str) -> Callable[[], Awaitable[str]]:
    async def provide() -> str:
        return value

    return provide


async def test_publish_subscribe_with_receipts_and_heartbeats() -> None:
    # The broker wants a beat from us every 100 ms and drops us after 200 ms of
    # silence: staying connected through an idle second proves we send them.
    async with broker_on(heartbeat_recv_ms=100, heartbeat_send_ms=100) as srv:
        async with open_stomp(srv.url, token("token-alice@laptop"), heartbeat=(100, 100)) as a:
            sub = await a.subscribe("/topic/news")
            await trio.sleep(1.0)
            assert a.connected and a.reconnects == 0
            await a.send("/topic/news", b'{"n":1}')
            with trio.fail_after(5):
                msg = await sub.receive()
            assert json.loads(msg.body) == {"n": 1}
            assert msg.destination == "/topic/news" and msg.headers["content-type"]
            assert a.reconnects == 0


async def test_bad_token_is_a_clear_auth_error() -> None:
    async with broker_on() as srv:
        with pytest.raises(StompAuthError, match="authentication failed"):
            async with open_stomp(srv.url, token("forged")):
                pass


async def test_server_down_is_server_unavailable() -> None:
    async with broker_on() as srv:
        url = srv.url
    with pytest.raises(ServerUnavailable, match="cannot connect"):
        async with open_stomp(url, token("token-alice"), connect_timeout=2):
            pass


async def test_refused_send_raises_and_the_session_recovers() -> None:
    async with broker_on() as srv:
        async with open_stomp(srv.url, token("token-alice"), backoff=FAST) as a:
            sub = await a.subscribe("/topic/t")
            with pytest.raises(StompError) as info:
                await a.send("/user/queue/private", b"{}")  # server-only destination
            assert "cannot send" in info.value.message
            # The server closed the connection after its ERROR; we are back, resubscribed.
            await a.send("/topic/t", b'"after"')
            with trio.fail_after(5):
                assert (await sub.receive()).body == b'"after"'
            assert a.reconnects == 1


async def test_refused_subscription_raises() -> None:
    async with broker_on() as srv:  # default hooks: nobody is a channel member
        async with open_stomp(srv.url, token("token-alice"), backoff=FAST) as a:
            with pytest.raises(StompError, match="not allowed"):
                await a.subscribe("/topic/messages/some-channel")


async def test_silent_server_is_detected_and_left() -> None:
    """A server that negotiates heart-beats and then says nothing is given up on."""
    connects: list[int] = []
    second_connect = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="v12.stomp")
        await ws.get_message()  # CONNECT
        connects.append(1)
        if len(connects) == 2:
            second_connect.set()
        await ws.send_message(
            stomp.encode(stomp.Frame("CONNECTED", (("version", "1.2"), ("heart-beat", "100,0"))))
        )
        await trio.sleep_forever()  # never a beat, never a frame

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/ws"
        states: list[str] = []
        async with open_stomp(
            url,
            token("token-alice"),
            heartbeat=(0, 100),
            backoff=FAST,
            on_state=lambda s, d: states.append(f"{s}: {d}"),
        ):
            with trio.fail_after(10):
                await second_connect.wait()
        assert any("heart-beat timeout" in s for s in states), states
        nursery.cancel_scope.cancel()


async def test_reconnect_resubscribes_and_delivers_offline_queue_once() -> None:
    """Server restart: the client comes back on its own, subscriptions included; what the
    'offline queue' hands out again is delivered to the app once and ACKed."""
    queue: dict[str, bytes] = {}  # message id -> body, until ACKed (like the real queue)
    drained = trio.Event()

    async def initial(user_id: str) -> list[InitialMessage]:
        return [InitialMessage(mid, body) for mid, body in sorted(queue.items())]

    async def delivered(user_id: str, ids: list[str]) -> None:
        for mid in ids:
            queue.pop(mid, None)
        if not queue:
            drained.set()

    def hooks() -> BrokerHooks:
        return BrokerHooks(initial_messages=initial, on_delivered=delivered)

    queue["m1"] = b'"one"'
    received: list[str] = []
    async with trio.open_nursery() as nursery:
        server = Restartable(nursery)
        await server.start(hooks=hooks())
        async with open_stomp(server.url, token("token-bob"), backoff=FAST) as b:
            priv = await b.subscribe("/user/queue/private", ack="client-individual")
            with trio.fail_after(5):
                first = await priv.receive()
            received.append(first.message_id)
            # Not ACKed yet when the server goes away: it is handed out again later.
            await server.stop()
            queue["m2"] = b'"two"'  # arrived while bob was offline
            await server.start(hooks=hooks())
            with trio.fail_after(10):
                second = await priv.receive()
            received.append(second.message_id)
            await b.ack(first)  # acks m1 through its newest ack id
            await b.ack(second)
            with trio.fail_after(5):
                await drained.wait()
            with trio.move_on_after(0.3):
                extra = await priv.receive()
                received.append(extra.message_id)
            assert b.reconnects == 1
        await server.stop()
    assert received == ["m1", "m2"]


async def test_send_waits_across_a_restart_and_gives_up_when_bounded() -> None:
    async with broker_on() as srv:
        port = srv.port
        async with open_stomp(srv.url, token("token-alice"), backoff=FAST, send_timeout=1.0) as a:
            await a.send("/topic/x", b"1")
            await srv.broker.shutdown(0.5)  # the server says goodbye and refuses everyone
            with pytest.raises(ConnectionLost, match=r"no receipt|not connected"):
                await a.send("/topic/x", b"2")
    assert port


def test_ws_url() -> None:
    assert ws_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/ws"
    assert ws_url("https://chat.example.com/base/") == "wss://chat.example.com/base/ws"
    with pytest.raises(ValueError):
        ws_url("ftp://x")


def test_backoff_is_bounded_and_jittered() -> None:
    import random

    b = Backoff(initial_s=0.5, max_s=8.0, jitter=0.5)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(20)]
    assert all(0 < d <= 8.0 for d in delays)
    assert delays[0] <= 0.5 and max(delays) > 4.0
    assert len({round(d, 6) for d in delays[10:]}) > 1  # capped, yet not all equal


async def test_gives_up_after_the_bounded_reconnect_time() -> None:
    async with trio.open_nursery() as nursery:
        server = Restartable(nursery)
        await server.start()
        backoff = Backoff(initial_s=0.05, max_s=0.1, give_up_after_s=0.5)
        async with open_stomp(server.url, token("token-alice"), backoff=backoff) as a:
            sub = await a.subscribe("/topic/t")
            await server.stop()  # and nobody comes back
            with trio.fail_after(10), pytest.raises(ConnectionLost, match=r"within 0\.5 s"):
                await sub.receive()
            with pytest.raises(ConnectionLost):
                await a.send("/topic/t", b"late")
