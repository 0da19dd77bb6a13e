"""At-least-once on /user/queue/private: what did not reach the client is handed back.

The broker reports every private message it accepted for live delivery but could not
get to the client through `hooks.on_undelivered` (messaging queues them offline), and
registers private-queue subscribers in the backplane so senders can tell "subscribed"
from "merely connected". Real sockets, raw STOMP clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from securecollab.backplane import Delivery
from securecollab.broker.hooks import BrokerHooks
from securecollab.broker.session import State
from securecollab.ids import now_ms

from .clients import eventually, tcp_client
from .harness import BrokerServer, broker_server

PRIVATE = "/user/queue/private"
JSON = (("content-type", "application/json"),)


class Reports:
    """What the broker told the chat layer: delivered and undelivered ids per user."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str]] = []
        self.undelivered: list[tuple[str, str]] = []

    async def on_delivered(self, user_id: str, ids: list[str]) -> None:
        self.delivered += [(user_id, i) for i in ids]

    async def on_undelivered(self, user_id: str, ids: list[str]) -> None:
        self.undelivered += [(user_id, i) for i in ids]

    def undelivered_ids(self, user_id: str) -> list[str]:
        return [i for u, i in self.undelivered if u == user_id]


@asynccontextmanager
async def reporting_server(**config: object) -> AsyncIterator[tuple[BrokerServer, Reports]]:
    reports = Reports()
    hooks = BrokerHooks(on_delivered=reports.on_delivered, on_undelivered=reports.on_undelivered)
    async with broker_server(hooks, **config) as srv:
        yield srv, reports


async def private(srv: BrokerServer, user: str, message_id: str, body: bytes = b"{}") -> None:
    await srv.backplane.publish(
        Delivery("user", PRIVATE, body, JSON, user_id=user, message_id=message_id)
    )


async def subscribed(srv: BrokerServer, user: str) -> bool:
    return user in await srv.backplane.subscribed_users(PRIVATE, [user], now_ms())


async def test_subscribed_not_merely_connected_is_registered_in_the_backplane() -> None:
    async with reporting_server() as (srv, _), tcp_client(srv.tcp_port) as bob:
        await bob.connect(passcode="token-bob")
        assert not await subscribed(srv, "bob")  # connected, nothing would reach him
        await bob.subscribe("/user/queue/errors", "e")
        assert not await subscribed(srv, "bob")
        await bob.subscribe(PRIVATE, "p1")
        assert await subscribed(srv, "bob")
        await bob.subscribe(PRIVATE, "p2")
        await bob.receipt("UNSUBSCRIBE", {"id": "p1"})
        assert await subscribed(srv, "bob")  # p2 still receives
        await bob.receipt("UNSUBSCRIBE", {"id": "p2"}, rid="u2")
        assert not await subscribed(srv, "bob")
        await bob.subscribe(PRIVATE, "p3")
        assert await subscribed(srv, "bob")
        await bob.frame("DISCONNECT", {"receipt": "bye"})
        await bob.next("RECEIPT")
        await bob.wait_closed()
        await eventually(lambda: not srv.broker.sessions, "bob's session ended")
        assert not await subscribed(srv, "bob")


async def test_unacked_client_mode_messages_are_handed_back_at_disconnect() -> None:
    async with reporting_server() as (srv, reports):
        for ack in ("client-individual", "client"):
            reports.delivered.clear()
            reports.undelivered.clear()
            async with tcp_client(srv.tcp_port) as bob:
                await bob.connect(passcode="token-bob")
                await bob.subscribe(PRIVATE, ack=ack)
                for i in range(4):
                    await private(srv, "bob", f"{ack}-{i}")
                frames = [await bob.next("MESSAGE") for _ in range(4)]
                # ACK the second: client-individual settles that one, client (cumulative)
                # the first two
                await bob.receipt("ACK", {"id": frames[1].get("ack", "")})
                bob_gone = bob
            await bob_gone.wait_closed()
            await eventually(lambda: not srv.broker.sessions, "bob's session ended")
            acked = [f"{ack}-1"] if ack == "client-individual" else [f"{ack}-0", f"{ack}-1"]
            assert [i for _, i in reports.delivered] == acked
            expected = [f"{ack}-{i}" for i in range(4) if f"{ack}-{i}" not in acked]
            assert reports.undelivered_ids("bob") == expected


