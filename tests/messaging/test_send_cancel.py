"""A send whose caller is cancelled once its write reached the store is still delivered.

`MessageService.send` holds no shield on the common path; a cancelled wait for the
commit is settled afterwards, shielded: the same write's outcome is awaited again (a
failed write is tried once more, idempotently), and a cancelled publish is finished
shielded. These tests cancel the caller at each of those points, on both store
adapters, and check what a subscribed recipient would have received.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from securecollab import settle
from securecollab.api.stomp_chat import SEND_DESTINATION, StompChat
from securecollab.backplane import Delivery
from securecollab.services.messages import MessageService
from securecollab.store import (
    Committing,
    InsertResult,
    MessageRecord,
    Page,
    Store,
    StoreUnavailable,
)
from tests.broker.clients import eventually, tcp_client
from tests.broker.harness import broker_server

from .conftest import Chat
from .conftest import envelope as env

A, B = "alice@example.com", "bob@example.com"


class SlowFirstInsert:
    """The store, except that the first submitted message write answers late: its first
    wait never returns (until cancelled) while the real write runs in a background task;
    a later wait gets the write's outcome (`fail_first`: the write fails without reaching
    the store)."""

    def __init__(self, store: Store, nursery: trio.Nursery, *, fail_first: bool = False) -> None:
        self._store = store
        self._nursery = nursery
        self._fail_first = fail_first
        self.calls = 0  # message writes submitted (insert_message or submit_message)
        self.waiting = trio.Event()  # the first caller is parked
        self.first_done = trio.Event()  # the first write finished (or failed)
        self.first: InsertResult | BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def insert_message(self, message: MessageRecord, **kw: Any) -> InsertResult:
        self.calls += 1
        return await self._store.insert_message(message, **kw)

    async def submit_message(self, message: MessageRecord, **kw: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            return await self._store.submit_message(message, **kw)

        async def write() -> None:
            try:
                if self._fail_first:
                    raise StoreUnavailable("the batch failed")
                self.first = await self._store.insert_message(message, **kw)
            except Exception as exc:
                self.first = exc
            self.first_done.set()

        self._nursery.start_soon(write)
        return LateAnswer(self)


class LateAnswer:
    """The handle of SlowFirstInsert's first write."""

    def __init__(self, slow: SlowFirstInsert) -> None:
        self.slow = slow
        self.waits = 0

    async def wait(self) -> InsertResult:
        self.waits += 1
        if self.waits == 1:
            self.slow.waiting.set()
            await trio.sleep_forever()  # cancellable, like the store's own wait
        await self.slow.first_done.wait()
        if isinstance(self.slow.first, BaseException):
            raise self.slow.first
        assert self.slow.first is not None
        return self.slow.first


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

    # stored once, by the one write: settling waited for it again
    [stored] = await chat.store.list_direct_messages(A, B, Page())
    assert isinstance(slow.first, InsertResult) and slow.first.message.id == stored.id
    assert slow.calls == 1
    [delivery] = to_bob(chat)
    assert delivery.message_id == stored.id
    [sync] = [d for d in chat.delivered if d.user_id == A]
    assert sync.exclude_session == "alice-s1"
    assert await chat.offline.pending(B) == []  # bob was subscribed: delivered live


async def test_cancelled_before_the_write_settled_is_delivered_once_it_did(chat: Chat) -> None:
    """Cancelled while the write is still queued: settling waits for its commit."""
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
    assert slow.calls == 2  # the failed write, then the retry that stored it


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


class AnswerLost:
    """The handle of a write that commits but whose answer is an error: a PostgreSQL
    connection lost during COMMIT fails every op of its batch with StoreUnavailable,
    whether or not the COMMIT went through (here it did)."""

    def __init__(self, op: Committing[InsertResult]) -> None:
        self.op = op

    async def wait(self) -> InsertResult:
        await self.op.wait()
        raise StoreUnavailable("connection lost during COMMIT")


