"""Test clients that speak raw STOMP bytes over real sockets: TCP and WebSocket.

A reader task (in the test's nursery) parses what the server sends; `next()` waits
for the next frame (bounded: a missing frame fails the test, never hangs it), and
`closed` tells when the server hung up. WebSocket messages are also recorded raw so
tests can check one-frame-per-message and text/binary framing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

import stomp

WAIT_S = 10.0  # a hang guard, not a speed assertion


class Client:
    """Shared frame bookkeeping; subclasses implement `_send_bytes` and feed `_on_data`."""

    def __init__(self, version: str = "1.2") -> None:
        self.parser = stomp.Parser(version, side="client")
        self.version = version
        self.frames: list[stomp.Frame] = []
        self.heartbeats = 0
        self.closed = trio.Event()
        self._arrived = trio.Event()

    def _on_data(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, stomp.Frame):
                self.frames.append(event)
            else:
                self.heartbeats += 1
        self._arrived.set()

    def _on_close(self) -> None:
        self.closed.set()
        self._arrived.set()

    async def _send_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_raw(self, data: bytes) -> None:
        await self._send_bytes(data)

    async def frame(
        self, command: str, headers: dict[str, str] | None = None, body: bytes | str = b""
    ) -> None:
        await self._send_bytes(
            stomp.encode(stomp.Frame.make(command, headers or {}, body), self.version)
        )

    async def next(self, command: str | None = None) -> stomp.Frame:
        """The next frame from the server (asserting its command when given)."""
        with trio.fail_after(WAIT_S):
            while not self.frames:
                if self.closed.is_set():
                    raise AssertionError(
                        f"connection closed while waiting for {command or 'a frame'}"
                    )
                self._arrived = trio.Event()
                await self._arrived.wait()
        frame = self.frames.pop(0)
        if command is not None:
            assert frame.command == command, f"expected {command}, got {frame}"
        return frame

    async def expect_error(self, message_part: str) -> stomp.Frame:
        """Next frame is ERROR whose `message` contains `message_part`; then the server closes."""
        frame = await self.next()
        assert frame.command == "ERROR", f"expected ERROR, got {frame}"
        assert message_part in frame.get("message", ""), frame
        await self.wait_closed()
        return frame

    async def wait_closed(self) -> None:
        with trio.fail_after(WAIT_S):
            await self.closed.wait()

    async def quiet(self, seconds: float = 0.3) -> list[stomp.Frame]:
        """Frames that arrive within `seconds` (to assert that nothing was delivered)."""
        await trio.sleep(seconds)
        out, self.frames = self.frames, []
        return out

    async def connect(
        self,
        headers: dict[str, str] | None = None,
        *,
        passcode: str | None = None,
        login: str | None = None,
    ) -> stomp.Frame:
        h = {"accept-version": "1.2", "host": "localhost"}
        if passcode is not None:
            h["passcode"] = passcode
        if login is not None:
            h["login"] = login
        h.update(headers or {})
        await self.frame("CONNECT", h)
        return await self.next()

    async def subscribe(
        self, destination: str, sub_id: str = "0", ack: str = "auto", receipt: bool = True
    ) -> None:
        headers = {"destination": destination, "id": sub_id, "ack": ack}
        if receipt:
            await self.receipt("SUBSCRIBE", headers, rid=f"sub-{sub_id}")
        else:
            await self.frame("SUBSCRIBE", headers)

    async def receipt(
        self, command: str, headers: dict[str, str], body: bytes | str = b"", rid: str = "r"
    ) -> stomp.Frame:
        """Send a frame with a receipt and wait for that RECEIPT (other frames stay queued)."""
        await self.frame(command, {**headers, "receipt": rid}, body)
        with trio.fail_after(WAIT_S):
            while True:
                for i, f in enumerate(self.frames):
                    if f.command == "RECEIPT" and f.get("receipt-id") == rid:
                        return self.frames.pop(i)
                    if f.command == "ERROR":
                        raise AssertionError(f"ERROR instead of receipt: {f}")
                if self.closed.is_set():
                    raise AssertionError("closed before the receipt")
                self._arrived = trio.Event()
                await self._arrived.wait()

    @staticmethod
    def json(frame: stomp.Frame) -> Any:
        return json.loads(frame.body)


class TcpClient(Client):
    def __init__(self, stream: trio.abc.Stream, version: str = "1.2") -> None:
        super().__init__(version)
        self.stream = stream

    async def _send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self._on_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._on_close()

    async def close(self) -> None:
        await self.stream.aclose()


class WsClient(Client):
    def __init__(self, ws: trio_websocket.WebSocketConnection, version: str = "1.2") -> None:
        super().__init__(version)
        self.ws = ws
        self.messages: list[str | bytes] = []  # raw WebSocket messages, in order

    async def _send_bytes(self, data: bytes) -> None:
        await self.ws.send_message(data.decode())

    async def send_message(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def reader(self) -> None:
        try:
            while True:
                msg = await self.ws.get_message()
                self.messages.append(msg)
                self._on_data(msg.encode() if isinstance(msg, str) else msg)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self._on_close()

    async def close(self) -> None:
        await self.ws.aclose()


@asynccontextmanager
async def tcp_client(port: int, version: str = "1.2") -> AsyncIterator[TcpClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = TcpClient(stream, version)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        try:
            yield client
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_client(
    port: int,
    *,
    subprotocols: list[str] | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> AsyncIterator[WsClient]:
    async with trio_websocket.open_websocket(
        "127.0.0.1",
        port,
        "/ws",
        use_ssl=False,
        subprotocols=["v12.stomp"] if subprotocols is None else subprotocols,
        extra_headers=[(k.encode(), v.encode()) for k, v in (headers or [])],
    ) as ws:
        client = WsClient(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], object], what: str = "condition") -> None:
    """Wait until `predicate()` is true (polling server-side state; bounded by WAIT_S)."""
    with trio.fail_after(WAIT_S):
        while not predicate():  # noqa: ASYNC110 - server state has no event to wait on
            await trio.sleep(0.005)
