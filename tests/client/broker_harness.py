"""A real broker (the raw-ASGI `/ws` door under hypercorn) on a chosen or ephemeral loopback port.

Like `tests/broker/harness.py`, but it can bind a given port again, so a test can stop
the broker and start a new one where the client expects it (a server restart). The
authenticator takes passcode `token-<user>` or `token-<user>@<device>`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from quart_trio import QuartTrio

from securecollab.backplane.memory import MemoryBackplane
from securecollab.broker.config import AclRule, BrokerConfig
from securecollab.broker.core import Broker
from securecollab.broker.errors import AuthenticationFailed
from securecollab.broker.hooks import BrokerHooks, Credentials, Identity
from securecollab.transport.front import serve_front
from securecollab.transport.sockio import ReadReactor
from securecollab.transport.websocket import StompWebSocketASGI

PERMISSIVE = (AclRule("/queue/*", ("*",), ("*",)), AclRule("/topic/*", ("*",), ("*",)))


async def token_auth(creds: Credentials) -> Identity:
    token = creds.passcode or ""
    if not token.startswith("token-"):
        raise AuthenticationFailed("authentication failed", "invalid token")
    user, _, device = token[len("token-") :].partition("@")
    return Identity(user, ("user",), device or None)


@dataclass
class Running:
    broker: Broker
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@asynccontextmanager
async def broker_on(
    port: int = 0, hooks: BrokerHooks | None = None, **config: Any
) -> AsyncIterator[Running]:
    """Run a broker with a permissive ACL until the block ends, then shut it down."""
    cfg = replace(BrokerConfig(acl=PERMISSIVE), **config)
    broker = Broker(MemoryBackplane(), cfg, token_auth, hooks)
    asgi = StompWebSocketASGI(QuartTrio(__name__), lambda: broker)  # /ws after a keep-alive request
    hc = HyperConfig()
    hc.bind = [f"127.0.0.1:{port}"]
    hc.graceful_timeout = 0.5
    hc.accesslog = None
    hc.errorlog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.write_forever)
        await nursery.start(ReadReactor().run)
        binds = await nursery.start(
            lambda task_status: serve_front(
                asgi, hc, lambda: broker, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        try:
            yield Running(broker, int(binds[0].rsplit(":", 1)[1]))
        finally:
            await broker.shutdown(1.0)
            stop.set()
        nursery.cancel_scope.cancel()  # the write pass runs until cancelled


class Restartable:
    """A broker in its own task, so a test can stop it and start another on the same port."""

    def __init__(self, nursery: trio.Nursery, **kwargs: Any) -> None:
        self._nursery = nursery
        self._kwargs = kwargs
        self.port = 0
        self._stop: trio.Event | None = None
        self._done: trio.Event | None = None
        self.running: Running | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, **kwargs: Any) -> Running:
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[Running]) -> None:
            try:
                async with broker_on(self.port, **{**self._kwargs, **kwargs}) as srv:
                    task_status.started(srv)
                    await stop.wait()
            finally:
                done.set()

        self.running = await self._nursery.start(run)
        self.port = self.running.port
        self._stop, self._done = stop, done
        return self.running

    async def stop(self) -> None:
        assert self._stop is not None and self._done is not None
        self._stop.set()
        await self._done.wait()
        self.running = None
