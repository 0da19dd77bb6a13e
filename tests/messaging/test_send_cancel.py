"""A send whose caller is cancelled once its write reached the store is still delivered.

`MessageService.send` holds no shield on the common path; a cancelled wait for the
commit is settled afterwards (the idempotent insert again, shielded) and a cancelled
publish is finished shielded. These tests cancel the caller at each of those points,
on both store adapters, and check what a subscribed recipient would have received.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from securecollab.backplane import Delivery
from securecollab.services.messages import MessageService
from securecollab.store import InsertResult, MessageRecord, Page, Store, StoreUnavailable

from .conftest import Chat
from .conftest import envelope as env

A, B = "alice@example.com", "bob@example.com"


class SlowFirstInsert:
    """The store, except that the first insert_message's caller is never woken (it waits
    until cancelled) while the real write runs in a background task (`fail_first`: the
    write fails without reaching the store)."""

    def __init__(self, store: Store, nursery: trio.Nursery, *, fail_first: bool = False) -> None:
        self._store = store
        self._nursery = nursery
        self._fail_first = fail_first
        self.calls = 0
        self.waiting = trio.Event()  # the first caller is parked
        self.first_done = trio.Event()  # the first write finished (or failed)
        self.first: InsertResult | BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def insert_message(self, message: MessageRecord, **kw: Any) -> InsertResult:
        self.calls += 1
        if self.calls > 1:
            return await self._store.insert_message(message, **kw)

        async def write() -> None:
            try:
                if self._fail_first:
                    raise StoreUnavailable("the batch failed")
                self.first = await self._store.insert_message(message, **kw)
            except Exception as exc:
                self.first = exc
            self.first_done.set()

        self._nursery.start_soon(write)
        self.waiting.set()
        await trio.sleep_forever()  # cancellable, like the store's own wait
        raise AssertionError("unreachable")


async def cancel_send(
    chat: Chat,
    payload: dict[str, object],
    park: Callable[[trio.Nursery], Awaitable[None]],
) -> bool:
    """Run one send, cancel its caller once `park` returns; True if it was cancelled."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        outcome: dict[str, bool] = {}

        async def sender() -> None:
            with scope:
                await chat.messages.send(A, payload, session_id="alice-s1")
            outcome["cancelled"] = scope.cancelled_caught

        nursery.start_soon(sender)
        await park(nursery)
        scope.cancel()
    return outcome["cancelled"]


def to_bob(chat: Chat) -> list[Delivery]:
    return [d for d in chat.delivered if d.user_id == B]


@pytest.mark.parametrize("client_message_id", ["cm-cancel", None])
async def test_cancelled_while_committing_is_still_delivered(
    chat: Chat, client_message_id: str | None
) -> None:
    await chat.online(B)
    slow: SlowFirstInsert | None = None

    async def park(nursery: trio.Nursery) -> None:
        nonlocal slow
        await slow_ready.wait()
        assert slow is not None
        await slow.waiting.wait()
        await slow.first_done.wait()  # committed, the caller not woken yet

    slow_ready = trio.Event()
    async with trio.open_nursery() as bg:
        slow = SlowFirstInsert(chat.store, bg)
        chat.messages.store = slow  # type: ignore[assignment]
        slow_ready.set()
        payload = env(to=B, clientMessageId=client_message_id)
        assert await cancel_send(chat, payload, park)

    # stored once; the retry found it (same id back, or a conflict on the id)
    [stored] = await chat.store.list_direct_messages(A, B, Page())
    assert isinstance(slow.first, InsertResult) and slow.first.message.id == stored.id
    assert slow.calls == 2
    [delivery] = to_bob(chat)
    assert delivery.message_id == stored.id
    [sync] = [d for d in chat.delivered if d.user_id == A]
    assert sync.exclude_session == "alice-s1"
    assert await chat.offline.pending(B) == []  # bob was subscribed: delivered live


async def test_cancelled_before_the_write_settled_is_delivered_once_it_did(chat: Chat) -> None:
    """Cancelled while the write is still queued: the retry answers after it."""
    await chat.online(B)
    holder: dict[str, SlowFirstInsert] = {}

    async def park(nursery: trio.Nursery) -> None:
        await holder["slow"].waiting.wait()
        await trio.testing.wait_all_tasks_blocked()  # the first write is in the store

    async with trio.open_nursery() as bg:
        holder["slow"] = slow = SlowFirstInsert(chat.store, bg)
        chat.messages.store = slow  # type: ignore[assignment]
        assert await cancel_send(chat, env(to=B, clientMessageId="cm-queued"), park)
    [stored] = await chat.store.list_direct_messages(A, B, Page())
    assert [d.message_id for d in to_bob(chat)] == [stored.id]


async def test_cancelled_send_whose_write_failed_is_stored_by_the_retry(chat: Chat) -> None:
    await chat.online(B)
    holder: dict[str, SlowFirstInsert] = {}

    async def park(nursery: trio.Nursery) -> None:
        await holder["slow"].waiting.wait()
        await holder["slow"].first_done.wait()

    async with trio.open_nursery() as bg:
        holder["slow"] = slow = SlowFirstInsert(chat.store, bg, fail_first=True)
        chat.messages.store = slow  # type: ignore[assignment]
        assert await cancel_send(chat, env(to=B), park)
    [stored] = await chat.store.list_direct_messages(A, B, Page())
    assert [d.message_id for d in to_bob(chat)] == [stored.id]


async def test_a_cancelled_repeat_of_a_sent_message_publishes_nothing(chat: Chat) -> None:
    await chat.online(B)
    first = await chat.messages.send(A, env(to=B, clientMessageId="cm-1"))
    chat.delivered.clear()
    holder: dict[str, SlowFirstInsert] = {}

    async def park(nursery: trio.Nursery) -> None:
        await holder["slow"].waiting.wait()
        await holder["slow"].first_done.wait()

    async with trio.open_nursery() as bg:
        holder["slow"] = slow = SlowFirstInsert(chat.store, bg)
        chat.messages.store = slow  # type: ignore[assignment]
        assert await cancel_send(chat, env(to=B, clientMessageId="cm-1"), park)
    assert isinstance(slow.first, InsertResult) and not slow.first.created
    assert [m.id for m in await chat.store.list_direct_messages(A, B, Page())] == [first.message.id]
    assert chat.delivered == []


class WaitingBackplane:
    """The chat's backplane, except that the first publish waits (a network backplane
    would) until `release`; a cancelled first publish published nothing."""

    def __init__(self, chat: Chat) -> None:
        self._inner = chat.backplane
        self.parked = trio.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def publish(self, delivery: Delivery) -> None:
        self.calls += 1
        if self.calls == 1:
            self.parked.set()
            await trio.sleep_forever()
        await self._inner.publish(delivery)


async def test_cancelled_while_publishing_finishes_every_delivery(chat: Chat) -> None:
    await chat.online(B)
    waiting = WaitingBackplane(chat)
    chat.messages = MessageService(chat.store, waiting)  # type: ignore[arg-type]

    async def park(nursery: trio.Nursery) -> None:
        await waiting.parked.wait()

    assert await cancel_send(chat, env(to=B), park)
    [stored] = await chat.store.list_direct_messages(A, B, Page())
    # the interrupted delivery (to bob) again, then the sync copy for alice's other sessions
    assert [(d.user_id, d.message_id) for d in chat.delivered] == [
        (B, stored.id),
        (A, stored.id),
    ]
