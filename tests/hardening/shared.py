"""Helpers for hostile-input tests: a real server in a background thread, shared by a module.

Hostile-input tests send thousands of requests; starting a server per case would cost
more than the cases. The server runs in its own thread (its own `trio.run`), so sync
tests (hypothesis drives sync code best) and async tests can both talk to it over
loopback. Server log records reach pytest's `caplog` (same process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.server import free_port, register_and_login, running_server

USERS = ("alice@example.com", "bob@example.com", "carol@example.com")
START_TIMEOUT_S = 30.0


@dataclass
class SharedServer:
    base_url: str
    stomp_port: int
    tokens: dict[str, str] = field(default_factory=dict)  # userId -> access token

    def auth(self, user: str = "alice@example.com") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


def _serve(tmp: Path, overrides: dict[str, Any], ready: Any, stop: threading.Event) -> None:
    async def main() -> None:
        async with running_server(tmp, **overrides) as srv:
            async with httpx.AsyncClient(base_url=srv.base_url) as client:
                tokens = {u: (await register_and_login(client, u))["token"] for u in USERS}
            ready(SharedServer(srv.base_url, srv.ports["stomp"], tokens))
            while not stop.is_set():  # noqa: ASYNC110 - the stop signal comes from another thread
                await trio.sleep(0.05)

    trio.run(main)


def shared_server_gen(
    tmp_path_factory: pytest.TempPathFactory, extra: dict[str, Any] | None = None
) -> Iterator[SharedServer]:
    """Run the shared server for as long as the generator is open (`extra`: more overrides)."""
    overrides: dict[str, Any] = {
        "stomp__port": free_port(),
        "http__rate_limit_user_per_min": 1_000_000,
        "http__rate_limit_ip_per_min": 1_000_000,
        "stomp__send_limit": 1_000_000,
        "auth__login_limit_per_ip_per_min": 1_000_000,
        "auth__login_limit_per_user_per_min": 1_000_000,
        **(extra or {}),
    }
    box: list[SharedServer] = []
    started = threading.Event()
    stop = threading.Event()

    def ready(srv: SharedServer) -> None:
        box.append(srv)
        started.set()

    thread = threading.Thread(
        target=_serve, args=(tmp_path_factory.mktemp("srv"), overrides, ready, stop), daemon=True
    )
    thread.start()
    assert started.wait(START_TIMEOUT_S), "the test server did not start"
    try:
        yield box[0]
    finally:
        stop.set()
        thread.join(15)


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Server log records at ERROR or above (an unhandled exception logs one)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("securecollab")
    ]
