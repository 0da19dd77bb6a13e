"""Contract: group commit batches concurrent writers, isolates failures, never blocks reads."""

from __future__ import annotations

import pytest
import trio
from prometheus_client import REGISTRY

from securecollab.ids import new_id
from securecollab.store import Conflict, MessageRecord, Page, Store, open_store

from .conftest import is_sqlite, wait_queued, writer_held
from .factories import T0, message, outbox_for, user


def _adapter(store: Store) -> str:
    return "sqlite" if is_sqlite(store) else "postgres"


def _ok_writes(adapter: str) -> float:
    value = REGISTRY.get_sample_value(
        "securecollab_store_writes_total", {"adapter": adapter, "outcome": "ok"}
    )
    return value or 0.0


async def test_concurrent_writers_share_commits(store: Store) -> None:
    before_batches, before_writes = store.stats.batches, store.stats.writes
    before_metric = _ok_writes(_adapter(store))
    senders = [f"user{i}@example.com" for i in range(40)]
    written: list[str] = []

    async def sender(uid: str) -> None:
        for _ in range(5):  # 40 tasks x 5 = 200 writes
            m = message(uid, to="hub@example.com")
            result = await store.insert_message(m)
            assert result.created
            written.append(m.id)

    async with trio.open_nursery() as nursery:
        for uid in senders:
            nursery.start_soon(sender, uid)

    assert len(written) == 200
    history = await store.list_direct_messages("hub@example.com", senders[7], Page())
    assert len(history) == 5
    for uid in senders:
        assert len(await store.list_direct_messages(uid, "hub@example.com", Page())) == 5
    writes = store.stats.writes - before_writes
    batches = store.stats.batches - before_batches
    assert writes == 200
    assert batches < writes  # one commit served several writers
    assert max(b.size for b in store.stats.last_batches) > 1
    assert _ok_writes(_adapter(store)) - before_metric == 200


async def test_a_failing_write_does_not_fail_its_batch_neighbours(store: Store) -> None:
    await store.create_user(user("taken@example.com"))
    results: dict[str, object] = {}

    async def register(uid: str) -> None:
        try:
            await store.create_user(user(uid))
            results[uid] = "ok"
        except Conflict:
            results[uid] = "conflict"

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            # queue everything behind the held batch so it all commits in ONE next batch
            for i in range(10):
                nursery.start_soon(register, f"new{i}@example.com")
            nursery.start_soon(register, "TAKEN@example.com")
            nursery.start_soon(register, "new3@EXAMPLE.com")  # duplicate inside the batch
            await wait_queued(store, 12)
            batches_before = store.stats.batches

    assert store.stats.batches - batches_before == 2  # the held op's batch, then all 12 together
    assert store.stats.last_batches[-1].size == 12
    assert results.pop("TAKEN@example.com") == "conflict"
    assert sorted(results.values()).count("ok") == 10
    # the two spellings of new3 raced inside one batch: exactly one won
    assert sorted([results["new3@example.com"], results["new3@EXAMPLE.com"]]) == ["conflict", "ok"]
    found = await store.existing_users([f"new{i}@example.com" for i in range(10)])
    assert len(found) == 10


async def test_a_batch_replayed_after_a_failure_commits_each_write_once(store: Store) -> None:
    # The writer runs a batch without savepoints first; a failing op makes it roll back
    # and replay the batch op by op. The good writes must land exactly once.
    await store.create_user(user("dup@example.com"))
    sent = [message("a@example.com", to="b@example.com", client_id=f"c{i}") for i in range(6)]
    outcomes: list[str] = []

    async def send(m: MessageRecord) -> None:
        result = await store.insert_message(
            m, offline_for=["b@example.com"], offline_expires_at=T0 + 1000, outbox=[outbox_for(m)]
        )
        outcomes.append("created" if result.created else "repeat")

    async def register() -> None:
        try:
            await store.create_user(user("dup@example.com"))
            outcomes.append("registered")
        except Conflict:
            outcomes.append("conflict")

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            for m in sent[:3]:
                nursery.start_soon(send, m)
            nursery.start_soon(register)
            for m in sent[3:]:
                nursery.start_soon(send, m)
            await wait_queued(store, 7)

    assert store.stats.last_batches[-1].size == 7  # all in one batch, so it was replayed
    assert sorted(outcomes) == ["conflict"] + ["created"] * 6
    history = await store.list_direct_messages("a@example.com", "b@example.com", Page())
    assert sorted(m.id for m in history) == sorted(m.id for m in sent)
    queued = await store.list_offline("b@example.com", now=0)
    assert sorted(e.message.id for e in queued) == sorted(m.id for m in sent)
    assert sorted(e.id for e in await store.fetch_outbox()) == sorted(m.id for m in sent)


