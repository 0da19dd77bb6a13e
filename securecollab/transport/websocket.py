"""STOMP over WebSocket at `/ws` on the main HTTP port, spoken as raw ASGI.

`StompWebSocketASGI` wraps the HTTP app (quart-trio) and takes every `websocket`
scope whose path is `/ws` before quart sees it: no request context, no per-message
quart queues or tasks, just hypercorn's `websocket.accept/receive/send/close`. Every
other scope (HTTP, lifespan, other WebSocket paths) goes to the wrapped app.
Measured with `scripts/bench_broker.py` (see README "Load benchmark (issue 7)").

Subprotocols `v12.stomp`, `v11.stomp`, `v10.stomp` are negotiated (the best the client
offers); a handshake offering none is accepted too and the version comes from CONNECT.
`Authorization: Bearer` of the upgrade request is handed to the authenticator. The
upgrade is not checked against `[http] cors_origins` (browsers do not apply CORS to
WebSockets and the quart route never did; authentication is per CONNECT).
Client frames may arrive in text or binary messages, several per message or split
across messages. Outbound: exactly one STOMP frame per WebSocket message, a text
message when the body is UTF-8 (binary otherwise, or always with `ws_always_binary`);
browser clients (stompjs) expect that framing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from securecollab.broker.core import Broker
from securecollab.broker.session import Outbound, TransportClosed
from securecollab.netaddr import Network, client_address

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
WS_PATH = "/ws"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send); quart types its own events


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """The best STOMP subprotocol among `offered` (None when it offers none we know)."""
    return next((p for p in SUBPROTOCOLS if p in offered), None)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _header(scope: Scope, name: bytes) -> str | None:
    """First value of request header `name` (lower-case bytes) in an ASGI scope."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class WebSocketConnection:
    """One accepted ASGI WebSocket as a broker `Connection`."""

    transport = "ws"

    def __init__(self, receive: Receive, send: Send, peer: str, bearer: str | None) -> None:
        self._receive = receive
        self._send = send
        self.peer = peer
        self.bearer = bearer
        self._closed = False

    async def receive(self) -> bytes | None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                if data is not None:
                    return bytes(data)
                return str(message.get("text") or "").encode("utf-8")
            if kind == "websocket.disconnect":
                self._closed = True  # the server has closed it: nothing left to send
                return None
            # anything else (a stray websocket.connect) carries no STOMP bytes

    async def send(self, items: Sequence[Outbound]) -> None:
        # One ASGI message per STOMP frame, back to back: no await on anything but the
        # server's own write between them (the writer drained the whole queue at once).
        send = self._send
        try:
            for item in items:
                if item.text:
                    await send({"type": "websocket.send", "text": item.data.decode("utf-8")})
                else:
                    await send({"type": "websocket.send", "bytes": item.data})
        except Exception as exc:  # the ASGI server's "connection gone" errors vary by version
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(1):
            try:
                await self._send({"type": "websocket.close", "code": code})
            except Exception:  # already gone: nothing left to tell the peer
                pass


async def serve_stomp_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    broker: Broker,
    trusted_proxies: tuple[Network, ...] = (),
) -> None:
    """Handle one ASGI `websocket` scope: accept (subprotocol negotiated), run a session."""
    first = await receive()
    if first["type"] != "websocket.connect":  # disconnected before the handshake finished
        return
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": choose_subprotocol(scope.get("subprotocols") or ()),
        }
    )
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"  # bare host, like quart's Remote-Addr
    if trusted_proxies:
        forwarded = [
            v.decode("latin-1")
            for k, v in scope.get("headers", ())
            if k.lower() == b"x-forwarded-for"
        ]
        peer = client_address(peer, ", ".join(forwarded) or None, trusted_proxies)
    conn = WebSocketConnection(receive, send, peer, bearer_token(_header(scope, b"authorization")))
    await broker.serve_connection(conn)


class StompWebSocketASGI:
    """ASGI wrapper: `websocket` scopes on `path` are STOMP sessions; the rest goes to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        get_broker: Callable[[], Broker],
        *,
        path: str = WS_PATH,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.app = app
        self.get_broker = get_broker
        self.path = path
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Any: ASGI servers type their events each their own way (hypercorn: TypedDicts)
        if scope["type"] == "websocket" and scope.get("path") == self.path:
            await serve_stomp_websocket(
                scope, receive, send, self.get_broker(), self.trusted_proxies
            )
            return
        await self.app(scope, receive, send)
