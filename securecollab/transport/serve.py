"""Start the broker's doors for a server: the raw TCP listener and the `/ws` door.

`serve_stomp(ctx)` runs in the transports nursery: it listens on `[stomp] host:port`
(host empty: `[http] host`; port 0 disables; TLS when `tls_cert`/`tls_key` are set),
records the bound port in `ctx.ports["stomp"]`, renews the node's presence registrations
(`Broker.refresh_forever`), runs the broker's write pass (`Broker.write_forever`) and the
sockets' `ReadReactor`, and when `ctx.shutdown` is set sends every session ERROR "server
shutting down" and closes it (WebSockets with 1001) before returning, so hypercorn never
waits on open WebSockets.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from securecollab.broker.core import Broker
from securecollab.netaddr import trusted_networks
from securecollab.transport.sockio import ReadReactor
from securecollab.transport.tcp import serve_stomp_tcp, tls_context
from securecollab.transport.websocket import ASGIApp, StompWebSocketASGI

log = logging.getLogger(__name__)


def broker_of(ctx: Any) -> Broker:
    """The broker of a server context (raises if it has none)."""
    broker: Broker | None = ctx.broker
    if broker is None:
        raise RuntimeError("the server context has no broker")
    return broker


def with_websocket(app: ASGIApp, ctx: Any) -> StompWebSocketASGI:
    """`app` with STOMP over WebSocket at `/ws` in front of it (raw ASGI, same HTTP port)."""
    return StompWebSocketASGI(
        app,
        lambda: broker_of(ctx),
        trusted_proxies=trusted_networks(ctx.settings.http.trusted_proxies),
    )


async def serve_stomp(
    ctx: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the STOMP TCP listener until `ctx.shutdown`; then close every session."""
    broker = broker_of(ctx)
    s = ctx.settings.stomp
    async with trio.open_nursery() as nursery:
        if s.port != 0:
            tls = tls_context(s.tls_cert, s.tls_key) if s.tls_cert else None
            # `[stomp] host` empty means the HTTP listen address (127.0.0.1 by default),
            # never "every interface" (serve_stomp_tcp's meaning of "")
            host = s.host or ctx.settings.http.host
            try:
                listeners = await nursery.start(serve_stomp_tcp, broker, host, s.port, tls)
            except OSError as exc:  # e.g. another STOMP broker (RabbitMQ's plugin) on 61613
                raise OSError(
                    exc.errno,
                    f"cannot listen for STOMP/TCP on {host}:{s.port} ([stomp] port; 0"
                    f" disables it): {exc.strerror or exc}",
                ) from exc
            ctx.ports["stomp"] = listeners[0].socket.getsockname()[1]
            log.info(
                "stomp listening",
                extra={
                    "fields": {"port": ctx.ports["stomp"], "host": host, "tls": tls is not None}
                },
            )
        # presence and private-queue registrations stay alive while this node runs
        nursery.start_soon(broker.refresh_forever)
        # frames for idle connections: one send() per connection per scheduler pass
        await nursery.start(broker.write_forever)
        # readability of client sockets through one edge-triggered epoll set
        await nursery.start(ReadReactor().run)
        task_status.started()
        await ctx.shutdown.wait()
        await broker.shutdown(max(0.5, ctx.settings.server.shutdown_timeout_s * 0.3))
        nursery.cancel_scope.cancel()
