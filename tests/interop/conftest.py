"""A real server with a permissive [broker] acl and three registered users, for real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.server import ServerHandle, free_port, register_and_login, running_server

USERS = ("ann@example.com", "ben@example.com", "cid@example.com")
OPEN_ACL = [
    {"pattern": "/queue/*", "subscribe": ["*"], "send": ["*"]},
    {"pattern": "/topic/*", "subscribe": ["*"], "send": ["*"]},
]


@dataclass
class InteropServer:
    srv: ServerHandle
    tokens: list[str]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.srv.port}/ws"

    @property
    def stomp_port(self) -> int:
        return self.srv.ports["stomp"]


@pytest.fixture
async def interop_server(tmp_path: Path) -> AsyncIterator[InteropServer]:
    # [stomp] port 0 disables the TCP listener: take a free port instead
    async with running_server(
        tmp_path,
        stomp__port=free_port(),
        stomp__heartbeat_send_ms=100,  # small, so heart-beats are exercised within the test
        stomp__heartbeat_recv_ms=100,
        broker__acl=OPEN_ACL,
    ) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            tokens = [(await register_and_login(http, u))["token"] for u in USERS]
        yield InteropServer(srv, tokens)
