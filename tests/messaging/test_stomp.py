"""Messaging through the STOMP door (raw TCP, real sockets), on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
import trio

from tests.support.server import PASSWORD

from .conftest import Live, envelope
from .stomp_client import SubscribeRefused, stomp_connect

A, B, C, D = "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"
PRIVATE = "/user/queue/private"
SEND = "/app/chat/send"


async def offline_ids(live: Live, user: str) -> list[str]:
    r = await live.http.get("/api/chat/offline-messages", headers=live.h(user))
    return [m["id"] for m in r.json()]


async def history_ids(live: Live, user: str, other: str) -> list[str]:
    r = await live.http.get("/api/chat/messages", params={"with": other}, headers=live.h(user))
    return [m["id"] for m in r.json()]


async def until_offline_is(live: Live, user: str, expected: list[str]) -> None:
    """ack:auto removal happens after the frame is written: wait (bounded) for it."""
    for _ in range(500):  # bounded: ~10 s at most
        if await offline_ids(live, user) == expected:
            return
        await trio.sleep(0.02)
    raise AssertionError(f"offline queue of {user} never became {expected}")


async def test_send_receipt_means_stored_and_delivery_reaches_peer_and_other_devices(
    live: Live,
) -> None:
    port = live.stomp_port
    async with (
        stomp_connect(port, live.tokens[B], device="phone") as bob,
        stomp_connect(port, live.tokens[A], device="laptop") as a1,
        stomp_connect(port, live.tokens[A], device="tablet") as a2,
    ):
        for c in (bob, a1, a2):
            await c.subscribe(PRIVATE)
        sent = envelope(to=B, clientMessageId="c-1")
        receipt = await a1.send_json(SEND, sent)
        assert receipt.command == "RECEIPT", receipt
        # A RECEIPT means durable: the message is in history right away.
        [mid] = await history_ids(live, B, A)

        frame, body = await bob.message(PRIVATE)
        assert frame.get("content-type") == "application/json"
        assert frame.get("message-id") == mid
        assert body["id"] == mid and body["from"] == A and body["to"] == B
        assert body["channelId"] is None and isinstance(body["createdAt"], int)
        assert (body["encryptedContent"], body["iv"], body["keys"]) == (
            sent["encryptedContent"],
            sent["iv"],
            sent["keys"],
        )
        _, synced = await a2.message(PRIVATE)  # alice's other device sees what she sent
        assert synced["id"] == mid

        # The sending session gets no copy of its own message: the next thing it sees is
        # the message its sibling device sends afterwards.
        assert (await a2.send_json(SEND, envelope(to=B))).command == "RECEIPT"
        _, next_for_a1 = await a1.message(PRIVATE)
        assert next_for_a1["id"] != mid and next_for_a1["from"] == A

        # An idempotent retry over STOMP is receipted and stores nothing new.
        assert (await a1.send_json(SEND, sent)).command == "RECEIPT"
        assert len(await history_ids(live, A, B)) == 2
    # Bob was online: nothing was queued for him.
    assert await offline_ids(live, B) == []


@pytest.mark.parametrize(
    "body, why",
    [
        (envelope(to=B, text="hi bob"), "plaintext is not accepted"),
        (envelope(to="ghost@example.com"), "does not exist"),
        (envelope(to=B, encryptedContent="***"), "encryptedContent is not valid base64"),
        ("not an object", "invalid JSON body"),
    ],
)
async def test_refused_sends_get_an_error_frame_and_store_nothing(
    live: Live, body: object, why: str
) -> None:
    async with stomp_connect(live.stomp_port, live.tokens[A]) as alice:
        frame = await alice.send_json(SEND, body)
        assert frame.command == "ERROR"
        assert why in (frame.get("message") or "") + frame.body.decode()
    assert await history_ids(live, A, B) == []


async def test_offline_queue_first_oldest_first_then_live_removed_only_on_ack(live: Live) -> None:
    queued = [(await live.send(A, envelope(to=B))).json()["id"] for _ in range(3)]
    assert await offline_ids(live, B) == queued
    async with (
        stomp_connect(live.stomp_port, live.tokens[B]) as bob,
        stomp_connect(live.stomp_port, live.tokens[A]) as alice,
    ):
        await bob.subscribe(PRIVATE, ack="client-individual")
        frames = [await bob.message(PRIVATE) for _ in queued]
        assert [b["id"] for _, b in frames] == queued
        for f, _ in frames[:2]:
            await bob.ack(f)
        assert (await alice.send_json(SEND, envelope(to=B))).command == "RECEIPT"
        live_frame, live_body = await bob.message(PRIVATE)
        assert live_body["id"] not in queued
        await bob.ack(live_frame)
        # Only the un-ACKed one is still queued (a crash now would lose nothing).
        assert await offline_ids(live, B) == queued[2:]

    async with stomp_connect(live.stomp_port, live.tokens[B]) as bob:
        await bob.subscribe(PRIVATE)  # ack:auto: removed once written to the socket
        _, again = await bob.message(PRIVATE)
        assert again["id"] == queued[2]
        await until_offline_is(live, B, [])


async def test_channel_topic_members_only_and_removal_ends_the_subscription(live: Live) -> None:
    r = await live.http.post("/api/channels/create", json={"name": "ops"}, headers=live.h(A))
    cid = r.json()["id"]
    topic = f"/topic/messages/{cid}"
    await live.http.post(f"/api/channels/{cid}/invite", json={"userIds": [B]}, headers=live.h(A))
    port = live.stomp_port
    async with (
        stomp_connect(port, live.tokens[A]) as alice,
        stomp_connect(port, live.tokens[B]) as bob,
    ):
        await bob.subscribe(topic)
        await bob.subscribe("/user/queue/channels")
        await bob.subscribe(PRIVATE)
        assert (await alice.send_json(SEND, envelope(channelId=cid))).command == "RECEIPT"
        frame, body = await bob.message(topic)
        assert body["channelId"] == cid and body["from"] == A
        assert frame.get("content-type") == "application/json"

        # Carol is invited while connected: she hears about it on /user/queue/channels.
        async with stomp_connect(port, live.tokens[C]) as carol:
            await carol.subscribe("/user/queue/channels")
            await live.http.post(
                f"/api/channels/{cid}/invite", json={"userIds": [C]}, headers=live.h(A)
            )
            _, notice = await carol.message("/user/queue/channels")
            assert notice["type"] == "INVITED" and notice["channelId"] == cid
            assert notice["userIds"] == [C]

        r = await live.http.delete(f"/api/channels/{cid}/members/{B}", headers=live.h(A))
        assert r.status_code == 200
        _, removed = await bob.message("/user/queue/channels")
        removed_notices = [removed]
        while removed_notices[-1]["type"] != "REMOVED":  # carol's INVITED came first
            removed_notices.append((await bob.message("/user/queue/channels"))[1])
        assert removed_notices[-1]["userId"] == B
        # After the removal, bob's topic subscription is gone: a channel message sent
        # now never reaches him, while a 1:1 sent after it does.
        assert (await alice.send_json(SEND, envelope(channelId=cid))).command == "RECEIPT"
        assert (await alice.send_json(SEND, envelope(to=B))).command == "RECEIPT"
        await bob.message(PRIVATE)
        assert [f for f in bob.pending() if f.get("destination") == topic] == []
        # And he cannot subscribe again.
        with pytest.raises(SubscribeRefused):
            await bob.subscribe(topic)


async def test_non_members_can_neither_subscribe_nor_send_into_a_channel(live: Live) -> None:
    r = await live.http.post("/api/channels/create", json={"name": "private"}, headers=live.h(A))
    cid = r.json()["id"]
    async with stomp_connect(live.stomp_port, live.tokens[D]) as dave:
        with pytest.raises(SubscribeRefused, match=cid):
            await dave.subscribe(f"/topic/messages/{cid}")
    async with stomp_connect(live.stomp_port, live.tokens[D]) as dave:
        frame = await dave.send_json(SEND, envelope(channelId=cid))
        assert frame.command == "ERROR" and "not found" in (frame.get("message") or "")
    r = await live.http.get(f"/api/channels/{cid}/messages", headers=live.h(A))
    assert r.json() == []


async def test_nobody_subscribes_to_another_users_queue(live: Live) -> None:
    await live.send(A, envelope(to=B))
    async with stomp_connect(live.stomp_port, live.tokens[C]) as carol:
        with pytest.raises(SubscribeRefused):
            await carol.subscribe(f"/user/{B}/queue/private")
    assert len(await offline_ids(live, B)) == 1  # bob's queue untouched


async def test_stomp_message_body_is_the_rest_history_row(live: Live) -> None:
    async with stomp_connect(live.stomp_port, live.tokens[B]) as bob:
        await bob.subscribe(PRIVATE)
        await live.send(A, envelope(to=B, clientMessageId="same-shape"))
        frame, body = await bob.message(PRIVATE)
    r = await live.http.get("/api/chat/messages", params={"with": A}, headers=live.h(B))
    assert r.json() == [body] == [json.loads(frame.body)]


async def test_largest_allowed_ciphertext_fits_both_doors(live: Live) -> None:
    import base64
    import os

    biggest = base64.b64encode(os.urandom(65536)).decode()
    too_big = base64.b64encode(os.urandom(65537)).decode()
    async with stomp_connect(live.stomp_port, live.tokens[A]) as alice:
        ok = await alice.send_json(SEND, envelope(to=B, encryptedContent=biggest))
        assert ok.command == "RECEIPT"
        refused = await alice.send_json(SEND, envelope(to=B, encryptedContent=too_big))
        assert refused.command == "ERROR" and "larger than 65536" in refused.get("message", "")
    assert (await live.send(A, envelope(to=B, encryptedContent=biggest))).status_code == 201
    assert (await live.send(A, envelope(to=B, encryptedContent=too_big))).status_code == 422


async def test_logout_closes_that_sessions_connections_and_refuses_its_token(
    live: Live,
) -> None:
    # a second login of A: another session, which the logout must leave alone
    r = await live.http.post("/api/auth/login", json={"username": A, "password": PASSWORD})
    assert r.status_code == 200
    other = r.json()["token"]
    async with (
        stomp_connect(live.stomp_port, live.tokens[A]) as alice,
        stomp_connect(live.stomp_port, other) as alice_elsewhere,
    ):
        await alice.subscribe(PRIVATE)
        await alice_elsewhere.subscribe(PRIVATE)
        r = await live.http.post("/api/auth/logout", json={}, headers=live.h(A))
        assert r.status_code == 200
        error = await alice.expect("ERROR")
        assert "logged out" in (error.get("message") or "")
        with trio.fail_after(10):
            while not alice.closed:  # noqa: ASYNC110 - the reader task sets it
                await trio.sleep(0.01)
        # the other session still works: a message reaches it
        assert (await live.send(B, envelope(to=A))).status_code == 201
        await alice_elsewhere.message(PRIVATE)
    refused = False
    try:  # the logged-out token cannot connect again
        async with stomp_connect(live.stomp_port, live.tokens[A]):
            pass  # pragma: no cover
    except* ConnectionError:
        refused = True
    assert refused
