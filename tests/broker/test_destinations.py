"""Authorization per destination, user queues, channel hook, initial messages, control."""

from __future__ import annotations

import json

import trio

from securecollab.backplane import Delivery
from securecollab.broker.config import AclRule
from securecollab.broker.hooks import BrokerHooks, InitialMessage

from .clients import tcp_client
from .harness import BrokerServer, broker_server


def _user(
    user: str, dest: str, body: str, mid: str | None = None, exclude: str | None = None
) -> Delivery:
    return Delivery(
        "user", dest, body.encode(), (("content-type", "application/json"),), user, mid, exclude
    )


async def test_default_acl_admits_no_general_destination() -> None:
    async with broker_server() as srv:
        for command, dest in (
            ("SUBSCRIBE", "/queue/jobs"),
            ("SUBSCRIBE", "/topic/x"),
            ("SEND", "/queue/jobs"),
        ):
            async with tcp_client(srv.tcp_port) as c:
                await c.connect(passcode="token-alice")
                await c.frame(command, {"destination": dest, "id": "1", "receipt": "r9"})
                err = await c.expect_error(f"not allowed to {command.lower()} to {dest}")
                assert err.get("receipt-id") == "r9"


async def test_acl_rules_by_user_and_pattern() -> None:
    acl = (AclRule("/topic/ops.*", subscribe=("bob",), send=("alice",)),)
    async with broker_server(acl=acl) as srv:
        async with tcp_client(srv.tcp_port) as a, tcp_client(srv.tcp_port) as b:
            await a.connect(passcode="token-alice")
            await b.connect(passcode="token-bob")
            await b.subscribe("/topic/ops.deploys")
            await a.receipt("SEND", {"destination": "/topic/ops.deploys"}, "go")
            assert (await b.next("MESSAGE")).body == b"go"
            await b.frame("SEND", {"destination": "/topic/ops.deploys"}, "no")
            await b.expect_error("not allowed to send to /topic/ops.deploys")
        async with tcp_client(srv.tcp_port) as a:
            await a.connect(passcode="token-alice")
            await a.frame("SUBSCRIBE", {"destination": "/topic/ops.deploys", "id": "1"})
            await a.expect_error("not allowed to subscribe to /topic/ops.deploys")


async def test_user_queue_reaches_every_session_of_that_user_only(server: BrokerServer) -> None:
    async with (
        tcp_client(server.tcp_port) as a1,
        tcp_client(server.tcp_port) as a2,
        tcp_client(server.tcp_port) as b,
    ):
        await a1.connect(passcode="token-alice@laptop")
        await a2.connect(passcode="token-alice@phone")
        await b.connect(passcode="token-bob")
        await a1.subscribe("/user/queue/private")
        await a2.subscribe("/user/alice/queue/private")  # Spring form, own id
        await b.subscribe("/user/queue/private")
        await server.backplane.publish(_user("alice", "/user/queue/private", '{"n":1}', "m1"))
        m1, m2 = await a1.next("MESSAGE"), await a2.next("MESSAGE")
        assert m1.body == m2.body == b'{"n":1}'
        assert m1.get("message-id") == "m1"
        assert m2.get("destination") == "/user/alice/queue/private"
        assert await b.quiet(0.2) == []


