"""Contract: device keys, channels, messages, history paging, offline queue, outbox."""

from __future__ import annotations

import dataclasses

import pytest

from securecollab.ids import new_id
from securecollab.store import Conflict, NotFound, Page, Store

from .factories import T0, channel, device_key, message, outbox_for

ALICE, BOB, CAROL, DAVE = (f"{n}@example.com" for n in ("alice", "bob", "carol", "dave"))
DAY = 86_400_000


# ---------------------------------------------------------------------------- device keys


async def test_device_key_upsert_list_touch_delete(store: Store) -> None:
    phone = device_key(ALICE, "phone")
    stored, replaced = await store.upsert_device_key(phone)
    assert (stored, replaced) == (phone, False)
    assert await store.get_device_key(ALICE, "phone") == phone

    laptop = device_key(ALICE, "laptop", at=T0 + 1)
    await store.upsert_device_key(laptop)
    await store.upsert_device_key(device_key(BOB, "phone"))

    # re-registering a device replaces its key
    new_phone = device_key(ALICE, "phone", at=T0 + 2)
    stored, replaced = await store.upsert_device_key(new_phone)
    assert replaced is True and stored == new_phone
    assert await store.get_device_key(ALICE, "phone") == new_phone
    assert {k.device_id: k.public_key for k in await store.list_device_keys(ALICE)} == {
        "phone": new_phone.public_key,
        "laptop": laptop.public_key,
    }

    await store.touch_device_key(ALICE, "laptop", T0 + 50)
    touched = await store.get_device_key(ALICE, "laptop")
    assert touched is not None and touched.last_used_at == T0 + 50

    assert await store.delete_device_key(ALICE, "phone") is True
    assert await store.delete_device_key(ALICE, "phone") is False
    assert await store.get_device_key(ALICE, "phone") is None
    assert [k.device_id for k in await store.list_device_keys(ALICE)] == ["laptop"]
    # Bob's device with the same id was not touched
    assert await store.get_device_key(BOB, "phone") is not None


# ---------------------------------------------------------------------------- channels


async def test_channel_create_members_roles(store: Store) -> None:
    general = channel(ALICE, "general")
    await store.create_channel(general)
    assert await store.get_channel(general.id) == general
    assert await store.get_channel(new_id()) is None

    owner = await store.get_member(general.id, ALICE)
    assert owner is not None and owner.role == "owner" and owner.joined_at == T0

    added = await store.add_channel_members(general.id, [BOB, CAROL, BOB, ALICE], "member", T0 + 1)
    assert added == [BOB, CAROL]  # repeats and existing members are not "added"
    assert await store.add_channel_members(general.id, [CAROL, DAVE], "admin", T0 + 2) == [DAVE]
    dave = await store.get_member(general.id, DAVE)
    assert dave is not None and dave.role == "admin"
    carol = await store.get_member(general.id, CAROL)
    assert carol is not None and carol.role == "member"  # not promoted by the second call

    members = await store.list_channel_members(general.id)
    assert [(m.user_id, m.role) for m in members] == [
        (ALICE, "owner"),
        (BOB, "member"),
        (CAROL, "member"),
        (DAVE, "admin"),
    ]

    random = channel(BOB, "random", at=T0 + 5)
    await store.create_channel(random)
    assert [c.id for c in await store.list_user_channels(BOB)] == [general.id, random.id]
    assert [c.id for c in await store.list_user_channels(ALICE)] == [general.id]

    assert await store.remove_channel_member(general.id, BOB) is True
    assert await store.remove_channel_member(general.id, BOB) is False
    assert await store.get_member(general.id, BOB) is None
    assert [c.id for c in await store.list_user_channels(BOB)] == [random.id]


async def test_channel_errors(store: Store) -> None:
    general = channel(ALICE)
    await store.create_channel(general)
    with pytest.raises(Conflict):
        await store.create_channel(dataclasses.replace(general, name="again"))
    assert (await store.get_channel(general.id)) == general
    with pytest.raises(NotFound):
        await store.add_channel_members(new_id(), [BOB], "member", T0)


async def test_peers_of_channels_and_direct_messages(store: Store) -> None:
    team = channel(ALICE, "team")
    await store.create_channel(team)
    await store.add_channel_members(team.id, [BOB], "member", T0)
    other = channel(DAVE, "other")
    await store.create_channel(other)  # Alice is not in it
    await store.add_channel_members(other.id, ["eve@example.com"], "member", T0)

    await store.insert_message(message(CAROL, to=ALICE))  # Carol wrote to Alice
    await store.insert_message(message(ALICE, to="frank@example.com"))  # Alice wrote to Frank
    await store.insert_message(message(ALICE, to=ALICE))  # a note to self

    assert await store.peers_of(ALICE) == {BOB, CAROL, "frank@example.com"}
    assert await store.peers_of(BOB) == {ALICE}
    assert await store.peers_of(CAROL) == {ALICE}
    assert await store.peers_of(DAVE) == {"eve@example.com"}
    assert await store.peers_of("nobody@example.com") == set()


# ---------------------------------------------------------------------------- messages


