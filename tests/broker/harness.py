"""A broker on real sockets for tests: TCP listener + the raw-ASGI `/ws` door under hypercorn.

The authenticator is a small user table (the real AuthService is exercised by the
integration tests in test_server.py): passcode `token-<user>` (optionally
`token-<user>@<device>`) is a valid bearer token; login `<user>` with passcode
`<user>-password` is a valid password login.
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
from securecollab.broker.config import BrokerConfig
from securecollab.broker.core import Broker
from securecollab.broker.errors import AuthenticationFailed
from securecollab.broker.hooks import BrokerHooks, Credentials, Identity
from securecollab.transport.front import serve_front
from securecollab.transport.sockio import ReadReactor
from securecollab.transport.tcp import serve_stomp_tcp
from securecollab.transport.websocket import StompWebSocketASGI

USERS = ("alice", "bob", "carol", "dave")


def _token_identity(token: str) -> Identity | None:
    """`token-USER[@DEVICE][#SESSION_KEY]`."""
    if not token.startswith("token-"):
        return None
    rest, _, key = token[len("token-") :].partition("#")
    user, _, device = rest.partition("@")
    if user not in USERS:
        return None
    return Identity(user, ("user",), device or None, session_key=key or None)


async def table_authenticate(creds: Credentials) -> Identity:
    if creds.bearer is not None:
        ident = _token_identity(creds.bearer)
        if ident is None:
            raise AuthenticationFailed("authentication failed", "invalid bearer token")
        return ident
    if creds.passcode is None:
        raise AuthenticationFailed(
            "authentication failed", "CONNECT needs a passcode (JWT) or login/passcode"
        )
    ident = _token_identity(creds.passcode)
    if ident is not None:
        return ident
    if creds.login in USERS and creds.passcode == f"{creds.login}-password":
        return Identity(creds.login, ("user",), None)
    raise AuthenticationFailed("authentication failed", "invalid credentials")


@dataclass
class BrokerServer:
    broker: Broker
    backplane: MemoryBackplane
    tcp_port: int
    http_port: int


@asynccontextmanager
async def broker_server(
    hooks: BrokerHooks | None = None, *, write_pass: bool = True, **config: Any
) -> AsyncIterator[BrokerServer]:
    """Start a broker (TCP + WebSocket on ephemeral 127.0.0.1 ports) for one test.

    `write_pass=False`: without `Broker.write_forever` and the `ReadReactor`, so frames
    go out from the task that produces them and readers wait through trio (the paths
    of a bare Broker)."""
    cfg = replace(BrokerConfig(), **config)
    backplane = MemoryBackplane()
    broker = Broker(backplane, cfg, table_authenticate, hooks)
    asgi = StompWebSocketASGI(QuartTrio(__name__), lambda: broker)  # /ws after a keep-alive request
    hc = HyperConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.graceful_timeout = 1
    hc.accesslog = None
    hc.errorlog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        if write_pass:
            await nursery.start(broker.write_forever)
            await nursery.start(ReadReactor().run)
        listeners = await nursery.start(serve_stomp_tcp, broker, "127.0.0.1", 0)
        binds = await nursery.start(
            lambda task_status: serve_front(
                asgi, hc, lambda: broker, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        tcp_port = listeners[0].socket.getsockname()[1]
        http_port = int(binds[0].rsplit(":", 1)[1])
        try:
            yield BrokerServer(broker, backplane, tcp_port, http_port)
        finally:
            await broker.shutdown(1.0)
            stop.set()
            nursery.cancel_scope.cancel()
