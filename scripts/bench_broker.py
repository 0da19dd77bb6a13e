#!/usr/bin/env python
"""Broker throughput on loopback: fan-out over TCP and /ws, and receipted SEND round trips.

    .venv/bin/python scripts/bench_broker.py [--messages 5000] [--subscribers 4]

Runs an in-process broker (memory backplane, permissive ACL, TCP listener + the HTTP
port's front door, `transport/front.py`) and raw-STOMP clients in the same trio process,
so client and server share the CPU: read the numbers as a floor. `--asgi` adds rows for
the raw ASGI door under hypercorn (what serves an upgrade that follows a keep-alive HTTP
request, and what served every /ws before the front door), `--ws-quart` rows for the
former quart-trio websocket route, `--trio-ws` rows for /ws served by trio-websocket on a
port of its own (neither offered to users). Reports:
- fan-out: one publisher SENDs N messages to /topic/bench (no receipts, one final
  receipt as a barrier); S subscribers each receive all N. deliveries/s = N*S / time.
- round trips: sequential SEND with receipt to /topic/rt (no subscribers), per second.
CPU per delivery / round trip (client + server, one process) is steadier than wall
clock on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import trio
import trio_websocket
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

import stomp
from securecollab.backplane.memory import MemoryBackplane
from securecollab.broker.config import AclRule, BrokerConfig
from securecollab.broker.core import Broker
from securecollab.broker.hooks import Credentials, Identity
from securecollab.broker.session import Outbound, TransportClosed
from securecollab.transport.front import serve_front
from securecollab.transport.sockio import ReadReactor
from securecollab.transport.tcp import serve_stomp_tcp
from securecollab.transport.websocket import (
    StompWebSocketASGI,
    WebSocketConnection,
    bearer_token,
    choose_subprotocol,
)


class _QuartWs:
    """The former door: quart-trio's websocket object seen through ASGI-style callables."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def receive(self) -> dict[str, Any]:
        data = await self.ws.receive()
        key = "text" if isinstance(data, str) else "bytes"
        return {"type": "websocket.receive", key: data}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await self.ws.send(message.get("text") or message.get("bytes"))
        else:
            await self.ws.close(message["code"])


def quart_route(broker: Broker) -> QuartTrio:
    """A quart-trio app serving /ws through `app.websocket` (the pre-issue-7 door)."""
    app = QuartTrio(__name__)

    @app.websocket("/ws")
    async def stomp_ws() -> None:
        ws = cast(Any, websocket)._get_current_object()
        await ws.accept(subprotocol=choose_subprotocol(ws.requested_subprotocols))
        q = _QuartWs(ws)
        bearer = bearer_token(ws.headers.get("Authorization"))
        conn = WebSocketConnection(q.receive, q.send, ws.headers.get("Remote-Addr", ""), bearer)
        await broker.serve_connection(conn)

    return app


class _TrioWsConn:
    """A trio-websocket server connection as a broker `Connection` (comparison only)."""

    transport = "ws"

    def __init__(self, ws: trio_websocket.WebSocketConnection, bearer: str | None) -> None:
        self.ws, self.peer, self.bearer = ws, "127.0.0.1", bearer

    async def receive(self) -> bytes | None:
        try:
            m = await self.ws.get_message()
        except trio_websocket.ConnectionClosed:
            return None
        return m.encode() if isinstance(m, str) else m

    async def send(self, items: Sequence[Outbound]) -> None:
        try:
            for item in items:
                await self.ws.send_message(item.data.decode() if item.text else item.data)
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int) -> None:
        with trio.move_on_after(1):
            await self.ws.aclose(code)