async def test_insert_message_with_offline_and_outbox_in_one_commit(store: Store) -> None:
    m = message(ALICE, to=BOB, client_id="c-1")
    result = await store.insert_message(
        m, offline_for=[BOB], offline_expires_at=T0 + 7 * DAY, outbox=[outbox_for(m)]
    )
    assert result.created is True and result.message == m
    assert await store.get_message(m.id) == m

    queued = await store.list_offline(BOB, now=T0)
    assert [(e.user_id, e.message, e.queued_at, e.expires_at) for e in queued] == [
        (BOB, m, m.created_at, T0 + 7 * DAY)
    ]
    assert [e.id for e in await store.fetch_outbox()] == [m.id]

    # a retry with the same clientMessageId: the original comes back, nothing new is written
    retry = message(ALICE, to=BOB, client_id="c-1", at=T0 + 1000)
    again = await store.insert_message(
        retry, offline_for=[BOB], offline_expires_at=T0 + 8 * DAY, outbox=[outbox_for(retry)]
    )
    assert again.created is False and again.message == m
    assert await store.get_message(retry.id) is None
    assert await store.list_direct_messages(ALICE, BOB, Page()) == [m]
    assert len(await store.list_offline(BOB, now=T0)) == 1
    assert [e.id for e in await store.fetch_outbox()] == [m.id]

    # the same clientMessageId from another sender is a different message
    bobs = message(BOB, to=ALICE, client_id="c-1")
    assert (await store.insert_message(bobs)).created is True
    # messages without a clientMessageId never collide
    for _ in range(2):
        assert (await store.insert_message(message(ALICE, to=BOB))).created is True
    assert len(await store.list_direct_messages(ALICE, BOB, Page())) == 4


