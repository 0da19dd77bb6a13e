"""Queues and topics: competing consumers, ack modes, NACK/redelivery, transactions, receipts."""

from __future__ import annotations

import trio

from .clients import Client, tcp_client
from .harness import BrokerServer


async def _send(c: Client, dest: str, *bodies: str) -> None:
    for i, body in enumerate(bodies):
        await c.receipt("SEND", {"destination": dest}, body, rid=f"s{i}-{body}")


async def test_queue_round_robin_between_consumers(server: BrokerServer) -> None:
    async with (
        tcp_client(server.tcp_port) as p,
        tcp_client(server.tcp_port) as c1,
        tcp_client(server.tcp_port) as c2,
    ):
        for c, user in ((p, "alice"), (c1, "bob"), (c2, "carol")):
            await c.connect(passcode=f"token-{user}")
        await c1.subscribe("/queue/jobs")
        await c2.subscribe("/queue/jobs")
        await _send(p, "/queue/jobs", "1", "2", "3", "4")
        got1 = [(await c1.next("MESSAGE")).body for _ in range(2)]
        got2 = [(await c2.next("MESSAGE")).body for _ in range(2)]
        assert sorted(got1 + got2) == [b"1", b"2", b"3", b"4"]
        assert await c1.quiet(0.1) == [] and await c2.quiet(0.1) == []


