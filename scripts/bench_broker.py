#!/usr/bin/env python
"""Broker throughput on loopback: fan-out over TCP and /ws, and receipted SEND round trips.

    .venv/bin/python scripts/bench_broker.py [--messages 5000] [--subscribers 4]

Runs an in-process broker (memory backplane, permissive ACL, TCP listener + quart-trio
/ws under hypercorn) and raw-STOMP clients in the same trio process, so client and server
share the CPU: read the numbers as a floor. Reports:
- fan-out: one publisher SENDs N messages to /topic/bench (no receipts, one final
  receipt as a barrier); S subscribers each receive all N. deliveries/s = N*S / time.
- round trips: sequential SEND with receipt to /topic/rt (no subscribers), per second.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import trio
import trio_websocket
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

import stomp
from securecollab.backplane.memory import MemoryBackplane
from securecollab.broker.config import AclRule, BrokerConfig
from securecollab.broker.core import Broker
from securecollab.broker.hooks import Credentials, Identity
from securecollab.transport.tcp import serve_stomp_tcp
from securecollab.transport.websocket import stomp_websocket_view


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

    start = time.perf_counter()
    async with trio.open_nursery() as inner:
        for c in receivers:
            inner.start_soon(drain, c)
        for _ in range(n):
            await pub.frame("SEND", {"destination": f"/topic/bench-{kind}"}, body)
        await pub.frame("SEND", {"destination": "/topic/barrier", "receipt": "done"}, b"")
        await pub.until("RECEIPT", "done")
    elapsed = time.perf_counter() - start
    rate = n * subs / elapsed
    print(f"{kind:>3} fan-out: {n} msgs x {subs} subs, {elapsed:.2f} s: {rate:,.0f} deliveries/s")

    rounds = min(n, 2000)
    start = time.perf_counter()
    for i in range(rounds):
        await pub.frame("SEND", {"destination": "/topic/rt", "receipt": str(i)}, body)
        await pub.until("RECEIPT", str(i))
    elapsed = time.perf_counter() - start
    each_us = elapsed / rounds * 1e6
    print(f"{kind:>3} receipted SEND round trips: {rounds / elapsed:,.0f}/s ({each_us:.0f} us)")


async def main(n: int, subs: int) -> None:
    acl = (AclRule("/topic/*", ("*",), ("*",)),)
    cfg = BrokerConfig(
        acl=acl,
        send_limit=10**9,
        outbound_queue_frames=max(1000, n + 10),
        outbound_queue_bytes=1 << 30,
    )
    broker = Broker(MemoryBackplane(), cfg, _auth)
    app = QuartTrio(__name__)
    app.websocket("/ws")(stomp_websocket_view(lambda: broker))
    hc = HyperConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = hc.errorlog = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_stomp_tcp, broker, "127.0.0.1", 0)
        binds = await nursery.start(lambda task_status: serve(app, hc, task_status=task_status))
        tcp_port = listeners[0].socket.getsockname()[1]
        http_port = int(binds[0].rsplit(":", 1)[1])
        await bench("tcp", nursery, tcp_port, n, subs)
        await bench("ws", nursery, http_port, n, subs)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--subscribers", type=int, default=4)
    a = p.parse_args()
    trio.run(main, a.messages, a.subscribers)