async def test_insert_message_rejects_bad_shape_and_duplicate_id(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.insert_message(message(ALICE))  # neither recipient nor channel
    with pytest.raises(ValueError):
        await store.insert_message(message(ALICE, to=BOB, channel_id="c"))
    m = message(ALICE, to=BOB)
    await store.insert_message(m)
    with pytest.raises(Conflict):
        await store.insert_message(dataclasses.replace(m, recipient_id=CAROL))
    assert await store.get_message(m.id) == m


async def test_direct_history_paging(store: Store) -> None:
    convo = []
    for i in range(12):
        sender, to = (ALICE, BOB) if i % 3 else (BOB, ALICE)  # both directions
        m = message(sender, to=to, at=T0 + i * 1000)
        await store.insert_message(m)
        convo.append(m)
        # traffic of other pairs in between must never show up
        await store.insert_message(message(ALICE, to=CAROL, at=T0 + i * 1000 + 1))
        await store.insert_message(message(CAROL, to=BOB, at=T0 + i * 1000 + 2))
    newest_first = convo[::-1]

    assert await store.list_direct_messages(ALICE, BOB, Page()) == newest_first
    assert await store.list_direct_messages(BOB, ALICE, Page()) == newest_first
    assert await store.list_direct_messages(ALICE, BOB, Page(limit=5)) == newest_first[:5]
    assert (
        await store.list_direct_messages(ALICE, BOB, Page(limit=5, offset=5)) == newest_first[5:10]
    )
    assert (
        await store.list_direct_messages(ALICE, BOB, Page(limit=5, offset=10)) == newest_first[10:]
    )
    assert await store.list_direct_messages(ALICE, BOB, Page(offset=50)) == []

    # cursor paging walks the whole conversation without gaps or repeats
    walked, cursor = [], None
    for _ in range(10):
        page = await store.list_direct_messages(ALICE, BOB, Page(limit=5, before_id=cursor))
        if not page:
            break
        walked += page
        cursor = page[-1].id
    assert walked == newest_first

    window = Page(from_date=T0 + 3000, to_date=T0 + 6000)
    assert await store.list_direct_messages(BOB, ALICE, window) == newest_first[5:9]
    combined = Page(limit=2, from_date=T0 + 3000, before_id=convo[8].id)
    assert await store.list_direct_messages(ALICE, BOB, combined) == [convo[7], convo[6]]

    assert await store.list_direct_messages(ALICE, DAVE, Page()) == []


async def test_channel_history_paging(store: Store) -> None:
    room = channel(ALICE, "room")
    other = channel(BOB, "other")
    await store.create_channel(room)
    await store.create_channel(other)
    posted = []
    for i in range(8):
        m = message([ALICE, BOB][i % 2], channel_id=room.id, at=T0 + i)
        await store.insert_message(m)
        posted.append(m)
        await store.insert_message(message(BOB, channel_id=other.id, at=T0 + i))
    newest_first = posted[::-1]

    assert await store.list_channel_messages(room.id, Page()) == newest_first
    assert await store.list_channel_messages(room.id, Page(limit=3, offset=3)) == newest_first[3:6]
    assert (
        await store.list_channel_messages(room.id, Page(limit=3, before_id=posted[4].id))
        == newest_first[4:7]
    )
    assert await store.list_channel_messages(room.id, Page(from_date=T0 + 6)) == newest_first[:2]
    assert await store.list_channel_messages(room.id, Page(to_date=T0 + 1)) == newest_first[6:]
    assert await store.list_channel_messages(new_id(), Page()) == []


# ---------------------------------------------------------------------------- offline queue


async def test_offline_queue_order_ack_prune(store: Store) -> None:
    early = message(ALICE, to=BOB, at=T0)
    later = message(CAROL, to=BOB, at=T0 + 10)
    short = message(DAVE, to=BOB, at=T0 + 20)
    # inserted out of order: the queue is ordered by when messages were queued
    await store.insert_message(later, offline_for=[BOB], offline_expires_at=T0 + 7 * DAY)
    await store.insert_message(early, offline_for=[BOB], offline_expires_at=T0 + 7 * DAY)
    await store.insert_message(short, offline_for=[BOB], offline_expires_at=T0 + 100)
    room = channel(ALICE, "room")
    await store.create_channel(room)
    group = message(ALICE, channel_id=room.id, at=T0 + 30)
    await store.insert_message(group, offline_for=[BOB, CAROL], offline_expires_at=T0 + DAY)

    assert [e.message for e in await store.list_offline(BOB, now=T0 + 50)] == [
        early,
        later,
        short,
        group,
    ]
    assert [e.message.id for e in await store.list_offline(BOB, now=T0 + 50, limit=2)] == [
        early.id,
        later.id,
    ]
    # expired entries are not delivered, even before the prune job ran
    assert [e.message for e in await store.list_offline(BOB, now=T0 + 100)] == [early, later, group]

    # Carol cannot ack Bob's entries
    assert await store.ack_offline(CAROL, [early.id, later.id]) == 0
    assert await store.ack_offline(BOB, [early.id, "no-such-id"]) == 1
    assert await store.ack_offline(BOB, [early.id]) == 0
    assert await store.ack_offline(BOB, []) == 0
    assert [e.message for e in await store.list_offline(BOB, now=T0 + 50)] == [later, short, group]
    assert [e.message for e in await store.list_offline(CAROL, now=T0 + 50)] == [group]

    assert await store.prune_offline(now=T0 + DAY) == 3  # short (Bob), group (Bob and Carol)
    assert [e.message for e in await store.list_offline(BOB, now=T0)] == [later]
    assert await store.list_offline(CAROL, now=T0) == []
    assert await store.prune_offline(now=T0 + DAY) == 0
    # pruning the queue never deletes the message itself
    assert await store.get_message(short.id) == short


async def test_enqueue_offline_hands_back_idempotently(store: Store) -> None:
    first = message(ALICE, to=BOB, at=T0 + 10)
    second = message(CAROL, to=BOB, at=T0)
    own = message(BOB, to=ALICE, at=T0 + 5)
    await store.insert_message(first)  # Bob was reachable: nothing queued at commit
    await store.insert_message(second, offline_for=[BOB], offline_expires_at=T0 + DAY)
    await store.insert_message(own)

    # the broker hands back first (dropped on a closing session), second (already
    # queued), Bob's own message and an unknown id: only first is added
    added = await store.enqueue_offline(
        BOB, [first.id, second.id, own.id, "no-such-id", first.id], T0 + 7 * DAY
    )
    assert added == 1
    queued = await store.list_offline(BOB, now=T0 + 2 * DAY)
    # ordered by the message's time like entries written at commit; second kept its expiry
    assert [e.message for e in queued] == [first]
    assert [e.message for e in await store.list_offline(BOB, now=T0)] == [second, first]
    # handing back again adds nothing; after an ack it is queued again
    assert await store.enqueue_offline(BOB, [first.id], T0 + 7 * DAY) == 0
    assert await store.ack_offline(BOB, [first.id]) == 1
    assert await store.enqueue_offline(BOB, [first.id], T0 + 7 * DAY) == 1
    assert await store.enqueue_offline(BOB, [], T0 + 7 * DAY) == 0
    assert await store.list_offline(ALICE, now=T0) == []


# ---------------------------------------------------------------------------- outbox


async def test_outbox_fetch_mark_prune(store: Store) -> None:
    msgs = [message(ALICE, to=BOB, at=T0 + i) for i in range(5)]
    events = [outbox_for(m) for m in msgs]
    await store.add_outbox(events[2:])
    await store.add_outbox(events[:2])
    await store.add_outbox([])

    assert await store.fetch_outbox() == events  # oldest first
    assert await store.fetch_outbox(limit=2) == events[:2]
    assert events[0].payload == (await store.fetch_outbox(limit=1))[0].payload

    await store.mark_outbox_sent([events[0].id, events[1].id], T0 + 100)
    await store.mark_outbox_sent([events[2].id], T0 + 200)
    await store.mark_outbox_sent([], T0 + 300)
    assert await store.fetch_outbox() == events[3:]

    assert await store.prune_outbox(sent_before=T0 + 150) == 2
    assert await store.prune_outbox(sent_before=T0 + 10_000) == 1
    assert await store.fetch_outbox() == events[3:]  # unsent events are never pruned
    with pytest.raises(Conflict):
        await store.add_outbox([events[3]])