async def test_exclude_session_skips_the_sender(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as a1, tcp_client(server.tcp_port) as a2:
        c1 = await a1.connect(passcode="token-alice")
        await a2.connect(passcode="token-alice")
        await a1.subscribe("/user/queue/private")
        await a2.subscribe("/user/queue/private")
        await server.backplane.publish(
            _user("alice", "/user/alice/queue/private", "{}", exclude=c1.get("session"))
        )
        assert (await a2.next("MESSAGE")).body == b"{}"
        assert await a1.quiet(0.2) == []


async def test_another_users_queue_is_refused(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c, tcp_client(server.tcp_port) as other:
        await c.connect(passcode="token-alice")
        await other.connect(passcode="token-bob")
        await c.frame("SUBSCRIBE", {"destination": "/user/bob/queue/private", "id": "1"})
        await c.expect_error("destination /user/bob/queue/private belongs to another user")
        await other.subscribe("/user/queue/private")  # the others keep working


async def test_clients_cannot_send_to_server_only_destinations(server: BrokerServer) -> None:
    for dest in (
        "/user/queue/private",
        "/user/bob/queue/private",
        "/topic/presence",
        "/topic/messages/c1",
    ):
        async with tcp_client(server.tcp_port) as c:
            await c.connect(passcode="token-alice")
            await c.frame("SEND", {"destination": dest}, "{}")
            await c.expect_error(f"clients cannot send to {dest}")


async def test_channel_topic_subscription_follows_the_membership_hook() -> None:
    hooks = BrokerHooks()

    async def is_member(user_id: str, channel_id: str) -> bool:
        return (user_id, channel_id) == ("alice", "c1")

    hooks.can_subscribe_channel = is_member
    async with broker_server(hooks) as srv:
        async with tcp_client(srv.tcp_port) as a, tcp_client(srv.tcp_port) as b:
            await a.connect(passcode="token-alice")
            await b.connect(passcode="token-bob")
            await a.subscribe("/topic/messages/c1")
            await b.frame("SUBSCRIBE", {"destination": "/topic/messages/c1", "id": "1"})
            await b.expect_error("not allowed to subscribe to /topic/messages/c1")
            await srv.backplane.publish(
                Delivery("topic", "/topic/messages/c1", b"{}", (), None, "m1")
            )
            assert (await a.next("MESSAGE")).get("message-id") == "m1"


async def test_default_channel_hook_denies() -> None:
    async with broker_server() as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await a.frame("SUBSCRIBE", {"destination": "/topic/messages/c1", "id": "1"})
        await a.expect_error("not allowed to subscribe to /topic/messages/c1")


async def test_control_unsubscribe_ends_channel_subscription_at_once() -> None:
    hooks = BrokerHooks()

    async def anyone(user_id: str, channel_id: str) -> bool:
        return True

    hooks.can_subscribe_channel = anyone
    async with (
        broker_server(hooks) as srv,
        tcp_client(srv.tcp_port) as a,
        tcp_client(srv.tcp_port) as b,
    ):
        await a.connect(passcode="token-alice")
        await b.connect(passcode="token-bob")
        await a.subscribe("/topic/messages/c1")
        await b.subscribe("/topic/messages/c1")
        await srv.backplane.publish(
            Delivery("control", "/topic/messages/c1", b"", (("action", "unsubscribe"),), "alice")
        )
        await srv.backplane.publish(Delivery("topic", "/topic/messages/c1", b"after", ()))
        assert (await b.next("MESSAGE")).body == b"after"
        assert await a.quiet(0.2) == []
        assert not a.closed.is_set()


async def test_control_disconnect_closes_the_users_sessions(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as a, tcp_client(server.tcp_port) as b:
        await a.connect(passcode="token-alice")
        await b.connect(passcode="token-bob")
        await server.backplane.publish(
            Delivery(
                "control",
                "",
                b"",
                (("action", "disconnect"), ("message", "account deleted")),
                "alice",
            )
        )
        await a.expect_error("account deleted")
        await b.subscribe("/user/queue/x")


async def test_control_disconnect_of_one_login_session(server: BrokerServer) -> None:
    ended = Delivery(
        "control",
        "",
        b"",
        (("action", "disconnect"), ("session-key", "k1"), ("message", "logged out")),
        "alice",
    )
    async with (
        tcp_client(server.tcp_port) as a1,
        tcp_client(server.tcp_port) as a2,
        tcp_client(server.tcp_port) as late,
    ):
        await a1.connect(passcode="token-alice#k1")
        await a2.connect(passcode="token-alice#k2")
        await server.backplane.publish(ended)
        await a1.expect_error("logged out")
        await a2.subscribe("/user/queue/x")  # another login session of alice: still open
        # a CONNECT of the ended session that was authenticated before the logout (the
        # test authenticator knows nothing of logouts) is closed as it attaches
        await late.connect(passcode="token-alice#k1")
        await late.expect_error("logged out")
        assert not a2.closed.is_set()


async def test_initial_messages_first_then_live_without_gaps_or_duplicates() -> None:
    hooks = BrokerHooks()
    release = trio.Event()
    delivered: list[tuple[str, list[str]]] = []

    async def initial(user_id: str) -> list[InitialMessage]:
        await release.wait()  # live traffic arrives while the offline queue loads
        return [InitialMessage(f"m{i}", json.dumps({"i": i}).encode()) for i in (1, 2, 3)]

    async def on_delivered(user_id: str, ids: list[str]) -> None:
        delivered.append((user_id, ids))

    hooks.initial_messages = initial
    hooks.on_delivered = on_delivered
    async with broker_server(hooks) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await a.frame(
            "SUBSCRIBE", {"destination": "/user/queue/private", "id": "p", "receipt": "s"}
        )
        await trio.sleep(0.1)
        await srv.backplane.publish(
            _user("alice", "/user/queue/private", "{}", "m3")
        )  # duplicate of queued
        await srv.backplane.publish(_user("alice", "/user/queue/private", "{}", "m4"))
        release.set()
        ids = [(await a.next("MESSAGE")).get("message-id") for _ in range(4)]
        assert ids == ["m1", "m2", "m3", "m4"]
        assert (await a.next("RECEIPT")).get("receipt-id") == "s"
        await srv.backplane.publish(_user("alice", "/user/queue/private", "{}", "m5"))
        assert (await a.next("MESSAGE")).get("message-id") == "m5"
        await trio.sleep(0.1)
        # ack:auto: reported delivered once written to the socket
        assert sorted(i for _, ids_ in delivered for i in ids_) == ["m1", "m2", "m3", "m4", "m5"]
        assert {u for u, _ in delivered} == {"alice"}


async def test_on_delivered_waits_for_ack_in_client_mode() -> None:
    hooks = BrokerHooks()
    delivered: list[str] = []

    async def on_delivered(user_id: str, ids: list[str]) -> None:
        delivered.extend(ids)

    hooks.on_delivered = on_delivered
    async with broker_server(hooks) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await a.subscribe("/user/queue/private", ack="client")
        for mid in ("m1", "m2"):
            await srv.backplane.publish(_user("alice", "/user/queue/private", "{}", mid))
        m1, m2 = await a.next("MESSAGE"), await a.next("MESSAGE")
        await trio.sleep(0.1)
        assert delivered == []  # written, but not acknowledged
        await a.receipt("ACK", {"id": m2.get("ack", "")})  # cumulative
        assert delivered == ["m1", "m2"]
        assert m1.get("ack") != m2.get("ack")
