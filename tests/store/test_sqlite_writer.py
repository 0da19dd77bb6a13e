"""The SQLite writer process (`store/sqlite_writer.py`): its life beside the server.

The contract suite covers what writes do; these cover what only a writer in another
process can get wrong: it dying, signals meant for the server, writes that cannot be
sent, a close with writes still on their way, and bytes arriving in any chunking.
"""

from __future__ import annotations

import base64
import dataclasses
import marshal
import os
import signal
import sqlite3
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from securecollab.store import Page, StoreError, StoreUnavailable, open_store
from securecollab.store.sqlite_writer import (
    FRAME_LIMIT,
    Checkpointer,
    FrameDecoder,
    encode_frame,
    encode_request,
)
from tests.store import writer_ops  # not ".": the writer process imports it by this name

from .factories import message, user


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/db/writer.db"


async def test_a_killed_writer_fails_writes_clearly_and_readiness(tmp_path: Path) -> None:
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        await store.create_user(user("before@example.com"))
        os.kill(store._proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        with trio.fail_after(10):
            while store._writer_gone is None:  # type: ignore[attr-defined]  # noqa: ASYNC110
                await trio.sleep(0.01)
        with pytest.raises(StoreUnavailable, match="writer process exited"):
            await store.create_user(user("after@example.com"))
        with pytest.raises(StoreUnavailable):
            await store.ping()
        # reads still answer from what was committed
        assert await store.get_user("before@example.com") is not None
    # closing a store whose writer died is quick and quiet


async def test_the_writer_ignores_signals_meant_for_the_server(tmp_path: Path) -> None:
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        os.kill(store._proc.pid, signal.SIGINT)  # type: ignore[attr-defined]
        os.kill(store._proc.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        await trio.sleep(0.2)
        await store.create_user(user("still@example.com"))
        await store.ping()


async def test_a_write_that_cannot_be_sent_fails_alone(tmp_path: Path) -> None:
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        outcomes: dict[str, object] = {}

        async def bad() -> None:
            try:
                await store._write(lambda c: c.execute("SELECT 1"))  # type: ignore[attr-defined]
            except StoreError as exc:
                outcomes["bad"] = exc

        async def good() -> None:
            await store.create_user(user("good@example.com"))
            outcomes["good"] = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bad)
            nursery.start_soon(good)
        assert isinstance(outcomes["bad"], StoreError)
        assert "cannot be sent" in str(outcomes["bad"])
        assert outcomes["good"] is True
        assert await store.get_user("good@example.com") is not None


async def test_a_message_marshal_refuses_fails_alone(tmp_path: Path) -> None:
    # requests travel as marshal, which writes exact built-in types only
    class Text(str):
        pass

    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        odd = dataclasses.replace(
            message("odd@example.com", to="hub@example.com"), keys={"d": Text("k")}
        )
        with pytest.raises(StoreError, match="cannot be sent"):
            await store.insert_message(odd)
        assert (await store.insert_message(message("ok@example.com", to="hub@example.com"))).created
        assert await store.get_message(odd.id) is None


@pytest.mark.parametrize("content_bytes", [0, 24_000])
async def test_close_commits_writes_already_sent(tmp_path: Path, content_bytes: int) -> None:
    # 400 x 32 KiB of base64 is far more than the pipe holds: the flusher is still
    # sending when the store closes, and close must wait for it (never write itself)
    n = 400 if content_bytes else 50
    sent = [message(f"u{i}@example.com", to="hub@example.com") for i in range(n)]
    if content_bytes:
        big = base64.b64encode(os.urandom(content_bytes)).decode()
        sent = [dataclasses.replace(m, encrypted_content=big) for m in sent]
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        async with open_store(_url(tmp_path)) as store:
            await store.migrate()

            async def send(i: int) -> None:
                results.append((await store.insert_message(sent[i])).created)

            for i in range(len(sent)):
                nursery.start_soon(send, i)
            with trio.fail_after(10):
                while store._queued() < len(sent):  # type: ignore[attr-defined]
                    await trio.lowlevel.checkpoint()
            # leaving the block closes the store with every write submitted, most of
            # them not yet sent to (or committed by) the writer
    assert results == [True] * len(sent)
    async with open_store(_url(tmp_path)) as store:
        for m in sent:
            page = await store.list_direct_messages(m.sender_id, "hub@example.com", Page())
            assert [r.id for r in page] == [m.id]
    # the writer process of each store is gone
    assert store._proc.poll() is not None  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40),
    st.booleans(),
)
def test_frames_decode_under_any_chunking(blobs: list[bytes], cuts: list[int], req: bool) -> None:
    objs: list[object]
    if req:  # requests: marshal frames
        objs = [(i, blob, None) for i, blob in enumerate(blobs)]
        stream = b"".join(encode_request((i, blob, None)) for i, blob in enumerate(blobs))
        decoder = FrameDecoder(marshal.loads)
    else:  # replies: pickle frames
        objs = list(blobs)
        stream = b"".join(encode_frame(o) for o in objs)
        decoder = FrameDecoder()
    got: list[object] = []
    pos = 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        got += decoder.feed(stream[pos : pos + cut])
        pos += cut
        if pos >= len(stream):
            break
    got += decoder.feed(stream[pos:])
    assert got == objs


def test_an_oversized_frame_header_is_refused() -> None:
    with pytest.raises(ValueError, match="out of sync"):
        list(FrameDecoder().feed(b"\xff\xff\xff\xff" + b"x"))


