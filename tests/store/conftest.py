"""Fixtures of the Store contract suite: every test runs on SQLite and on PostgreSQL.

`store_url` names a fresh, empty database (a SQLite file in tmp_path, or a throwaway
PostgreSQL database from the `pg_url` fixture); `store` is that database opened and
migrated. `writer_held(store)` parks the store's single writer inside a batch, so a test
can queue writes behind it or read while a write transaction is open.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from securecollab.store import Store, open_store, sqlite_writer

ADAPTERS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ADAPTERS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/securecollab.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(store_url, batch_max=256, batch_wait_ms=1.0, read_pool=3) as s:
        await s.migrate()
        yield s


def is_sqlite(store: Store) -> bool:
    return store.url.startswith("sqlite:")


async def raw_execute(store: Store, sql: str) -> None:
    """Run one SQL statement through the store's writer (test-only back door)."""
    if is_sqlite(store):  # the writer is another process: the op must pickle
        await store._write(partial(sqlite_writer.execute_for_test, sql))  # type: ignore[attr-defined]
    else:  # asyncpg's execute returns a coroutine the writer awaits
        await store._write(lambda c: c.execute(sql))  # type: ignore[attr-defined]


@asynccontextmanager
async def writer_held(store: Store, insert_sql: str | None = None) -> AsyncIterator[None]:
    """Keep the writer busy inside an open batch transaction until the block exits.

    `insert_sql`, when given, is executed inside that transaction first (uncommitted
    while the block runs, committed after).
    """
    started = threading.Event()
    release = threading.Event()
    fn: Any
    if is_sqlite(store):
        # the writer is a process: it is held by an op that waits for a file
        with tempfile.TemporaryDirectory(prefix="writer-held-") as tmp:
            started_path, release_path = os.path.join(tmp, "started"), os.path.join(tmp, "go")
            fn = partial(sqlite_writer.hold_for_test, insert_sql, started_path, release_path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._write, fn)  # type: ignore[attr-defined]
                with trio.fail_after(30):
                    while not await trio.Path(started_path).exists():  # noqa: ASYNC110
                        await trio.sleep(0.002)
                try:
                    yield
                finally:
                    await trio.Path(release_path).touch()
        return
    else:

        async def fn(c: Any) -> None:
            if insert_sql:
                await c.execute(insert_sql)
            started.set()
            for _ in range(6000):  # bounded: 30 s
                if release.is_set():
                    return
                await asyncio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._write, fn)  # type: ignore[attr-defined]
        with trio.fail_after(30):
            while not started.is_set():  # noqa: ASYNC110 - set by the writer thread
                await trio.sleep(0.002)
        try:
            yield
        finally:
            release.set()


async def wait_queued(store: Store, n: int) -> None:
    """Wait until `n` writes are queued behind the (held) writer.

    SQLite counts every write sent to its writer process and not answered yet, the held
    one included; PostgreSQL only those waiting behind the batch in progress.
    """
    want = n + 1 if is_sqlite(store) else n
    with trio.fail_after(30):
        while store._queued() < want:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await trio.sleep(0.002)
        if is_sqlite(store):  # sent, not only queued: the writer reads them all next batch
            s: Any = store
            while s._outgoing or s._sending:  # noqa: ASYNC110
                await trio.sleep(0.002)
