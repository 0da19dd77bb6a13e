"""STOMP over WebSocket at `/ws` on the main HTTP port (quart-trio).

Subprotocols `v12.stomp`, `v11.stomp`, `v10.stomp` are negotiated (the best the client
offers); a handshake offering none is accepted too and the version comes from CONNECT.
Client frames may arrive in text or binary messages, several per message or split
across messages. Outbound: exactly one STOMP frame per WebSocket message, a text
message when the body is UTF-8 (binary otherwise, or always with `ws_always_binary`);
browser clients (stompjs) expect that framing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import trio
from quart import websocket

from securecollab.broker.core import Broker
from securecollab.broker.session import Outbound, TransportClosed

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """The best STOMP subprotocol among `offered` (None when it offers none we know)."""
    return next((p for p in SUBPROTOCOLS if p in offered), None)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class WebSocketConnection:
    """A quart-trio websocket as a broker `Connection`."""

    transport = "ws"

    def __init__(self, ws: Any, peer: str, bearer: str | None) -> None:
        self._ws = ws
        self.peer = peer
        self.bearer = bearer
        self._closed = False

    async def receive(self) -> bytes | None:
        # quart-trio cancels this whole handler when the peer disconnects.
        data = await self._ws.receive()
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)

    async def send(self, items: Sequence[Outbound]) -> None:
        try:
            for item in items:
                await self._ws.send(item.data.decode("utf-8") if item.text else item.data)
        except Exception as exc:  # the ASGI server's "connection gone" errors vary by version
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(1):
            try:
                await self._ws.close(code)
            except Exception:  # already gone: nothing left to tell the peer
                pass


def stomp_websocket_view(get_broker: Callable[[], Broker]) -> Callable[[], Any]:
    """The view function for `app.websocket("/ws")`: accept, then run a broker session."""

    async def stomp_ws() -> None:
        ws = cast(Any, websocket)._get_current_object()  # the real object, not the proxy
        await ws.accept(subprotocol=choose_subprotocol(ws.requested_subprotocols))
        peer = ws.headers.get("Remote-Addr", "unknown")
        conn = WebSocketConnection(ws, peer, bearer_token(ws.headers.get("Authorization")))
        await get_broker().serve_connection(conn)

    return stomp_ws