async def serve_trio_websocket(
    broker: Broker, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """/ws served by trio-websocket on its own port (what a second door would cost)."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol=choose_subprotocol(request.proposed_subprotocols))
        auth = dict(request.headers).get(b"authorization")
        await broker.serve_connection(
            _TrioWsConn(ws, bearer_token(auth.decode() if auth else None))
        )

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        task_status.started(server.port)


async def _auth(creds: Credentials) -> Identity:
    return Identity(creds.passcode or "anon")


class Conn:
    """Minimal raw STOMP client over a byte stream or a WebSocket."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], recv: Callable[[], Awaitable[bytes]]
    ) -> None:
        self._send, self._recv = send, recv
        self.parser = stomp.Parser(side="client")
        self.pending: list[stomp.Frame] = []

    async def frame(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        await self._send(stomp.encode(stomp.Frame.make(command, headers, body)))

    async def next(self) -> stomp.Frame:
        while not self.pending:
            for ev in self.parser.feed(await self._recv()):
                if isinstance(ev, stomp.Frame):
                    self.pending.append(ev)
        return self.pending.pop(0)

    async def until(self, command: str, receipt: str | None = None) -> stomp.Frame:
        while True:
            f = await self.next()
            if f.command == command and (receipt is None or f.get("receipt-id") == receipt):
                return f


async def tcp_conn(port: int) -> Conn:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    return Conn(s.send_all, lambda: s.receive_some(1 << 20))


async def ws_conn(nursery: trio.Nursery, port: int) -> Conn:
    ws = await trio_websocket.connect_websocket(
        nursery, "127.0.0.1", port, "/ws", use_ssl=False, subprotocols=["v12.stomp"]
    )

    async def recv() -> bytes:
        m = await ws.get_message()
        return m.encode() if isinstance(m, str) else m

    return Conn(lambda b: ws.send_message(b.decode()), recv)


async def bench(kind: str, nursery: trio.Nursery, port: int, n: int, subs: int) -> None:
    async def open_conn(user: str) -> Conn:
        c = await (tcp_conn(port) if kind == "tcp" else ws_conn(nursery, port))
        await c.frame(
            "CONNECT", {"accept-version": "1.2", "host": "x", "passcode": user, "heart-beat": "0,0"}
        )
        await c.until("CONNECTED")
        return c

    pub = await open_conn("pub")
    receivers = []
    for i in range(subs):
        c = await open_conn(f"sub{i}")
        await c.frame(
            "SUBSCRIBE", {"destination": f"/topic/bench-{kind}", "id": "0", "receipt": "s"}
        )
        await c.until("RECEIPT", "s")
        receivers.append(c)
    body = b'{"encryptedContent":"' + b"A" * 200 + b'","iv":"AAAAAAAAAAAAAAAA"}'

    async def drain(c: Conn) -> None:
        got = 0
        while got < n:
            if (await c.next()).command == "MESSAGE":
                got += 1

    start, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as inner:
        for c in receivers:
            inner.start_soon(drain, c)
        for _ in range(n):
            await pub.frame("SEND", {"destination": f"/topic/bench-{kind}"}, body)
        await pub.frame("SEND", {"destination": "/topic/barrier", "receipt": "done"}, b"")
        await pub.until("RECEIPT", "done")
    elapsed = time.perf_counter() - start
    cpu_us = (time.process_time() - cpu) / (n * subs) * 1e6
    rate = n * subs / elapsed
    print(
        f"{kind:>7} fan-out: {n} msgs x {subs} subs, {elapsed:.2f} s: {rate:,.0f} deliveries/s"
        f" ({cpu_us:.0f} us CPU per delivery)"
    )

    rounds = min(n, 2000)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(rounds):
        await pub.frame("SEND", {"destination": "/topic/rt", "receipt": str(i)}, body)
        await pub.until("RECEIPT", str(i))
    elapsed = time.perf_counter() - start
    each_us = elapsed / rounds * 1e6
    cpu_us = (time.process_time() - cpu) / rounds * 1e6
    print(
        f"{kind:>7} receipted SEND round trips: {rounds / elapsed:,.0f}/s ({each_us:.0f} us,"
        f" {cpu_us:.0f} us CPU)"
    )


async def main(
    n: int, subs: int, ws_quart: bool, trio_ws: bool, asgi: bool, write_pass: bool
) -> None:
    acl = (AclRule("/topic/*", ("*",), ("*",)),)
    cfg = BrokerConfig(
        acl=acl,
        send_limit=10**9,
        outbound_queue_frames=max(1000, n + 10),
        outbound_queue_bytes=1 << 30,
    )
    broker = Broker(MemoryBackplane(), cfg, _auth)
    app = StompWebSocketASGI(QuartTrio(__name__), lambda: broker)  # the server's /ws door
    hc = HyperConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = hc.errorlog = None
    async with trio.open_nursery() as nursery:
        if write_pass:
            await nursery.start(broker.write_forever)
            await nursery.start(ReadReactor().run)
        listeners = await nursery.start(serve_stomp_tcp, broker, "127.0.0.1", 0)
        binds = await nursery.start(
            lambda task_status: serve_front(
                app,
                hc,
                lambda: broker,
                shutdown_trigger=trio.sleep_forever,
                task_status=task_status,
            )
        )
        tcp_port = listeners[0].socket.getsockname()[1]
        http_port = int(binds[0].rsplit(":", 1)[1])
        await bench("tcp", nursery, tcp_port, n, subs)
        await bench("ws", nursery, http_port, n, subs)
        if asgi:  # the raw ASGI door under hypercorn (an upgrade after a keep-alive request)
            binds = await nursery.start(lambda task_status: serve(app, hc, task_status=task_status))
            await bench("wsasgi", nursery, int(binds[0].rsplit(":", 1)[1]), n, subs)
        if ws_quart:
            # alternate the doors twice: whichever runs first after TCP runs slower
            binds = await nursery.start(
                lambda task_status: serve(quart_route(broker), hc, task_status=task_status)
            )
            quart_port = int(binds[0].rsplit(":", 1)[1])
            for _ in range(2):
                await bench("ws", nursery, http_port, n, subs)
                await bench("wsquart", nursery, quart_port, n, subs)
        if trio_ws:
            await bench(
                "triows", nursery, await nursery.start(serve_trio_websocket, broker), n, subs
            )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--ws-quart", action="store_true", help="also measure the quart route")
    p.add_argument("--trio-ws", action="store_true", help="also measure a trio-websocket server")
    p.add_argument("--asgi", action="store_true", help="also measure the raw ASGI door alone")
    p.add_argument(
        "--no-write-pass",
        action="store_true",
        help="without Broker.write_forever and the ReadReactor (the bare-Broker paths)",
    )
    a = p.parse_args()
    trio.run(main, a.messages, a.subscribers, a.ws_quart, a.trio_ws, a.asgi, not a.no_write_pass)