class CommitAnswersLost:
    """The store, except that every submitted message write commits and answers an error."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.inserts = 0  # message writes through insert_message (the settle's retry)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def submit_message(self, message: MessageRecord, **kw: Any) -> AnswerLost:
        return AnswerLost(await self._store.submit_message(message, **kw))

    async def insert_message(self, message: MessageRecord, **kw: Any) -> InsertResult:
        self.inserts += 1
        return await self._store.insert_message(message, **kw)


@pytest.mark.parametrize("client_message_id", ["cm-lost", None])
async def test_a_write_that_committed_but_answered_an_error_is_still_delivered(
    chat: Chat, client_message_id: str | None
) -> None:
    """Settling retries a failed write; when the first one did commit, the retry finds
    it (created=False by its clientMessageId, or a conflict on its id without one).
    Either way it is this send's message: delivered, not taken for an earlier send's."""
    await chat.online(B)
    lossy = CommitAnswersLost(chat.store)
    chat.messages.store = lossy  # type: ignore[assignment]
    payload = env(to=B, clientMessageId=client_message_id)
    pending = await chat.messages.submit(A, payload, session_id="alice-s1")
    with trio.CancelScope() as cancelled:  # as a closed connection's queued SEND is finished
        cancelled.cancel()
        await pending.finish()
    assert cancelled.cancelled_caught

    [stored] = await chat.store.list_direct_messages(A, B, Page())
    assert stored.id == pending.message.id
    assert lossy.inserts == 1  # the settle's retry
    assert [d.message_id for d in to_bob(chat)] == [stored.id]
    [sync] = [d for d in chat.delivered if d.user_id == A]
    assert sync.exclude_session == "alice-s1"
    assert await chat.offline.pending(B) == []  # bob was subscribed: delivered live


SETTLE_S = 0.1  # the settle bound in the test below (30 s in production)
SENDS = 8  # pipelined SENDs in flight when the connection closes


class NeverAnswers:
    """The handle of a write that never answers; records the deadline of each wait."""

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    async def wait(self) -> InsertResult:
        self.deadlines.append(trio.current_effective_deadline())
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class NeverCommits:
    """The store, except that message writes never answer (a PostgreSQL server that
    stopped answering: the write waits for its batch's COMMIT)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.writes: list[NeverAnswers] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def submit_message(self, message: MessageRecord, **kw: Any) -> NeverAnswers:
        handle = NeverAnswers()
        self.writes.append(handle)
        return handle


async def test_a_closed_connection_settles_its_queued_sends_within_one_bound(
    chat: Chat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection closes with pipelined chat SENDs whose writes never answer: the one
    running settles within `SETTLE_S`, and all the queued ones together within one more
    (`Session._settle_left` sets one `settle_deadline`), not `SETTLE_S` each, which
    held a closed connection's teardown for depth x 30 s."""
    monkeypatch.setattr(settle, "SETTLE_S", SETTLE_S)
    hung = NeverCommits(chat.store)
    chat.messages.store = hung  # type: ignore[assignment]
    async with broker_server(send_limit=1_000) as srv:
        StompChat(srv.broker, chat.store, chat.messages, chat.channels, chat.offline)
        async with tcp_client(srv.tcp_port) as a:
            await a.connect(passcode="token-alice")
            for i in range(SENDS):
                await a.frame(
                    "SEND",
                    {"destination": SEND_DESTINATION, "receipt": f"r{i}"},
                    json.dumps(env(to=B)),
                )
            await eventually(lambda: len(hung.writes) == SENDS, "every SEND submitted")
            await eventually(lambda: hung.writes[0].deadlines, "the first one committing")
        closed = trio.current_time()
        await eventually(lambda: not srv.broker.sessions, "session cleaned up")
        took = trio.current_time() - closed

    assert a.frames == []  # no RECEIPT: nothing committed
    queued = hung.writes[1:]
    # each queued completion was called in a cancelled scope, then settled shielded
    assert [w.deadlines[0] for w in queued] == [-math.inf] * len(queued)
    # one bound for all of them: the first one's (-inf: it had passed when one began)
    bound = queued[0].deadlines[1]
    assert bound < math.inf
    assert all(w.deadlines[1] in (bound, -math.inf) for w in queued), [w.deadlines for w in queued]
    assert took < 2 * SETTLE_S + 0.3, took  # one SEND's bound each would be SENDS x SETTLE_S
