"""Raw STOMP over TCP (optionally TLS): `[stomp] host`/`port`, 0 disables.

Outbound frames queued for a connection go out in one `send_all` (coalescing).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import trio

from securecollab.broker.core import Broker
from securecollab.broker.session import Outbound, TransportClosed

log = logging.getLogger(__name__)

RECEIVE_BYTES = 65_536


class TcpConnection:
    """A trio stream (plain or `trio.SSLStream`) as a broker `Connection`."""

    transport = "tcp"
    bearer: str | None = None  # TCP has no upgrade request to carry a token

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self._stream = stream
        self.peer = peer

    async def receive(self) -> bytes | None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        return bytes(data) if data else None

    async def send(self, items: Sequence[Outbound]) -> None:
        data = items[0].data if len(items) == 1 else b"".join(i.data for i in items)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int) -> None:
        with trio.move_on_after(1):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if isinstance(self._stream, trio.SSLStream):  # aclose may have been cut short
            await trio.aclose_forcefully(self._stream.transport_stream)


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
        conn_stream: trio.abc.Stream = stream
        if tls is not None:
            conn_stream = trio.SSLStream(stream, tls, server_side=True)
        try:
            await broker.serve_connection(TcpConnection(conn_stream, peer))
        except Exception:
            log.exception("STOMP connection from %s failed", peer)
            await trio.aclose_forcefully(stream)

    await trio.serve_tcp(handler, port, host=host or None, task_status=task_status)
