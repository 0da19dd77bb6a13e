"""Fixtures for the SDK tests: the fake REST API served by hypercorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .fake_api import FakeApi


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[FakeApi]:
    """A fresh fake API listening on a free loopback port; `api.url` is its base URL."""
    fake = FakeApi()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    stop = trio.Event()
    binds = await nursery.start(
        lambda task_status: serve(
            fake.app, config, shutdown_trigger=stop.wait, task_status=task_status
        )
    )
    fake.url = binds[0]
    yield fake
    stop.set()