@pytest.mark.parametrize("n", [1, 5, 85, 130])
async def test_one_batch_of_many_messages_stores_every_row_once(store: Store, n: int) -> None:
    # SQLite writes a batch's rows with multi-row INSERTs of a few fixed sizes (64, 16,
    # 4, 1 rows): 85 = 64 + 16 + 4 + 1 and 130 = 2 x 64 + 2 x 1 use every size. Each
    # message must land once with its own values, offline entry and outbox row.
    senders = [f"s{i % 7}@example.com" for i in range(n)]
    sent = [message(s, to="hub@example.com", client_id=f"c{i}") for i, s in enumerate(senders)]

    async def send(m: MessageRecord) -> None:
        result = await store.insert_message(
            m, offline_for=["hub@example.com"], offline_expires_at=T0 + 1000, outbox=[outbox_for(m)]
        )
        assert result.created and result.message == m

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            for m in sent:
                nursery.start_soon(send, m)
            await wait_queued(store, n)

    assert store.stats.last_batches[-1].size == n
    stored: dict[str, MessageRecord] = {}
    for s in set(senders):
        for m in await store.list_direct_messages(s, "hub@example.com", Page(limit=200)):
            stored[m.id] = m
    assert stored == {m.id: m for m in sent}
    queued = await store.list_offline("hub@example.com", now=0)
    assert sorted(e.message.id for e in queued) == sorted(m.id for m in sent)
    outbox = await store.fetch_outbox(limit=500)
    assert sorted(e.id for e in outbox) == sorted(m.id for m in sent)


async def test_the_same_record_twice_in_one_batch_is_stored_once(store: Store) -> None:
    # A sender retrying the very record it already queued (same id and clientMessageId:
    # the service does this after a cancelled wait) must get created=False the second
    # time, and the retry's own queue/outbox rows must not be written.
    m = message("a@example.com", to="b@example.com", client_id="retry-1")
    outcomes: list[tuple[int, bool]] = []

    async def send(i: int, offline_for: list[str], topic: str) -> None:
        r = await store.insert_message(
            m,
            offline_for=offline_for,
            offline_expires_at=T0 + 1000,
            outbox=[outbox_for(m, topic=topic)] if topic else [],
        )
        assert r.message == m
        outcomes.append((i, r.created))

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            nursery.start_soon(send, 0, ["b@example.com"], "")
            await wait_queued(store, 1)
            nursery.start_soon(send, 1, ["c@example.com", "d@example.com"], "chat.messages")
            await wait_queued(store, 2)

    assert sorted(outcomes) == [(0, True), (1, False)]
    assert [e.message.id for e in await store.list_offline("b@example.com", now=0)] == [m.id]
    assert await store.list_offline("c@example.com", now=0) == []
    assert await store.fetch_outbox() == []


async def test_repeated_client_ids_in_one_batch_return_the_original(store: Store) -> None:
    # A batch of message writes, some repeating a clientMessageId (of a stored message, or
    # of another write in the same batch): each repeat gets the original back, created
    # False, and writes nothing; every other write is stored once with its rows.
    stored = message("a@example.com", to="b@example.com", client_id="c-stored")
    await store.insert_message(stored, outbox=[outbox_for(stored)])
    fresh = [message("a@example.com", to="b@example.com", client_id=f"c{i}") for i in range(5)]
    repeat_stored = message("a@example.com", to="b@example.com", client_id="c-stored", at=T0 + 9)
    repeat_fresh = message("a@example.com", to="b@example.com", client_id="c2", at=T0 + 9)
    other_sender = message("b@example.com", to="a@example.com", client_id="c-stored")
    order = [*fresh[:2], repeat_stored, *fresh[2:4], repeat_fresh, other_sender, fresh[4]]
    outcomes: dict[str, tuple[bool, MessageRecord]] = {}

    async def send(m: MessageRecord) -> None:
        result = await store.insert_message(
            m, offline_for=["b@example.com"], offline_expires_at=T0 + 1000, outbox=[outbox_for(m)]
        )
        outcomes[m.id] = (result.created, result.message)

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            for m in order:
                nursery.start_soon(send, m)
                await wait_queued(store, order.index(m) + 1)  # keep the queue in this order
    assert store.stats.last_batches[-1].size == len(order)

    assert outcomes.pop(repeat_stored.id) == (False, stored)
    assert outcomes.pop(repeat_fresh.id) == (False, fresh[2])
    assert outcomes == {m.id: (True, m) for m in [*fresh, other_sender]}
    history = await store.list_direct_messages("a@example.com", "b@example.com", Page())
    assert sorted(m.id for m in history) == sorted(m.id for m in [stored, *fresh, other_sender])
    assert await store.get_message(repeat_stored.id) is None
    assert await store.get_message(repeat_fresh.id) is None
    queued = await store.list_offline("b@example.com", now=0)
    assert sorted(e.message.id for e in queued) == sorted(m.id for m in [*fresh, other_sender])
    outbox = sorted(e.id for e in await store.fetch_outbox())
    assert outbox == sorted(m.id for m in [stored, *fresh, other_sender])
    assert await store.peers_of("a@example.com") == {"b@example.com"}


