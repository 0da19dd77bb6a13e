"""The send path's per-message shortcuts: the channel member cache and the presence check.

A channel send no longer reads the member rows nor builds a presence record per member;
these tests pin what that must not change: who may send, who gets an offline-queue
entry, and how a membership change is seen.
"""

from __future__ import annotations

import base64
import os

import pytest
import trio
import trio.testing

from securecollab.backplane.memory import MemoryBackplane
from securecollab.ids import now_ms
from securecollab.services.errors import NotFoundError
from securecollab.services.membership import ChannelMembers
from securecollab.store import MemberRecord, Page, Store

from .conftest import Chat

A, B, C, D = "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"


def env(**over: object) -> dict[str, object]:
    e: dict[str, object] = {
        "encryptedContent": base64.b64encode(os.urandom(48)).decode(),
        "iv": base64.b64encode(os.urandom(12)).decode(),
    }
    e.update(over)
    return e


class CountingStore:
    """The real store, counting (and optionally holding) `list_channel_members` reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0
        self.hold: trio.Event | None = None
        self.started = trio.Event()

    async def list_channel_members(self, channel_id: str) -> list[MemberRecord]:
        self.reads += 1
        rows = await self.store.list_channel_members(channel_id)
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        return rows


def counted(chat: Chat, **kw: object) -> tuple[CountingStore, ChannelMembers]:
    """Give the chat's services one member cache reading through a CountingStore."""
    counting = CountingStore(chat.store)
    members = ChannelMembers(counting, **kw)  # type: ignore[arg-type]
    chat.messages.members = members
    chat.channels.members = members
    return counting, members


async def test_every_membership_change_is_seen_by_the_next_send(chat: Chat) -> None:
    counting, _ = counted(chat)
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await chat.messages.send(A, env(channelId=cid))
    with pytest.raises(NotFoundError):
        await chat.messages.send(B, env(channelId=cid))  # not (yet) a member

    await chat.channels.invite(A, cid, [B, C])
    r1 = await chat.messages.send(B, env(channelId=cid))  # sends at once after the invite
    assert [e.message.id for e in await chat.offline.pending(C)] == [r1.message.id]

    await chat.channels.remove_member(A, cid, C)
    r2 = await chat.messages.send(A, env(channelId=cid))
    with pytest.raises(NotFoundError):
        await chat.messages.send(C, env(channelId=cid))  # removed: refused at once
    assert r2.message.id not in [e.message.id for e in await chat.offline.pending(C)]
    assert r2.message.id in [e.message.id for e in await chat.offline.pending(B)]

    await chat.channels.leave(B, cid)
    with pytest.raises(NotFoundError):
        await chat.messages.send(B, env(channelId=cid))
    reads = counting.reads
    for _ in range(5):
        await chat.messages.send(A, env(channelId=cid))
    assert counting.reads == reads  # unchanged membership: no more store reads


async def test_a_change_made_past_the_service_is_seen_after_ttl(chat: Chat) -> None:
    clock = [1000.0]
    _, members = counted(chat, ttl_s=2.0, clock=lambda: clock[0])
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await chat.messages.send(A, env(channelId=cid))
    # directly in the store, as another node would: the documented staleness window
    await chat.store.add_channel_members(cid, [B], "member", now_ms())
    with pytest.raises(NotFoundError):
        await chat.messages.send(B, env(channelId=cid))
    clock[0] += 2.0
    assert (await chat.messages.send(B, env(channelId=cid))).created
    # and `changed` is the way to make it seen at once
    await chat.store.remove_channel_member(cid, B)
    members.changed(cid)
    with pytest.raises(NotFoundError):
        await chat.messages.send(B, env(channelId=cid))


async def test_a_read_overtaken_by_a_change_is_not_kept(chat: Chat) -> None:
    counting, members = counted(chat)
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await chat.channels.invite(A, cid, [B])
    counting.hold = trio.Event()
    got: list[tuple[str, ...]] = []

    async def read() -> None:
        got.append((await members.get(cid)).ids)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(read)  # waits for the first read instead of making its own
        await counting.started.wait()
        await chat.channels.remove_member(A, cid, B)  # commits while the read is held
        counting.hold.set()
    assert counting.reads == 2  # the held read, then one fresh read for the waiter
    assert sorted(got) == [(A,), (A, B)]  # the waiter saw the change
    counting.hold = None
    assert (await members.get(cid)).ids == (A,)
    with pytest.raises(NotFoundError):
        await chat.messages.send(B, env(channelId=cid))


