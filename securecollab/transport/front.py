"""The HTTP port's front door: `/ws` WebSocket upgrades to the broker, the rest to hypercorn.

Users see one port (`[http] port`) for REST, the docs and STOMP over WebSocket. This
module accepts its connections itself and looks at the first request head:

- a well-formed WebSocket upgrade of `GET /ws` (see `wscodec.parse_upgrade`) is answered
  here (101, subprotocol `v12.stomp`/`v11.stomp`/`v10.stomp` negotiated as before) and
  the connection becomes a broker session on `WsConnection`: RFC 6455 framing done by
  `wscodec`, bytes moved by `sockio` (a raw non-blocking socket, or the TLS stream);
- anything else — other paths, HTTP/2, malformed upgrades, a head larger than 16 KiB —
  is handed, bytes already read included, to hypercorn's own per-connection server
  (`hypercorn.trio.tcp_server.TCPServer`) exactly as hypercorn's `serve` would have.
  A WebSocket upgrade that arrives later on a keep-alive connection still reaches the
  raw ASGI door (`transport.websocket.StompWebSocketASGI`), so both paths stay correct.

Why not a hypercorn route: hypercorn does one task hop, one `wsproto` event and one
`send()` per outgoing frame. Here a session writes every queued frame of a connection
with one `send()` (one STOMP frame per WebSocket message still, as clients require),
and a frame produced while nothing is queued goes out at once from the producing task
(`SocketIO.write_nowait`). Measured with `scripts/bench.py` and
`scripts/bench_broker.py` (README, "Load benchmark").

This uses two hypercorn internals, `TCPServer(app, config, context, state, stream)` and
the lifespan/`WorkerContext` set-up of `hypercorn.trio.run.worker_serve`, which this
mirrors; pyproject pins hypercorn's minor version for that reason.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import h11
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from securecollab.broker.core import Broker
from securecollab.broker.session import Outbound, TransportClosed
from securecollab.netaddr import Network, client_address
from securecollab.transport import wscodec
from securecollab.transport.sockio import SocketIO, StreamIO
from securecollab.transport.websocket import WS_PATH, bearer_token, choose_subprotocol

#: The JSON errors of HTTP requests that never reach the app (hypercorn answers them).
_PROTOCOL_ERRORS = {
    400: ("bad_request", "malformed HTTP request"),
    413: ("payload_too_large", "request head or body too large"),
    431: ("headers_too_large", "request header fields too large"),
}


async def _json_error_response(self: H11Protocol, status_code: int) -> None:
    """hypercorn's answer to a request h11 cannot parse, with the JSON error body every
    other 4xx of this server has ({"error", "detail"}) instead of an empty one.

    Replaces `H11Protocol._send_error_response` (hypercorn is pinned to 0.18.x;
    tests/broker/test_front_door.py checks the body, so an upgrade that drops the hook
    fails a test instead of silently going back to empty bodies).
    """
    code, detail = _PROTOCOL_ERRORS.get(status_code, ("http_error", "HTTP protocol error"))
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


H11Protocol._send_error_response = _json_error_response  # type: ignore[method-assign]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64  # connections accepted per wake-up of a listener
# accept() errors that mean "out of resources right now": wait and try again
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class WsConnection:
    """A WebSocket (already upgraded) as a broker `Connection`."""

    transport = "ws"

    def __init__(
        self,
        io: SocketIO | StreamIO,
        peer: str,
        bearer: str | None,
        *,
        max_message_bytes: int,
        initial: bytes = b"",
    ) -> None:
        self.io = io
        self.peer = peer
        self.bearer = bearer
        self._reader = wscodec.FrameReader(max_message_bytes)
        self._initial = initial
        self._closed = False  # a close frame was sent (or the connection is gone)
        self._eof = False  # the peer closed: receive() returns None from now on
        # the shortcut for Session: only where a write can complete without a task switch
        self.send_nowait: Callable[[Sequence[Outbound]], bool] | None = (
            self._send_nowait if io.direct else None
        )

    async def receive(self) -> bytes | None:
        while not self._eof:
            if self._initial:
                data, self._initial = self._initial, b""
            else:
                data = await self.io.recv()
                if not data:
                    self._eof = self._closed = True  # nobody left to send a close to
                    return None
            try:
                payload, events = self._reader.feed(data)
            except wscodec.WsError as exc:
                await self._send_close(exc.code, exc.reason)
                self._eof = True
                return None
            for event in events:
                if event[0] == "ping":
                    assert isinstance(event[1], bytes)
                    if not await self._write(wscodec.encode_control(wscodec.OP_PONG, event[1])):
                        self._eof = True
                elif event[0] == "close":
                    code = event[1]
                    assert isinstance(code, int)
                    # echo the peer's code (RFC 6455 5.5.1); none given: answer without one
                    await self._send_close(None if code == 1005 else code, "")
                    self._eof = True
            if payload:
                return payload
        return None

    async def _write(self, data: bytes) -> bool:
        """Write control bytes in order with everything else; False if the peer is gone."""
        if self.io.write_nowait(data):
            return True
        try:
            await self.io.flush()
        except TransportClosed:
            return False
        return True

    async def _send_close(self, code: int | None, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        payload = b"" if code is None else wscodec.close_payload(code, reason)
        with trio.move_on_after(1):
            await self._write(wscodec.encode_control(wscodec.OP_CLOSE, payload))

    @staticmethod
    def _encode(items: Sequence[Outbound]) -> bytes:
        enc = wscodec.encode_message
        if len(items) == 1:
            return enc(items[0].data, items[0].text)
        return b"".join([enc(i.data, i.text) for i in items])

    def _send_nowait(self, items: Sequence[Outbound]) -> bool:
        return self.io.write_nowait(self._encode(items))

    async def send(self, items: Sequence[Outbound]) -> None:
        if items:
            self.io.write_nowait(self._encode(items))
        await self.io.flush()

    async def close(self, code: int) -> None:
        await self._send_close(code, "")
        if isinstance(self.io, SocketIO):
            self.io.close()
        else:
            await self.io.aclose()


class _Replay:
    """A stream that first returns bytes already read from it (for hypercorn's TCPServer).

    Everything else (`send_all`, `aclose`, `socket`, TLS's `do_handshake` — already done,
    so a no-op — and `selected_alpn_protocol`) is the wrapped stream's.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._stream.receive_some(max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _could_be_ws(buf: bytes, path: bytes) -> bool:
    """Could a request starting with `buf` still be `GET <path>` (+ space or query)?"""
    want = b"GET " + path
    if len(buf) <= len(want):
        return want.startswith(buf)
    return buf.startswith(want) and buf[len(want)] in b" ?"


class FrontDoor:
    """Per-connection routing; see the module docstring."""

    def __init__(
        self,
        app: Any,
        config: HyperConfig,
        get_broker: Callable[[], Broker],
        *,
        path: str = WS_PATH,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.trusted_proxies = trusted_proxies
        self.config = config
        self.get_broker = get_broker
        self.path = path.encode("ascii")
        self.context = WorkerContext(None)
        self.lifespan_state: LifespanState = {}
        self.state = ConnectionState(self.lifespan_state.copy())
        self.sniff_timeout_s = float(config.keep_alive_timeout)
        self.max_message_bytes = int(config.websocket_max_message_size)

    async def _sniff(self, recv: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
        """Read the start of the first request: (bytes read, is it a complete `/ws` head?)."""
        buf = b""
        with trio.move_on_after(self.sniff_timeout_s):
            while True:
                chunk = await recv()
                if not chunk:
                    return buf, False
                buf += chunk
                if not _could_be_ws(buf, self.path):
                    return buf, False
                if b"\r\n\r\n" in buf:
                    return buf, True
                if len(buf) > wscodec.MAX_HEAD_BYTES:
                    return buf, False
        return buf, False

    def _upgrade(self, buf: bytes) -> tuple[wscodec.Upgrade, bytes] | None:
        head, _, rest = buf.partition(b"\r\n\r\n")
        up = wscodec.parse_upgrade(head + b"\r\n\r\n")
        if up is None or up.path.encode("latin-1") != self.path:
            return None
        return up, rest

    async def _serve_ws(
        self, io: SocketIO | StreamIO, peer: str, up: wscodec.Upgrade, rest: bytes
    ) -> None:
        subprotocol = choose_subprotocol(up.subprotocols)
        if not io.write_nowait(wscodec.accept_response(up.key, subprotocol)):
            try:
                await io.flush()
            except TransportClosed:
                return
        conn = WsConnection(
            io,
            client_address(peer, up.forwarded_for, self.trusted_proxies),
            bearer_token(up.authorization),
            max_message_bytes=self.max_message_bytes,
            initial=rest,
        )
        await self.get_broker().serve_connection(conn)

    async def _hypercorn(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        replay: Any = _Replay(stream, prefix)  # duck-typed as the stream TCPServer expects
        await TCPServer(self.app, self.config, self.context, self.state, replay)

    async def handle_socket(self, sock: socket.socket, addr: Any) -> None:
        """A plain TCP connection just accepted (non-blocking)."""
        io = SocketIO(sock)
        owned = True  # this function closes the socket (not handed to hypercorn)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf, complete = await self._sniff(io.recv)
            found = self._upgrade(buf) if complete else None
            if found is not None:
                peer = str(addr[0]) if isinstance(addr, tuple) else "unknown"
                await self._serve_ws(io, peer, *found)
                return
            if not buf:
                return  # closed, or silent for the whole keep-alive timeout
            io.release()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            owned = False  # the socket belongs to the stream (and hypercorn) now
            await self._hypercorn(stream, buf)
        except Exception:
            log.exception("connection from %s failed", addr)
        finally:
            if owned:
                io.close()

    async def handle_tls(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """A TLS connection just accepted (handshake not yet done)."""
        io = StreamIO(stream)
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            buf, complete = await self._sniff(io.recv)
            found = self._upgrade(buf) if complete else None
            if found is not None:
                try:
                    host = stream.transport_stream.socket.getpeername()[0]
                except OSError:
                    host = "unknown"
                await self._serve_ws(io, str(host), *found)
                return
            if buf:
                await self._hypercorn(stream, buf)
        except Exception:
            log.exception("TLS connection failed")
        finally:
            await trio.aclose_forcefully(stream)


async def _accept_loop(
    sock: socket.socket,
    handler: Callable[[socket.socket, Any], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    sock.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.error("accept() failed: %s; pausing 100 ms", exc)
                    await trio.sleep(0.1)
                    break
                continue  # the peer gave up before we accepted (ECONNABORTED and the like)
            conn.setblocking(False)
            nursery.start_soon(handler, conn, addr)


async def serve_front(
    app: Any,
    config: HyperConfig,
    get_broker: Callable[[], Broker],
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    trusted_proxies: tuple[Network, ...] = (),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` (ASGI) and STOMP over WebSocket on `config.bind` until `shutdown_trigger`.

    `task_status.started(binds)` with the real addresses ("http://127.0.0.1:43121").
    Shutdown as hypercorn's: stop accepting, let requests finish for
    `config.graceful_timeout`, then run the app's lifespan shutdown.
    """
    door = FrontDoor(app, config, get_broker, trusted_proxies=trusted_proxies)
    lifespan = Lifespan(door.app, config, door.lifespan_state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            binds: list[str] = []
            ssl_context = config.create_ssl_context() if sockets.secure_sockets else None
            async with trio.open_nursery() as accept_nursery:
                for sock in sockets.secure_sockets:
                    sock.listen(config.backlog)
                    listener = trio.SSLListener(
                        trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                        ssl_context,  # type: ignore[arg-type]  # set when secure sockets exist
                        https_compatible=True,
                    )
                    binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
                    accept_nursery.start_soon(
                        functools.partial(
                            trio.serve_listeners,
                            door.handle_tls,
                            [listener],
                            handler_nursery=server_nursery,
                        )
                    )
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                    accept_nursery.start_soon(
                        _accept_loop, sock, door.handle_socket, server_nursery
                    )
                task_status.started(binds)
                await shutdown_trigger()
                accept_nursery.cancel_scope.cancel()
            for sock in sockets.insecure_sockets:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            await door.context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
