"""Raw STOMP over TCP (optionally TLS): `[stomp] host`/`port`, 0 disables.

Outbound frames queued for a connection go out in one write (coalescing); on a plain
socket a frame produced while nothing is queued is written at once by the producing
task (`sockio.SocketIO.write_nowait`, see `broker/session.py`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence

import trio

from securecollab.broker.core import Broker
from securecollab.broker.session import Outbound
from securecollab.transport.sockio import SocketIO, StreamIO

log = logging.getLogger(__name__)


class TcpConnection:
    """A TCP connection as a broker `Connection`: raw socket (plain) or a TLS stream."""

    transport = "tcp"
    bearer: str | None = None  # TCP has no upgrade request to carry a token

    def __init__(self, io: SocketIO | StreamIO, peer: str) -> None:
        self.io = io
        self.peer = peer
        # Session's shortcut: write from the producing task when the socket takes it
        self.send_nowait: Callable[[Sequence[Outbound]], bool] | None = (
            self._send_nowait if io.direct else None
        )

    async def receive(self) -> bytes | None:
        return (await self.io.recv()) or None

    def _send_nowait(self, items: Sequence[Outbound]) -> bool:
        data = items[0].data if len(items) == 1 else b"".join([i.data for i in items])
        return self.io.write_nowait(data)

    async def send(self, items: Sequence[Outbound]) -> None:
        if items:
            self.io.write_nowait(
                items[0].data if len(items) == 1 else b"".join([i.data for i in items])
            )
        await self.io.flush()

    async def close(self, code: int) -> None:
        if isinstance(self.io, SocketIO):
            self.io.close()
        else:
            await self.io.aclose()


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "unknown"


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Server-side TLS context (TLS 1.2+) from PEM files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def serve_stomp_tcp(
    broker: Broker,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept STOMP connections until cancelled; `task_status.started(listeners)`.

    `host` "" listens on every interface; port 0 picks a free port (read it from the
    listeners). Each connection runs in its own task; one failing never stops the server.
    """

    async def handler(stream: trio.SocketStream) -> None:
        peer = _peer_of(stream)
        io: SocketIO | StreamIO
        if tls is not None:
            io = StreamIO(trio.SSLStream(stream, tls, server_side=True))
        else:
            # the plain socket leaves trio's stream: SocketIO drives it directly
            io = SocketIO(socket.socket(fileno=stream.socket.detach()))
        try:
            await broker.serve_connection(TcpConnection(io, peer))
        except Exception:
            log.exception("STOMP connection from %s failed", peer)
            if isinstance(io, SocketIO):
                io.close()
            else:
                await trio.aclose_forcefully(io.stream)

    await trio.serve_tcp(handler, port, host=host or None, task_status=task_status)
