"""Fixtures for the messaging tests: real stores (SQLite file, local PostgreSQL).

`store_url` runs each test that asks for it on both adapters. `chat` wires the
messaging services to a real store and the in-process backplane, recording every
published delivery so tests can see what a connected client would have received.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from securecollab.backplane import Delivery
from securecollab.backplane.memory import MemoryBackplane
from securecollab.ids import now_ms
from securecollab.services.audit import AuditService
from securecollab.services.channels import ChannelService
from securecollab.services.keys import KeyService
from securecollab.services.messages import MessageService
from securecollab.services.offline import OfflineService
from securecollab.store import Store, UserRecord, open_store
from tests.support.server import PASSWORD, ServerHandle, bearer, free_port, running_server

USERS = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL: a SQLite file, then a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@dataclass
class Chat:
    store: Store
    backplane: MemoryBackplane
    audit: AuditService
    messages: MessageService
    channels: ChannelService
    keys: KeyService
    offline: OfflineService
    delivered: list[Delivery] = field(default_factory=list)

    async def online(
        self, user_id: str, session_id: str = "s1", *, subscribed: bool = True
    ) -> None:
        """Connect a session of `user_id`; `subscribed`: it also SUBSCRIBEd to
        /user/queue/private (as the broker registers it), so it receives live."""
        await self.backplane.presence_connect(user_id, session_id, "laptop", now_ms(), 600_000)
        if subscribed:
            await self.backplane.subscriber_add(
                "/user/queue/private", user_id, session_id, now_ms(), 600_000
            )

    def bodies(
        self, kind: str, destination: str, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        return [
            json.loads(d.body)
            for d in self.delivered
            if d.kind == kind and d.destination == destination and d.user_id == user_id
        ]


@pytest.fixture
async def chat(store_url: str) -> AsyncIterator[Chat]:
    async with open_store(store_url) as store:
        await store.migrate()
        for u in USERS:
            await store.create_user(UserRecord(u, "x", u.split("@")[0], ("ROLE_USER",), now_ms()))
        backplane = MemoryBackplane()
        audit = AuditService(store)
        c = Chat(
            store=store,
            backplane=backplane,
            audit=audit,
            messages=MessageService(store, backplane),
            channels=ChannelService(store, backplane, audit),
            keys=KeyService(store, audit),
            offline=OfflineService(store),
        )

        async def record(d: Delivery) -> None:
            c.delivered.append(d)

        backplane.subscribe(record)
        yield c


# ---------------------------------------------------------------- a real server


@dataclass
class Live:
    """A running server with four registered, logged-in users."""

    srv: ServerHandle
    http: httpx.AsyncClient
    tokens: dict[str, str]  # userId -> access token

    def h(self, user: str, **extra: str) -> dict[str, str]:
        return {**bearer(self.tokens[user]), **extra}

    @property
    def stomp_port(self) -> int:
        return self.srv.ports["stomp"]

    async def send(self, user: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/api/chat/send-message", json=body, headers=self.h(user))


@pytest.fixture
async def live(store_url: str, tmp_path: Path) -> AsyncIterator[Live]:
    """A real server (REST + STOMP/TCP) on the parametrized store, users A-D logged in."""
    async with (
        running_server(tmp_path, stomp__port=free_port(), store__url=store_url) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        tokens: dict[str, str] = {}
        for u in USERS:
            r = await http.post("/api/auth/register", json={"userId": u, "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = await http.post(
                "/api/auth/login", json={"username": u, "password": PASSWORD, "deviceId": "laptop"}
            )
            assert r.status_code == 200, r.text
            tokens[u] = r.json()["token"]
        yield Live(srv, http, tokens)


def envelope(**over: object) -> dict[str, object]:
    """A well-formed envelope with random bytes as ciphertext (shapes only)."""
    e: dict[str, object] = {
        "encryptedContent": base64.b64encode(os.urandom(48)).decode(),
        "iv": base64.b64encode(os.urandom(12)).decode(),
        "keys": {"bob@example.com/phone": base64.b64encode(os.urandom(93)).decode()},
    }
    e.update(over)
    return e