async def test_outer_cancellation_closes_promptly(tmp_path: Path) -> None:
    # e.g. a second Ctrl-C: the store is left by cancellation, with writes in flight
    started = trio.current_time()
    done: list[bool] = []
    with trio.move_on_after(1):
        async with open_store(_url(tmp_path)) as store:
            await store.migrate()
            proc = store._proc  # type: ignore[attr-defined]

            async def writer(i: int) -> None:
                await store.insert_message(message(f"c{i}@example.com", to="hub@example.com"))
                done.append(True)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(writer, i)
                await trio.sleep_forever()
    assert trio.current_time() - started < 20  # a hang guard: the bug took 30 s
    assert proc.poll() is not None  # reaped
    async with open_store(_url(tmp_path)) as store:
        stored = 0
        for i in range(100):
            page = await store.list_direct_messages(f"c{i}@example.com", "hub@example.com", Page())
            stored += len(page)
        assert stored >= len(done)  # every write that returned is there


async def test_cancelled_while_opening_leaves_no_writer(tmp_path: Path) -> None:
    started = trio.current_time()
    with trio.move_on_after(0.01):
        async with open_store(_url(tmp_path)):
            pytest.fail("opened within 10 ms")  # pragma: no cover
    assert trio.current_time() - started < 20  # a hang guard: the bug took 30 s
    async with open_store(_url(tmp_path)) as store:  # the database is usable afterwards
        await store.migrate()
        await store.create_user(user("next@example.com"))


async def test_an_oversized_write_fails_alone(tmp_path: Path) -> None:
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        huge = dataclasses.replace(
            message("big@example.com", to="hub@example.com"),
            encrypted_content="A" * (FRAME_LIMIT + 1024),
        )
        small = message("small@example.com", to="hub@example.com")
        outcomes: dict[str, object] = {}

        async def send(name: str, m: object) -> None:
            try:
                outcomes[name] = (await store.insert_message(m)).created  # type: ignore[arg-type]
            except StoreError as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "huge", huge)
            nursery.start_soon(send, "small", small)
        assert isinstance(outcomes["huge"], StoreError) and "too large" in str(outcomes["huge"])
        assert outcomes["small"] is True
        await store.ping()  # the writer lives on


async def test_stray_output_and_odd_errors_do_not_break_the_writer(tmp_path: Path) -> None:
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        text = await store._write(partial(writer_ops.print_to_stdout, "hello"))  # type: ignore[attr-defined]
        assert text == "hello"
        with pytest.raises(StoreError, match="not transferable"):
            await store._write(writer_ops.raise_two_arg_error)  # type: ignore[attr-defined]
        await store.create_user(user("after@example.com"))
        await store.ping()


async def test_an_op_the_writer_cannot_load_fails_alone(tmp_path: Path) -> None:
    # pytest imports this module as "store.test_sqlite_writer": no such module there
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        with pytest.raises(StoreError, match="cannot be loaded"):
            await store._write(partial(_local_op, "x"))  # type: ignore[attr-defined]
        await store.create_user(user("still@example.com"))
        await store.ping()


def _local_op(text: str, c: object) -> str:  # pragma: no cover - runs nowhere
    return text


async def test_the_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    # ~10 MiB of messages in bursts: without the writer's checkpoint thread (its own
    # automatic checkpoint comes only every 16 MiB) the WAL would hold all of it;
    # with it, the WAL is checkpointed and reused while the bursts go on
    big = base64.b64encode(os.urandom(12_000)).decode()
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()
        for _ in range(20):
            batch = [
                dataclasses.replace(
                    message(f"u{i}@example.com", to="hub@example.com"), encrypted_content=big
                )
                for i in range(40)
            ]
            async with trio.open_nursery() as nursery:
                for m in batch:
                    nursery.start_soon(store.insert_message, m)
            await trio.sleep(0.15)  # the checkpoint thread runs at most every 0.1 s
        wal_bytes = os.stat(f"{tmp_path}/db/writer.db-wal").st_size
        assert wal_bytes < 4 * 1024 * 1024, wal_bytes
        page = await store.list_direct_messages("u3@example.com", "hub@example.com", Page())
        assert len(page) == 20


def test_the_checkpoint_thread_stops_when_close_comes_just_as_it_wakes(tmp_path: Path) -> None:
    # the writer's last commit wakes the thread, and EOF makes the writer close it before
    # the thread consumed that wake-up: the stop request must not be cleared with it
    # (the thread then slept on forever and closing the store waited 30 s for it)
    writer = sqlite3.connect(tmp_path / "db", isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    checkpointer = Checkpointer(str(tmp_path / "db"), writer)
    waiting_on = checkpointer._wake  # the event the idle thread waits on now

    class CloseBeforeClear(threading.Event):
        def clear(self) -> None:
            # close() lands between the thread's wake-up and its clear()
            checkpointer._stopping = True
            self.set()
            super().clear()

    checkpointer._wake = CloseBeforeClear()  # what the thread uses once awake
    waiting_on.set()  # a commit wakes the thread
    checkpointer._thread.join(timeout=2)
    assert not checkpointer._thread.is_alive()
    checkpointer.close()
    writer.close()


async def test_the_wal_stays_bounded_under_sustained_writes(tmp_path: Path) -> None:
    # ~40 MiB with no pause: the thread's checkpoints seldom catch up with the latest
    # commit, so the writer's own checkpoint every RESTART_PAGES restarts the WAL
    big = base64.b64encode(os.urandom(12_000)).decode()
    async with open_store(_url(tmp_path)) as store:
        await store.migrate()

        async def writer(i: int) -> None:
            for _ in range(40):
                m = message(f"u{i}@example.com", to="hub@example.com")
                await store.insert_message(dataclasses.replace(m, encrypted_content=big))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(writer, i)
        wal_bytes = os.stat(f"{tmp_path}/db/writer.db-wal").st_size
        assert wal_bytes < 24 * 1024 * 1024, wal_bytes