async def test_nacked_private_message_is_handed_back() -> None:
    async with reporting_server() as (srv, reports), tcp_client(srv.tcp_port) as bob:
        await bob.connect(passcode="token-bob")
        await bob.subscribe(PRIVATE, ack="client-individual")
        await private(srv, "bob", "m1")
        m = await bob.next("MESSAGE")
        await bob.receipt("NACK", {"id": m.get("ack", "")})
        assert reports.undelivered == [("bob", "m1")]


async def test_delivery_to_a_closing_session_is_handed_back() -> None:
    async with reporting_server() as (srv, reports), tcp_client(srv.tcp_port) as bob:
        await bob.connect(passcode="token-bob")
        await bob.subscribe(PRIVATE)
        [session] = srv.broker.sessions.values()
        # The session is closing (the server is stopping it) when the message arrives.
        session.close("server shutting down", code=1001)
        assert session.state is State.CLOSING
        await private(srv, "bob", "late")
        await bob.expect_error("server shutting down")
        assert [f for f in bob.frames if f.command == "MESSAGE"] == []
        await eventually(lambda: ("bob", "late") in reports.undelivered, "hand-back")


async def test_delivery_just_after_the_last_subscription_ended_is_handed_back() -> None:
    # A sender saw bob subscribed and skipped the offline queue; bob's session ended
    # before the delivery arrived: the message must not vanish.
    async with reporting_server() as (srv, reports):
        async with tcp_client(srv.tcp_port) as bob:
            await bob.connect(passcode="token-bob")
            await bob.subscribe(PRIVATE)
            await bob.frame("DISCONNECT", {"receipt": "bye"})
            await bob.next("RECEIPT")
        await eventually(lambda: not srv.broker.sessions, "bob's session ended")
        await private(srv, "bob", "in-flight")
        # a user who never subscribed here is someone else's business (other nodes)
        await private(srv, "carol", "not-here")
        assert reports.undelivered == [("bob", "in-flight")]


async def test_grace_window_ends() -> None:
    async with reporting_server(handback_grace_s=0.0) as (srv, reports):
        async with tcp_client(srv.tcp_port) as bob:
            await bob.connect(passcode="token-bob")
            await bob.subscribe(PRIVATE)
            await bob.frame("DISCONNECT", {"receipt": "bye"})
            await bob.next("RECEIPT")
        await eventually(lambda: not srv.broker.sessions, "bob's session ended")
        await trio.sleep(0.01)
        await private(srv, "bob", "much-later")
        assert reports.undelivered == []


async def test_slow_consumer_hands_back_everything_it_did_not_write() -> None:
    async with reporting_server(
        outbound_queue_frames=8, outbound_queue_bytes=256 * 1024, close_grace_s=0.5
    ) as (srv, reports):
        stream = await trio.open_tcp_stream("127.0.0.1", srv.tcp_port)
        await stream.send_all(
            b"CONNECT\naccept-version:1.2\nhost:x\npasscode:token-bob\n\n\x00"
            b"SUBSCRIBE\ndestination:/user/queue/private\nid:0\nreceipt:ok\n\n\x00"
        )
        await eventually(
            lambda: (
                srv.broker.sessions and any(s.subscriptions for s in srv.broker.sessions.values())
            ),
            "subscribed",
        )
        [session] = srv.broker.sessions.values()
        body = b'"' + b"x" * 60_000 + b'"'
        sent: list[str] = []
        with trio.fail_after(20):  # bob never reads: kernel buffers fill, then the queue
            while session.state is not State.CLOSING:
                sent.append(f"m{len(sent)}")
                await private(srv, "bob", sent[-1], body)
        # bob reads at last: whatever the socket got, plus what was handed back, is all
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(1 << 20):
                data += chunk
        await stream.aclose()
        await eventually(lambda: not srv.broker.sessions, "bob's session ended")
        received = {
            line.split(b":", 1)[1].decode()
            for line in data.split(b"\n")
            if line.startswith(b"message-id:")
        }
        handed_back = set(reports.undelivered_ids("bob"))
        assert handed_back, "the slow consumer dropped messages"
        assert received | handed_back == set(sent), "a message was neither written nor handed back"
        # ack:auto frames that were written count as delivered, never as handed back
        assert not handed_back & {i for u, i in reports.delivered if u == "bob"}
