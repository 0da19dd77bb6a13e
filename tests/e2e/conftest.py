"""Helpers for the end-to-end tests: real server in-process, real SDK clients on loopback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from securecollab.client.api import Client, Item, ReceivedMessage
from securecollab.client.stomp_ws import Backoff
from tests.support.server import PASSWORD, ServerHandle

#: Test servers let the SDK send freely (the per-user SEND limit has its own tests).
SERVER_OVERRIDES: dict[str, Any] = {
    "stomp__send_limit": 10_000,
    "http__rate_limit_user_per_min": 100_000,
    "auth__login_limit_per_user_per_min": 1000,
    "auth__login_limit_per_ip_per_min": 1000,
}
FAST_BACKOFF = Backoff(initial_s=0.05, max_s=0.5)


class LogCapture(logging.Handler):
    """Every log record of the process, formatted with all its extra fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__!r}")

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def server_log() -> Iterator[LogCapture]:
    """Capture the server's log at DEBUG for the test (to scan it for plaintext)."""
    handler = LogCapture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


async def register(srv: ServerHandle, *users: str) -> None:
    async with httpx.AsyncClient(base_url=srv.base_url) as http:
        for user in users:
            r = await http.post("/api/auth/register", json={"userId": user, "password": PASSWORD})
            assert r.status_code == 201, r.text


@dataclass
class Inbox:
    """What one device's `messages()` produced, with a way to wait for more."""

    items: list[Item] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def add(self, item: Item) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = trio.Event()

    def texts(self) -> list[str]:
        return [i.text for i in self.items if isinstance(i, ReceivedMessage)]

    async def wait_for(self, ok: Callable[[Inbox], bool], limit_s: float = 15) -> None:
        with trio.fail_after(limit_s):
            while not ok(self):
                await self._changed.wait()

    async def wait_texts(self, texts: list[str], limit_s: float = 15) -> None:
        await self.wait_for(lambda box: set(texts) <= set(box.texts()), limit_s)


@dataclass
class Device:
    client: Client
    inbox: Inbox


@asynccontextmanager
async def open_device(
    stack_nursery: trio.Nursery,
    srv: ServerHandle,
    tmp_path: Path,
    user: str,
    device_id: str,
    *,
    listen: bool = True,
    **options: Any,
) -> AsyncIterator[Device]:
    """Log `user` in as `device_id` (own key file), listening into an Inbox when `listen`."""
    options.setdefault("backoff", FAST_BACKOFF)
    keyfile = tmp_path / "keys" / f"{user}-{device_id}.key"
    async with Client.login(
        srv.base_url, user, PASSWORD, device_id, keyfile, realtime=listen, **options
    ) as client:
        inbox = Inbox()
        if listen:
            await client.start_listening()

            async def pump() -> None:
                async for item in client.messages():
                    inbox.add(item)

            stack_nursery.start_soon(pump)
        yield Device(client, inbox)


@asynccontextmanager
async def devices(
    srv: ServerHandle, tmp_path: Path, specs: list[tuple[str, str]], **options: Any
) -> AsyncIterator[dict[str, Device]]:
    """Several devices at once, keyed "user/device"."""
    async with trio.open_nursery() as nursery:
        try:
            async with AsyncExitStack() as stack:
                out: dict[str, Device] = {}
                for user, dev in specs:
                    out[f"{user}/{dev}"] = await stack.enter_async_context(
                        open_device(nursery, srv, tmp_path, user, dev, **options)
                    )
                yield out
        finally:
            nursery.cancel_scope.cancel()
