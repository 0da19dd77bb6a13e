"""A small real STOMP 1.2 client for the messaging tests: raw TCP, trio, `stomp/` codec.

Frames are read by a task in the caller's nursery and queued; `expect()` waits for the
next frame of a kind (bounded wait, so a missing frame fails the test instead of
hanging it).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import stomp

WAIT_S = 10.0  # a guard against hangs, not a speed assertion


class StompClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = stomp.Parser(side="client")
        self.frames: list[stomp.Frame] = []
        self._arrived = trio.Event()
        self._receipts = itertools.count(1)
        self._subs = itertools.count(1)
        self.closed = False
        self._send_lock = trio.Lock()  # several tasks may send on one connection

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for event in self.parser.feed(data):
                    if isinstance(event, stomp.Frame):
                        self.frames.append(event)
                self._wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        # Wake every waiter (several tasks may wait on one connection), then re-arm.
        self._arrived.set()
        self._arrived = trio.Event()

    async def _wait(self) -> None:
        await self._arrived.wait()

    async def write(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        data = stomp.encode(stomp.Frame.make(command, headers, body), "1.2")
        async with self._send_lock:
            await self.stream.send_all(data)

    async def expect(self, *commands: str, where: dict[str, str] | None = None) -> stomp.Frame:
        """Remove and return the first queued frame with one of `commands` (and headers)."""
        with trio.fail_after(WAIT_S):
            while True:
                for i, f in enumerate(self.frames):
                    if f.command in commands and all(
                        f.get(k) == v for k, v in (where or {}).items()
                    ):
                        return self.frames.pop(i)
                if self.closed:
                    raise ConnectionError(f"closed before {commands}: {self.frames}")
                await self._wait()

    async def send_json(self, destination: str, obj: Any, *, receipt: bool = True) -> stomp.Frame:
        """SEND a JSON body; return the RECEIPT (or the ERROR that came instead)."""
        rid = f"r{next(self._receipts)}"
        headers = {"destination": destination, "content-type": "application/json"}
        if receipt:
            headers["receipt"] = rid
        await self.write("SEND", headers, json.dumps(obj).encode())
        if not receipt:
            return stomp.Frame.make("RECEIPT", {})
        return await self._receipt_or_error(rid)

    async def _receipt_or_error(self, rid: str) -> stomp.Frame:
        with trio.fail_after(WAIT_S):
            while True:
                for i, f in enumerate(self.frames):
                    if (
                        f.command == "RECEIPT" and f.get("receipt-id") == rid
                    ) or f.command == "ERROR":
                        return self.frames.pop(i)
                if self.closed:
                    raise ConnectionError("closed before a receipt")
                await self._wait()

    async def subscribe(self, destination: str, ack: str = "auto") -> str:
        """SUBSCRIBE with a receipt; return the subscription id (ERROR -> AssertionError)."""
        sid = f"sub{next(self._subs)}"
        rid = f"r{next(self._receipts)}"
        await self.write(
            "SUBSCRIBE", {"destination": destination, "id": sid, "ack": ack, "receipt": rid}
        )
        frame = await self._receipt_or_error(rid)
        if frame.command == "ERROR":
            raise SubscribeRefused(frame.get("message") or "")
        return sid

    async def message(self, destination: str | None = None) -> tuple[stomp.Frame, dict[str, Any]]:
        where = {"destination": destination} if destination else None
        frame = await self.expect("MESSAGE", where=where)
        return frame, json.loads(frame.body)

    async def ack(self, frame: stomp.Frame) -> None:
        rid = f"r{next(self._receipts)}"
        await self.write("ACK", {"id": frame.get("ack") or "", "receipt": rid})
        await self.expect("RECEIPT", where={"receipt-id": rid})

    def pending(self, command: str = "MESSAGE") -> list[stomp.Frame]:
        return [f for f in self.frames if f.command == command]


class SubscribeRefused(Exception):
    """The broker answered a SUBSCRIBE with ERROR (the message header is the text)."""


@asynccontextmanager
async def stomp_connect(
    port: int, token: str, *, device: str | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[StompClient]:
    """A CONNECTed client authenticated by JWT as passcode; closed on exit."""
    stream = await trio.open_tcp_stream(host, port)
    client = StompClient(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        headers = {"accept-version": "1.2", "host": "localhost", "passcode": token}
        if device:
            headers["device-id"] = device
        await client.write("CONNECT", headers)
        frame = await client.expect("CONNECTED", "ERROR")
        if frame.command == "ERROR":
            raise ConnectionError(frame.get("message"))
        try:
            yield client
        finally:
            with trio.move_on_after(2):
                if not client.closed:
                    try:
                        await client.write("DISCONNECT", {"receipt": "bye"})
                        await client.expect("RECEIPT", where={"receipt-id": "bye"})
                    except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await stream.aclose()
            nursery.cancel_scope.cancel()