async def test_a_pair_whose_message_failed_is_not_taken_as_known(store: Store) -> None:
    # The writer may skip the direct_peers upsert of a pair it saw committed. A message
    # that failed (here its outbox id is taken) in a batch that was replayed must not
    # count: the pair's next message still records it.
    taken = message("x@example.com", to="z@example.com")
    await store.insert_message(taken, outbox=[outbox_for(taken)])
    doomed = message("x@example.com", to="y@example.com")
    neighbour = message("w@example.com", to="v@example.com")
    errors: list[BaseException] = []

    async def send_doomed() -> None:
        try:
            await store.insert_message(doomed, outbox=[outbox_for(taken)])  # outbox id taken
        except Conflict as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            nursery.start_soon(send_doomed)
            await wait_queued(store, 1)
            nursery.start_soon(store.insert_message, neighbour)
            await wait_queued(store, 2)
    assert store.stats.last_batches[-1].size == 2
    assert len(errors) == 1
    assert await store.get_message(doomed.id) is None
    assert await store.get_message(neighbour.id) == neighbour
    assert await store.peers_of("y@example.com") == set()
    assert await store.peers_of("x@example.com") == {"z@example.com"}

    later = message("x@example.com", to="y@example.com")
    assert (await store.insert_message(later)).created
    assert await store.peers_of("y@example.com") == {"x@example.com"}
    assert await store.peers_of("x@example.com") == {"y@example.com", "z@example.com"}
    # and once known, further messages of the pair (either way) change nothing
    await store.insert_message(message("y@example.com", to="x@example.com"))
    assert await store.peers_of("y@example.com") == {"x@example.com"}


async def test_reads_are_not_blocked_by_an_open_write_batch(store: Store) -> None:
    await store.create_user(user("before@example.com"))
    pending_id = new_id()
    insert = (
        "INSERT INTO users (user_key, user_id, password_hash, display_name, roles, created_at)"
        f" VALUES ('{pending_id}@x.y', '{pending_id}@x.y', 'h', 'P', '[]', 1)"
    )
    async with trio.open_nursery() as nursery:
        async with writer_held(store, insert_sql=insert):
            # the writer sits inside BEGIN ... with an uncommitted row; reads go on
            assert await store.get_user("before@example.com") is not None
            assert await store.get_user(f"{pending_id}@x.y") is None  # not committed yet
            async with trio.open_nursery() as readers:
                for _ in range(10):
                    readers.start_soon(store.peers_of, "before@example.com")
            # a write queued now waits for the held batch, and completes after it
            nursery.start_soon(store.create_user, user("queued@example.com"))
            await wait_queued(store, 1)
            assert await store.get_user("queued@example.com") is None
    assert await store.get_user(f"{pending_id}@x.y") is not None
    assert await store.get_user("queued@example.com") is not None


async def test_a_cancelled_waiter_does_not_cancel_its_write(store: Store) -> None:
    # The waiter gives up while its write is queued; the write still commits with its
    # batch, and the batch's other waiters are woken as usual.
    gone = message("a@example.com", to="b@example.com")
    kept = message("a@example.com", to="b@example.com")
    results: list[bool] = []

    async def keep() -> None:
        results.append((await store.insert_message(kept)).created)

    async with trio.open_nursery() as nursery:
        async with writer_held(store):
            with trio.CancelScope() as scope:
                nursery.start_soon(keep)
                await wait_queued(store, 1)
                async with trio.open_nursery() as inner:
                    inner.start_soon(store.insert_message, gone)
                    await wait_queued(store, 2)
                    scope.cancel()
            assert scope.cancelled_caught
    assert results == [True]
    assert await store.get_message(gone.id) == gone
    assert await store.get_message(kept.id) == kept
    # a later write on the same store is served as usual
    assert (await store.insert_message(message("b@example.com", to="a@example.com"))).created


async def test_cancelled_reads_leave_the_pool_usable(store: Store) -> None:
    await store.create_user(user("alice@example.com"))
    cancelled = 0
    for delay in (0, 0.0001, 0.001):
        for _ in range(5):
            with trio.move_on_after(delay) as scope:
                await store.get_user("alice@example.com")
            cancelled += scope.cancelled_caught
    # every pooled connection still answers, many at once
    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(store.get_user, "alice@example.com")
    assert await store.get_user("alice@example.com") is not None
    assert cancelled >= 5  # the zero-delay ones at least were cancelled


@pytest.mark.postgres
async def test_postgres_read_cancelled_mid_query(pg_url: str) -> None:
    # PostgreSQL only: a SQLite read runs to completion in its worker thread
    async with open_store(pg_url, read_pool=3) as store:
        await _cancel_mid_query(store)


async def _cancel_mid_query(store: Store) -> None:
    with trio.move_on_after(0.2) as scope:
        await store._read(lambda c: c.fetchval("SELECT pg_sleep(10)"))  # type: ignore[attr-defined]
    assert scope.cancelled_caught
    # every pool connection still works afterwards
    results: list[int] = []

    async def one() -> None:
        results.append(await store._read(lambda c: c.fetchval("SELECT 1")))  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert results == [1] * 8
