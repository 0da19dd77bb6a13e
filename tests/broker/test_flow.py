"""Per-user SEND rate limit and slow consumers."""

from __future__ import annotations

import json

import pytest
import trio

from securecollab.backplane import Delivery
from securecollab.broker.config import AclRule
from securecollab.broker.session import State

from .clients import eventually, tcp_client
from .harness import broker_server

OPEN = (AclRule("/topic/*", ("*",), ("*",)), AclRule("/queue/*", ("*",), ("*",)))


async def test_rate_limit_drops_excess_sends_without_receipt_and_notices_once() -> None:
    async with broker_server(acl=OPEN, send_limit=3, send_window_s=60) as srv:
        async with (
            tcp_client(srv.tcp_port) as a,
            tcp_client(srv.tcp_port) as other,
            tcp_client(srv.tcp_port) as sub,
        ):
            await a.connect(passcode="token-alice")
            await other.connect(passcode="token-bob")
            await sub.connect(passcode="token-carol")
            await sub.subscribe("/topic/flood")
            await a.subscribe("/user/queue/errors")
            for i in range(6):
                await a.frame("SEND", {"destination": "/topic/flood", "receipt": f"s{i}"}, str(i))
            await a.receipt("UNSUBSCRIBE", {"id": "0"}, rid="sync")  # frames are handled in order
            receipts = [f.get("receipt-id") for f in a.frames if f.command == "RECEIPT"]
            notices = [f for f in a.frames if f.command == "MESSAGE"]
            assert receipts == ["s0", "s1", "s2"]
            assert len(notices) == 1
            notice = json.loads(notices[0].body)
            assert notice["error"] == "rate_limited" and notice["retryAfterMs"] > 0
            assert [(await sub.next("MESSAGE")).body for _ in range(3)] == [b"0", b"1", b"2"]
            assert await sub.quiet(0.2) == []
            assert not a.closed.is_set()  # dropped, not disconnected
            # the limit is per user: bob is not affected
            await other.receipt("SEND", {"destination": "/topic/flood"}, "bob")
            assert (await sub.next("MESSAGE")).body == b"bob"


async def test_slow_consumer_is_cut_off_while_others_keep_receiving() -> None:
    async with broker_server(
        acl=OPEN, outbound_queue_frames=20, outbound_queue_bytes=512 * 1024, close_grace_s=5
    ) as srv:
        slow_stream = await trio.open_tcp_stream("127.0.0.1", srv.tcp_port)
        await slow_stream.send_all(
            b"CONNECT\naccept-version:1.2\nhost:x\npasscode:token-alice\n\n\x00"
            b"SUBSCRIBE\ndestination:/topic/big\nid:0\nreceipt:ok\n\n\x00"
        )
        async with tcp_client(srv.tcp_port) as fast:
            await fast.connect(passcode="token-bob")
            await fast.subscribe("/topic/big")
            await eventually(
                lambda: any(
                    s.subscriptions
                    for s in srv.broker.sessions.values()
                    if s.info and s.info.user_id == "alice"
                )
            )
            slow = next(
                s for s in srv.broker.sessions.values() if s.info and s.info.user_id == "alice"
            )
            body = b"x" * 60_000
            sent = 0
            # the slow client never reads: kernel buffers fill, then its bounded queue
            with trio.fail_after(20):
                while slow.state is not State.CLOSING:
                    await srv.backplane.publish(
                        Delivery("topic", "/topic/big", body, (), None, str(sent))
                    )
                    sent += 1
                    m = await fast.next("MESSAGE")  # the fast client keeps up, in order
                    assert m.get("message-id") == str(sent - 1) and m.body == body
            await srv.backplane.publish(
                Delivery("topic", "/topic/big", b"after", (), None, "after")
            )
            assert (await fast.next("MESSAGE")).body == b"after"
            # the slow client, reading at last, finds ERROR "slow consumer" after what was in flight
            data = b""
            with trio.fail_after(10):
                while True:
                    chunk = await slow_stream.receive_some(1 << 20)
                    if not chunk:
                        break
                    data += chunk
            assert b"ERROR\nmessage:slow consumer\n" in data
            frames = data.split(b"\x00")
            assert frames[-2].lstrip(b"\n").startswith(b"ERROR")  # the last frame
            assert sent * len(body) > 512 * 1024  # the byte bound was what tripped
            await slow_stream.aclose()


@pytest.mark.parametrize("write_pass", [True, False], ids=["write-pass", "direct"])
async def test_a_backlog_longer_than_the_outbound_queue_reaches_a_consumer_that_reads(
    write_pass: bool,
) -> None:
    # a queue's backlog goes to a new consumer in one go (one scheduler pass): what the
    # kernel takes at once is not "waiting for this connection", so a client that reads
    # gets all of it; only one that does not read is a slow consumer
    async with broker_server(
        acl=OPEN, outbound_queue_frames=20, send_limit=1_000, write_pass=write_pass
    ) as srv:
        async with tcp_client(srv.tcp_port) as producer, tcp_client(srv.tcp_port) as consumer:
            await producer.connect(passcode="token-alice")
            await consumer.connect(passcode="token-bob")
            for i in range(49):
                await producer.frame("SEND", {"destination": "/queue/jobs"}, str(i))
            await producer.receipt("SEND", {"destination": "/queue/jobs"}, "49", rid="last")
            await consumer.subscribe("/queue/jobs")
            bodies = [(await consumer.next("MESSAGE")).body for _ in range(50)]
            assert bodies == [str(i).encode() for i in range(50)]
            assert not consumer.closed.is_set()
