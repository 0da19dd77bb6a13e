"""Fixtures for the messaging tests: real stores (SQLite file, local PostgreSQL).

`store_url` runs each test that asks for it on both adapters. `chat` wires the
messaging services to a real store and the in-process backplane, recording every
published delivery so tests can see what a connected client would have received.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    async def online(self, user_id: str, session_id: str = "s1") -> None:
        await self.backplane.presence_connect(user_id, session_id, "laptop", now_ms(), 600_000)

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