async def test_concurrent_sends_share_one_read(chat: Chat) -> None:
    counting, _ = counted(chat)
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    counting.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(chat.messages.send, A, env(channelId=cid))
        await counting.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        counting.hold.set()
    assert counting.reads == 1
    assert len(await chat.messages.channel_history(A, cid, Page())) == 5


async def test_unknown_channels_are_not_kept_and_the_size_is_bounded(chat: Chat) -> None:
    counting, members = counted(chat, max_members=3)
    for _ in range(2):
        assert (await members.get("no-such-channel")).ids == ()
    assert counting.reads == 2  # nothing remembered about an id that has no members
    one = (await chat.channels.create(A, {"name": "one"})).channel.id
    two = (await chat.channels.create(A, {"name": "two"})).channel.id
    await chat.channels.invite(A, two, [B])
    await members.get(one)
    await members.get(two)  # 1 + 2 ids: both fit
    reads = counting.reads
    await members.get(one)
    assert counting.reads == reads
    await chat.channels.invite(A, one, [C])  # one now has 2 ids: 2 + 2 > 3
    await members.get(one)  # kept; the oldest entry (two) goes
    reads = counting.reads
    await members.get(one)
    assert counting.reads == reads
    await members.get(two)
    assert counting.reads == reads + 1


async def test_the_shared_cache_is_per_store_and_zero_ttl_disables_it(chat: Chat) -> None:
    assert chat.messages.members is chat.channels.members
    assert chat.messages.members is ChannelMembers.for_store(chat.store)
    counting, members = counted(chat, ttl_s=0)
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await members.get(cid)
    await members.get(cid)
    assert counting.reads == 2


# ---------------------------------------------------------------- presence


async def test_presence_offline_agrees_with_presence_records() -> None:
    bp = MemoryBackplane()
    now = 1_000_000
    users = [A, B, C, D]
    await bp.presence_connect(A, "a1", "laptop", now, 1000)
    await bp.presence_connect(B, "b1", "laptop", now, 1000)
    await bp.presence_connect(B, "b2", "phone", now, 5000)
    await bp.presence_connect(C, "c1", "laptop", now, 1000)
    await bp.presence_set_status(C, "AWAY", now)  # away is not offline
    await bp.presence_connect(D, "d1", "laptop", now, 1000)
    await bp.presence_disconnect(D, "d1", now)

    async def check(at: int, expected: list[str]) -> None:
        records = await bp.presence_get(users, at)
        assert [u for u in users if records[u].status == "OFFLINE"] == expected
        assert await bp.presence_offline(users, at) == expected

    await check(now + 1, [D])
    await bp.presence_refresh(A, "a1", now + 500, 5000)  # a refresh before expiry...
    await check(now + 1000, [C, D])  # ...keeps A online; C's only session expired
    await bp.presence_disconnect(B, "b2", now + 2000)  # b1 already expired
    await check(now + 2000, [B, C, D])
    await bp.presence_connect(C, "c2", "laptop", now + 2000, 1000)
    await check(now + 2000, [B, D])
    assert await bp.presence_offline(["erin@example.com"], now) == ["erin@example.com"]


async def test_channel_messages_are_queued_for_exactly_the_offline_members(chat: Chat) -> None:
    cid = (await chat.channels.create(A, {"name": "team"})).channel.id
    await chat.channels.invite(A, cid, [B, C, D])
    await chat.online(B)
    await chat.online(C, subscribed=False)  # connected counts as present for a channel
    await chat.backplane.presence_connect(D, "d1", "laptop", now_ms() - 10_000, 1)  # lapsed
    r = await chat.messages.send(A, env(channelId=cid))
    queued = {u: [e.message.id for e in await chat.offline.pending(u)] for u in (A, B, C, D)}
    assert queued == {A: [], B: [], C: [], D: [r.message.id]}