async def test_queue_keeps_messages_until_a_consumer_comes(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await _send(p, "/queue/later", "a", "b")
        await c.subscribe("/queue/later")
        assert [(await c.next("MESSAGE")).body for _ in range(2)] == [b"a", b"b"]


async def test_client_ack_is_cumulative(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/cum", ack="client")
        await _send(p, "/queue/cum", "1", "2", "3")
        msgs = [await c.next("MESSAGE") for _ in range(3)]
        assert all(m.get("ack") for m in msgs)
        # ACK of the second acknowledges the first too; the third stays unacked
        await c.receipt("ACK", {"id": msgs[1].get("ack", "")}, rid="a2")
        await c.frame("ACK", {"id": msgs[0].get("ack", "")})
        await c.expect_error("ACK of unknown id")
    # only "3" comes back to the next consumer: 1 and 2 were acknowledged
    async with tcp_client(server.tcp_port) as c:
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/cum")
        m = await c.next("MESSAGE")
        assert m.body == b"3" and m.get("redelivered") == "true"
        assert await c.quiet(0.1) == []


async def test_client_individual_ack_is_per_message(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/ind", ack="client-individual")
        await _send(p, "/queue/ind", "1", "2", "3")
        msgs = [await c.next("MESSAGE") for _ in range(3)]
        await c.receipt("ACK", {"id": msgs[1].get("ack", "")}, rid="a")
        await c.receipt("ACK", {"id": msgs[0].get("ack", "")}, rid="b")  # still unacked: fine
    async with tcp_client(server.tcp_port) as c:
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/ind")
        assert (await c.next("MESSAGE")).body == b"3"
        assert await c.quiet(0.1) == []


async def test_nack_redelivers_to_another_consumer(server: BrokerServer) -> None:
    async with (
        tcp_client(server.tcp_port) as p,
        tcp_client(server.tcp_port) as c1,
        tcp_client(server.tcp_port) as c2,
    ):
        await p.connect(passcode="token-alice")
        await c1.connect(passcode="token-bob")
        await c2.connect(passcode="token-carol")
        await c1.subscribe("/queue/n", ack="client-individual")
        await _send(p, "/queue/n", "job")
        m = await c1.next("MESSAGE")
        assert m.get("redelivered") is None
        await c2.subscribe("/queue/n", ack="client-individual")
        await c1.receipt("NACK", {"id": m.get("ack", "")}, rid="n")
        again = await c2.next("MESSAGE")
        assert again.body == b"job"
        assert again.get("redelivered") == "true"
        assert again.get("message-id") == m.get("message-id")
        await c2.receipt("ACK", {"id": again.get("ack", "")}, rid="ok")
        assert await c1.quiet(0.1) == []


async def test_unacked_at_disconnect_goes_to_another_consumer(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c2:
        await p.connect(passcode="token-alice")
        await c2.connect(passcode="token-carol")
        async with tcp_client(server.tcp_port) as c1:
            await c1.connect(passcode="token-bob")
            await c1.subscribe("/queue/d", ack="client")
            await _send(p, "/queue/d", "x", "y")
            assert (await c1.next("MESSAGE")).body == b"x"
            assert (await c1.next("MESSAGE")).body == b"y"
            await c2.subscribe("/queue/d", ack="client")
        # c1's connection dropped without ACK: both are redelivered, in order
        m1, m2 = await c2.next("MESSAGE"), await c2.next("MESSAGE")
        assert (m1.body, m2.body) == (b"x", b"y")
        assert m1.get("redelivered") == m2.get("redelivered") == "true"


async def test_topic_fans_out_to_every_subscriber(server: BrokerServer) -> None:
    async with (
        tcp_client(server.tcp_port) as p,
        tcp_client(server.tcp_port) as c1,
        tcp_client(server.tcp_port) as c2,
    ):
        await p.connect(passcode="token-alice")
        await c1.connect(passcode="token-bob")
        await c2.connect(passcode="token-carol")
        await c1.subscribe("/topic/all")
        await c2.subscribe("/topic/all", sub_id="7")
        await _send(p, "/topic/all", "news")
        assert (await c1.next("MESSAGE")).body == b"news"
        m = await c2.next("MESSAGE")
        assert m.body == b"news" and m.get("subscription") == "7"


async def test_unsubscribe_stops_delivery(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await c.subscribe("/topic/u")
        await c.receipt("UNSUBSCRIBE", {"id": "0"})
        await _send(p, "/topic/u", "gone")
        assert await c.quiet(0.2) == []


async def test_transaction_commit_and_abort(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/tx")
        await p.receipt("BEGIN", {"transaction": "t1"}, rid="b")
        await p.receipt("SEND", {"destination": "/queue/tx", "transaction": "t1"}, "one", rid="s1")
        await p.receipt("SEND", {"destination": "/queue/tx", "transaction": "t1"}, "two", rid="s2")
        assert await c.quiet(0.2) == []  # nothing before COMMIT
        await p.receipt("COMMIT", {"transaction": "t1"}, rid="c")
        assert (await c.next("MESSAGE")).body == b"one"
        assert (await c.next("MESSAGE")).body == b"two"
        await p.receipt("BEGIN", {"transaction": "t2"}, rid="b2")
        await p.receipt(
            "SEND", {"destination": "/queue/tx", "transaction": "t2"}, "never", rid="s3"
        )
        await p.receipt("ABORT", {"transaction": "t2"}, rid="a")
        assert await c.quiet(0.2) == []


async def test_acks_in_a_transaction_apply_at_commit(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p:
        await p.connect(passcode="token-alice")
        await _send(p, "/queue/txack", "m")
        async with tcp_client(server.tcp_port) as c:
            await c.connect(passcode="token-bob")
            await c.subscribe("/queue/txack", ack="client")
            m = await c.next("MESSAGE")
            await c.receipt("BEGIN", {"transaction": "t"}, rid="b")
            await c.receipt("ACK", {"id": m.get("ack", ""), "transaction": "t"}, rid="a")
            await c.receipt("ABORT", {"transaction": "t"}, rid="x")
        # the ACK was aborted: the message is still there
        async with tcp_client(server.tcp_port) as c:
            await c.connect(passcode="token-bob")
            await c.subscribe("/queue/txack", ack="client")
            m = await c.next("MESSAGE")
            assert m.body == b"m"
            await c.receipt("BEGIN", {"transaction": "t"}, rid="b")
            await c.receipt("ACK", {"id": m.get("ack", ""), "transaction": "t"}, rid="a")
            await c.receipt("COMMIT", {"transaction": "t"}, rid="c")
        async with tcp_client(server.tcp_port) as c:
            await c.connect(passcode="token-bob")
            await c.subscribe("/queue/txack")
            assert await c.quiet(0.2) == []


async def test_open_transaction_aborts_on_disconnect(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        await c.connect(passcode="token-bob")
        await c.subscribe("/queue/txd")
        async with tcp_client(server.tcp_port) as p:
            await p.connect(passcode="token-alice")
            await p.receipt("BEGIN", {"transaction": "t"}, rid="b")
            await p.receipt(
                "SEND", {"destination": "/queue/txd", "transaction": "t"}, "lost", rid="s"
            )
        await trio.sleep(0.1)
        assert await c.quiet(0.2) == []


async def test_disconnect_with_receipt(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as c:
        await c.connect(passcode="token-bob")
        await c.frame("DISCONNECT", {"receipt": "bye"})
        r = await c.next("RECEIPT")
        assert r.get("receipt-id") == "bye"
        await c.wait_closed()


async def test_message_headers_pass_through_but_reserved_ones_do_not(server: BrokerServer) -> None:
    async with tcp_client(server.tcp_port) as p, tcp_client(server.tcp_port) as c:
        await p.connect(passcode="token-alice")
        await c.connect(passcode="token-bob")
        await c.subscribe("/topic/h", ack="client")
        await p.receipt(
            "SEND",
            {
                "destination": "/topic/h",
                "x-trace": "abc",
                "message-id": "spoof",
                "content-type": "application/json",
            },
            "{}",
        )
        m = await c.next("MESSAGE")
        assert m.get("x-trace") == "abc"
        assert m.get("message-id") != "spoof"
        assert m.get("content-type") == "application/json"
        assert m.get("content-length") == "2"
        assert m.get("ack")
