"""The messaging services on real stores (SQLite and PostgreSQL), below both doors."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from securecollab.ids import now_ms
from securecollab.services.errors import ConflictError, Forbidden, InvalidInput, NotFoundError
from securecollab.services.keys import canonical_public_key, check_device_id
from securecollab.services.messages import KnownRecipients, NotQueued, parse_page
from securecollab.store import Page, UserRecord

from .conftest import Chat
from .conftest import envelope as env

A, B, C, D = "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"


def pem(key: object) -> str:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# ---------------------------------------------------------------- 1:1 messages


async def test_send_stores_delivers_and_syncs_the_senders_other_sessions(chat: Chat) -> None:
    await chat.online(B)
    sent = env(to=B)
    r = await chat.messages.send(A, sent, session_id="alice-s1")
    assert r.created and r.message.recipient_id == B and r.message.sender_id == A

    [to_bob] = [d for d in chat.delivered if d.user_id == B]
    assert to_bob.destination == "/user/queue/private" and to_bob.message_id == r.message.id
    assert ("content-type", "application/json") in to_bob.headers
    body = json.loads(to_bob.body)
    assert body == {
        "id": r.message.id,
        "from": A,
        "to": B,
        "channelId": None,
        "encryptedContent": sent["encryptedContent"],
        "iv": sent["iv"],
        "keys": sent["keys"],
        "createdAt": r.message.created_at,
        "clientMessageId": None,
    }
    [to_alice] = [d for d in chat.delivered if d.user_id == A]
    assert to_alice.exclude_session == "alice-s1"  # her other devices, not the sending one
    # Bob was online: nothing queued for him.
    assert await chat.offline.pending(B) == []


async def test_offline_recipient_gets_a_queue_entry_in_the_same_commit(chat: Chat) -> None:
    r = await chat.messages.send(A, env(to=B))
    [entry] = await chat.offline.pending(B)
    assert entry.message.id == r.message.id
    assert entry.expires_at - entry.queued_at == 7 * 24 * 3600 * 1000
    # The outbox row for the event log is there too, keyed by the message id.
    outbox = [o for o in await chat.store.fetch_outbox() if o.id == r.message.id]
    assert [(o.topic, o.key) for o in outbox] == [("chat.messages", r.message.id)]
    assert b"encryptedContent" not in outbox[0].payload


async def test_connected_but_not_subscribed_recipient_gets_a_queue_entry(chat: Chat) -> None:
    # Bob's session is connected (ONLINE) but never subscribed to /user/queue/private:
    # nothing would reach him live, so the message waits in his queue.
    await chat.online(B, subscribed=False)
    r = await chat.messages.send(A, env(to=B))
    assert [e.message.id for e in await chat.offline.pending(B)] == [r.message.id]


async def test_hand_back_queues_once_and_never_the_senders_own(chat: Chat) -> None:
    await chat.online(B)
    r = await chat.messages.send(A, env(to=B))
    assert await chat.offline.pending(B) == []
    # the broker reports the live copy as undelivered (Bob's session was closing)
    await chat.messages.hand_back(B, [r.message.id])
    await chat.messages.hand_back(B, [r.message.id])
    [entry] = await chat.offline.pending(B)
    assert entry.message.id == r.message.id
    # Alice's own sync copy is never queued for her
    await chat.messages.hand_back(A, [r.message.id])
    assert await chat.offline.pending(A) == []


async def test_client_message_id_makes_a_retry_return_the_original(chat: Chat) -> None:
    first = await chat.messages.send(A, env(to=B, clientMessageId="cm-1"))
    retry = await chat.messages.send(A, env(to=B, clientMessageId="cm-1"))
    assert not retry.created and retry.message.id == first.message.id
    assert retry.message.encrypted_content == first.message.encrypted_content
    history = await chat.messages.direct_history(B, A, Page())
    assert [m.id for m in history] == [first.message.id]
    assert len(await chat.offline.pending(B)) == 1
    # The same id from another sender is another message.
    other = await chat.messages.send(C, env(to=B, clientMessageId="cm-1"))
    assert other.created and other.message.id != first.message.id


async def test_unknown_recipient_and_plaintext_are_refused(chat: Chat) -> None:
    with pytest.raises(NotFoundError, match=r"nobody@example\.com"):
        await chat.messages.send(A, env(to="nobody@example.com"))
    with pytest.raises(InvalidInput, match="plaintext is not accepted"):
        await chat.messages.send(A, env(to=B, content="hi bob"))
    assert await chat.messages.direct_history(A, B, Page()) == []


async def test_a_refused_recipient_is_found_as_soon_as_it_registers(chat: Chat) -> None:
    # "does not exist" is never cached: only recipients known to exist are
    with pytest.raises(NotFoundError):
        await chat.messages.send(A, env(to="erin@example.com"))
    await chat.store.create_user(
        UserRecord("erin@example.com", "x", "Erin", ("ROLE_USER",), now_ms())
    )
    r = await chat.messages.send(A, env(to="ERIN@example.com"))
    assert r.message.recipient_id == "erin@example.com"  # the stored spelling


async def test_a_deleted_recipient_is_refused_once_its_cache_entry_expired(chat: Chat) -> None:
    clock = [1000.0]
    chat.messages.known_recipients = KnownRecipients(ttl_s=2.0, clock=lambda: clock[0])
    assert (await chat.messages.send(A, env(to=B))).created  # Bob is now known to exist
    await chat.store.set_user_deleted(B, now_ms())
    # the documented trade-off: for up to ttl_s the cached answer stands
    assert (await chat.messages.send(A, env(to="Bob@example.com"))).message.recipient_id == B
    clock[0] += 2.0
    with pytest.raises(NotFoundError, match="does not exist"):
        await chat.messages.send(A, env(to=B))
    assert len(await chat.messages.direct_history(A, B, Page())) == 2


async def test_history_pages_newest_first_by_offset_cursor_and_date(chat: Chat) -> None:
    ids = [
        (await chat.messages.send(A if i % 2 else B, env(to=B if i % 2 else A))).message.id
        for i in range(7)
    ]
    newest_first = list(reversed(ids))
    page = await chat.messages.direct_history(A, B, Page(limit=3))
    assert [m.id for m in page] == newest_first[:3]
    page2 = await chat.messages.direct_history(A, B, Page(limit=3, offset=3))
    assert [m.id for m in page2] == newest_first[3:6]
    cursor = await chat.messages.direct_history(A, B, Page(limit=3, before_id=page[-1].id))
    assert [m.id for m in cursor] == newest_first[3:6]
    all_rows = await chat.messages.direct_history(B, A, Page(limit=200))
    t = all_rows[3].created_at
    dated = await chat.messages.direct_history(A, B, Page(limit=200, from_date=t, to_date=t))
    assert {m.id for m in dated} >= {all_rows[3].id}
    assert all(m.created_at == t for m in dated)


async def test_a_user_never_reads_another_pairs_conversation(chat: Chat) -> None:
    await chat.messages.send(B, env(to=C))
    await chat.messages.send(A, env(to=B))
    # Alice asking for "with carol" sees her own (empty) conversation, never bob<->carol.
    assert await chat.messages.direct_history(A, C, Page()) == []
    with_bob = await chat.messages.direct_history(A, B, Page())
    assert [(m.sender_id, m.recipient_id) for m in with_bob] == [(A, B)]


def test_page_parameters_are_checked() -> None:
    assert parse_page({"limit": "200", "offset": "5"}) == Page(limit=200, offset=5)
    for bad, why in [
        ({"limit": "201"}, "limit must be between 1 and 200"),
        ({"limit": "0"}, "limit must be between 1 and 200"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"offset": "-1"}, "offset must be between"),
        ({"fromDate": "5", "toDate": "4"}, "fromDate must not be after toDate"),
        ({"before": "x; drop table"}, "before must be a message id"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            parse_page(bad)


# ---------------------------------------------------------------- offline queue


async def test_offline_list_does_not_delete_and_ack_is_own_only(chat: Chat) -> None:
    m1 = (await chat.messages.send(A, env(to=B))).message
    m2 = (await chat.messages.send(C, env(to=B))).message
    m3 = (await chat.messages.send(A, env(to=C))).message
    assert [e.message.id for e in await chat.offline.pending(B)] == [m1.id, m2.id]  # oldest first
    assert [e.message.id for e in await chat.offline.pending(B)] == [m1.id, m2.id]  # still there
    # Carol acking bob's entries removes nothing from bob's queue.
    assert await chat.offline.ack(C, [m1.id, m2.id]) == 0
    assert len(await chat.offline.pending(B)) == 2
    assert await chat.offline.ack(B, [m1.id]) == 1
    assert await chat.offline.ack(B, [m1.id]) == 0  # idempotent
    assert [e.message.id for e in await chat.offline.pending(B)] == [m2.id]
    assert [e.message.id for e in await chat.offline.pending(C)] == [m3.id]
    with pytest.raises(InvalidInput, match="ids must be a list"):
        await chat.offline.ack(B, "all")


async def test_prune_deletes_only_expired_entries_and_counts_them(chat: Chat) -> None:
    from securecollab.services.offline import OFFLINE_PRUNED

    chat.messages.offline_ttl_ms = -1  # already expired when written
    await chat.messages.send(A, env(to=B))
    chat.messages.offline_ttl_ms = 7 * 24 * 3600 * 1000
    keep = (await chat.messages.send(A, env(to=B))).message
    before = OFFLINE_PRUNED._value.get()
    assert await chat.offline.prune_expired() == 1
    assert OFFLINE_PRUNED._value.get() == before + 1
    assert [e.message.id for e in await chat.offline.pending(B)] == [keep.id]
    # The message itself stays in history.
    assert len(await chat.messages.direct_history(B, A, Page())) == 2


async def test_delivered_hook_acks_the_offline_entry(chat: Chat) -> None:
    m = (await chat.messages.send(A, env(to=B))).message
    await chat.offline.delivered(B, [m.id])
    assert await chat.offline.pending(B) == []


async def test_delivery_acks_skip_the_store_only_for_messages_never_queued(chat: Chat) -> None:
    await chat.online(B)
    live = (await chat.messages.send(A, env(to=B))).message  # Bob subscribed: not queued
    assert await chat.offline.pending(B) == []
    # Bob's and Alice's (sync copy) deliveries of it need no queue delete
    assert chat.messages.may_be_queued(B, [live.id]) == []
    assert chat.messages.may_be_queued(A, [live.id]) == []
    # handed back (Bob's session dropped it): queued now, so its later delivery is acked
    again = (await chat.messages.send(A, env(to=B))).message
    await chat.messages.hand_back(B, [again.id])
    assert chat.messages.may_be_queued(B, [again.id]) == [again.id]
    await chat.offline.delivered(B, [again.id])
    assert await chat.offline.pending(B) == []
    # queued for an offline recipient: always acked; unknown ids (another node): acked
    await chat.backplane.presence_disconnect(B, "s1", now_ms())
    await chat.backplane.subscriber_remove("/user/queue/private", B, "s1")
    queued = (await chat.messages.send(A, env(to=B))).message
    assert chat.messages.may_be_queued(B, [queued.id, "other-node-id"]) == [
        queued.id,
        "other-node-id",
    ]
    # an entry read out of the queue is never treated as unqueued
    chat.messages.not_queued.add(B, queued.id)
    chat.messages.queued_out(B, [queued.id])
    assert chat.messages.may_be_queued(B, [queued.id]) == [queued.id]


def test_not_queued_pairs_are_bounded_oldest_first() -> None:
    pairs = NotQueued(max_entries=3)
    for i in range(5):
        pairs.add("Bob@example.com", f"m{i}")
    # m0 and m1 were evicted: for them the ack goes to the store (correct, one write)
    assert pairs.may_be_queued("bob@example.com", ["m0", "m1", "m2", "m3", "m4"]) == ["m0", "m1"]
    assert pairs.may_be_queued("bob@example.com", ["m2"]) == ["m2"]  # reported once: forgotten


# ---------------------------------------------------------------- channels


async def test_channel_lifecycle_membership_and_notices(chat: Chat) -> None:
    view = await chat.channels.create(A, {"name": "  ops  ", "description": "on call"})
    cid = view.channel.id
    assert view.to_json()["members"] == [A] and view.channel.name == "ops"
    assert view.channel.settings == {"encryption": "E2EE"}
    assert await chat.channels.invite(A, cid, [B, "CAROL@example.com"]) == 2
    assert await chat.channels.invite(A, cid, [B, D]) == 1  # bob is already in
    got = await chat.channels.get(B, cid)
    assert sorted(got.to_json()["members"]) == sorted([A, B, C, D])
    assert [v.channel.id for v in await chat.channels.list_mine(C)] == [cid]
    invited = chat.bodies("user", "/user/queue/channels", C)
    assert invited and invited[0]["type"] == "INVITED" and C in invited[0]["userIds"]

    await chat.channels.remove_member(A, cid, C)
    removed = chat.bodies("user", "/user/queue/channels", C)[-1]
    assert removed["type"] == "REMOVED" and removed["userId"] == C
    control = [d for d in chat.delivered if d.kind == "control"]
    assert [(d.user_id, d.destination) for d in control] == [(C, f"/topic/messages/{cid}")]
    await chat.channels.leave(D, cid)
    assert not await chat.channels.is_member(D, cid)
    actions = [(a.action, a.target) for a in await chat.audit.list(action_prefix="channel.")]
    assert ("channel.invite", cid) in actions and ("channel.remove", cid) in actions
    assert ("channel.leave", cid) in actions and ("channel.create", cid) in actions


async def test_channel_authorization_rules(chat: Chat) -> None:
    cid = (await chat.channels.create(A, {"name": "secret"})).channel.id
    await chat.channels.invite(A, cid, [B])
    with pytest.raises(Forbidden):
        await chat.channels.invite(B, cid, [C])  # a plain member cannot invite
    with pytest.raises(NotFoundError):
        await chat.channels.invite(C, cid, [D])  # a non-member does not even see it
    with pytest.raises(NotFoundError):
        await chat.channels.get(C, cid)
    with pytest.raises(NotFoundError):
        await chat.messages.channel_history(C, cid, Page())
    with pytest.raises(NotFoundError):
        await chat.messages.send(C, env(channelId=cid))
    with pytest.raises(Forbidden):
        await chat.channels.remove_member(B, cid, A)
    with pytest.raises(ConflictError):
        await chat.channels.leave(A, cid)
    with pytest.raises(InvalidInput, match=r"unknown users: ghost@example\.com"):
        await chat.channels.invite(A, cid, [C, "ghost@example.com"])
    assert not await chat.channels.is_member(C, cid)  # nobody added on a refused invite
    # An admin may invite members, but not admins.
    await chat.channels.invite(A, cid, [D], "admin")
    assert await chat.channels.invite(D, cid, [C]) == 1
    with pytest.raises(Forbidden):
        await chat.channels.invite(D, cid, [C], "admin")


async def test_channel_message_goes_to_topic_and_offline_members(chat: Chat) -> None:
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await chat.channels.invite(A, cid, [B, C])
    await chat.online(B)
    r = await chat.messages.send(A, env(channelId=cid), session_id="a1")
    [topic] = [d for d in chat.delivered if d.kind == "topic"]
    assert topic.destination == f"/topic/messages/{cid}" and topic.exclude_session == "a1"
    assert json.loads(topic.body)["channelId"] == cid
    assert [e.message.id for e in await chat.offline.pending(C)] == [r.message.id]
    assert await chat.offline.pending(B) == [] and await chat.offline.pending(A) == []
    assert [m.id for m in await chat.messages.channel_history(B, cid, Page())] == [r.message.id]


async def test_channel_input_is_checked(chat: Chat) -> None:
    with pytest.raises(InvalidInput, match="name is required"):
        await chat.channels.create(A, {})
    with pytest.raises(InvalidInput, match="settings"):
        await chat.channels.create(A, {"name": "x", "settings": {"a": 1}})
    v = await chat.channels.create(A, {"name": "x", "settings": {"retention": "30d"}})
    assert v.channel.settings == {"encryption": "E2EE", "retention": "30d"}


# ---------------------------------------------------------------- device keys


async def test_key_directory_register_replace_read_delete(chat: Chat) -> None:
    k1 = pem(x25519.X25519PrivateKey.generate().public_key())
    rec = await chat.keys.register(A, {"deviceId": "laptop", "publicKey": k1})
    assert rec.device_id == "laptop" and rec.public_key == k1
    k2 = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    rec2 = await chat.keys.register(A, {"deviceId": "laptop", "publicKey": k2})
    assert (await chat.keys.get(A, "laptop")).public_key == k2
    assert rec2.registered_at >= rec.registered_at
    await chat.keys.register(A, {"deviceId": "phone", "publicKey": k1})
    assert sorted(k.device_id for k in await chat.keys.list(A)) == ["laptop", "phone"]
    actions = [a.action for a in await chat.audit.list(actor=A, action_prefix="keys.")]
    assert actions.count("keys.replace") == 1 and actions.count("keys.register") == 2

    await chat.keys.touch(A, "phone")
    assert (await chat.keys.get(A, "phone")).last_used_at is not None

    # Bob cannot delete alice's device: the call is keyed by the caller.
    with pytest.raises(NotFoundError):
        await chat.keys.delete(B, "laptop")
    assert (await chat.keys.get(A, "laptop")).public_key == k2
    await chat.keys.delete(A, "laptop")
    with pytest.raises(NotFoundError):
        await chat.keys.get(A, "laptop")
    with pytest.raises(NotFoundError):
        await chat.keys.list("ghost@example.com")


@pytest.mark.parametrize(
    "key, why",
    [
        ("not a pem", "not a parseable PEM"),
        (None, "publicKey must be a PEM string"),
        ("ed25519", "only X25519 and P-256"),
        ("rsa", "only X25519 and P-256"),
        ("p384", "only X25519 and P-256"),
    ],
)
def test_key_register_refuses_bad_keys(key: str | None, why: str) -> None:
    made = {
        "ed25519": lambda: pem(ed25519.Ed25519PrivateKey.generate().public_key()),
        "rsa": lambda: pem(rsa.generate_private_key(65537, 1024).public_key()),
        "p384": lambda: pem(ec.generate_private_key(ec.SECP384R1()).public_key()),
    }
    value = made[key]() if key in made else key
    with pytest.raises(InvalidInput, match=why):
        canonical_public_key(value)
    with pytest.raises(InvalidInput, match="deviceId"):
        check_device_id("a/b")


async def test_prune_job_runs_until_cancelled(chat: Chat) -> None:
    import trio

    chat.messages.offline_ttl_ms = -1
    await chat.messages.send(A, env(to=B))
    async with trio.open_nursery() as nursery:
        await nursery.start(chat.offline.run_prune_job, 0.01)
        for _ in range(500):  # bounded: the job prunes at start, then every 10 ms
            if not await chat.store.list_offline(B, now=0):
                break
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert await chat.store.list_offline(B, now=0) == []
