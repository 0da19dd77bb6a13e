"""The server restarts while bob listens and alice keeps sending with receipts: bob ends
up with every message exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from securecollab.client.api import ReceivedMessage
from tests.support.server import ServerHandle, running_server

from .conftest import SERVER_OVERRIDES, devices, register

ALICE, BOB = "alice@example.com", "bob@example.com"
COUNT = 40
SENDERS = 4


class ServerTask:
    """A real server in its own task, restartable on the same ports and data dir."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self._stop = trio.Event()
        self._done = trio.Event()
        self.handle: ServerHandle | None = None

    async def start(self, **overrides: Any) -> ServerHandle:
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[ServerHandle]) -> None:
            try:
                async with running_server(self.tmp_path, **overrides) as srv:
                    task_status.started(srv)
                    await stop.wait()
            finally:
                done.set()

        self._stop, self._done = stop, done
        self.handle = await self.nursery.start(run)
        return self.handle

    async def stop(self) -> None:
        self._stop.set()
        await self._done.wait()


@asynccontextmanager
async def server_task(tmp_path: Path) -> AsyncIterator[ServerTask]:
    async with trio.open_nursery() as nursery:
        task = ServerTask(nursery, tmp_path)
        try:
            yield task
        finally:
            await task.stop()


async def restart_while_sending(tmp_path: Path, *, wait_s: float = 30) -> int:
    """alice sends COUNT messages to bob from SENDERS tasks while the server restarts on the
    same ports and data dir; assert bob got each exactly once; return bob's reconnect count."""
    async with server_task(tmp_path) as server:
        srv = await server.start(**SERVER_OVERRIDES)
        http_port = srv.port
        await register(srv, ALICE, BOB)
        specs = [(ALICE, "a1"), (BOB, "b1")]
        async with devices(srv, tmp_path, specs, send_timeout=60) as d:
            alice, bob = d[f"{ALICE}/a1"], d[f"{BOB}/b1"]
            texts = [f"message {i:03d}" for i in range(COUNT)]
            sent = 0
            restart_now = trio.Event()

            async def keep_sending(mine: list[str]) -> None:
                # Several senders at once, so SENDs are in flight when the server stops:
                # those are written again after the reconnect, with the same body.
                nonlocal sent
                for text in mine:
                    await alice.client.send_text(BOB, text)  # returns on the RECEIPT
                    sent += 1
                    if sent == COUNT // 4:
                        restart_now.set()

            async with trio.open_nursery() as nursery:
                for k in range(SENDERS):
                    nursery.start_soon(keep_sending, texts[k::SENDERS])
                await restart_now.wait()
                await server.stop()
                await server.start(http__port=http_port, **SERVER_OVERRIDES)
            assert sent == COUNT
            await bob.inbox.wait_texts(texts, limit_s=wait_s)
            await trio.sleep(0.5)  # a duplicate would arrive now
            got = [i.text for i in bob.inbox.items if isinstance(i, ReceivedMessage)]
            assert sorted(got) == texts, "lost or duplicated messages"
            assert bob.client.stomp is not None
            return bob.client.stomp.reconnects


async def test_server_restart_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    await restart_while_sending(tmp_path)
