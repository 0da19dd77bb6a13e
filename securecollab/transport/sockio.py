"""Byte I/O for broker connections: a raw non-blocking socket, or a trio stream (TLS).

Both keep one output buffer per connection and let exactly one task flush it at a
time (the session's writer, or the reader answering a WebSocket ping), so frames are
never interleaved and trio never sees two tasks waiting on one socket.

`SocketIO` drives a stdlib socket with `trio.lowlevel.wait_readable/wait_writable`.
Its `write_nowait` lets a session write a frame straight from the task that produced
it (a fan-out delivering to 1,000 subscribers, an `/app` handler queuing a RECEIPT):
one `send()` syscall, no task switch, no event-loop round trip per frame. Whatever the
kernel does not take stays buffered and the caller is told to wake its writer.
`StreamIO` wraps a `trio.abc.Stream` (used for TLS); it has no such shortcut.
"""

from __future__ import annotations

import socket

import trio

from securecollab.broker.session import TransportClosed

RECEIVE_BYTES = 65_536


class SocketIO:
    """A connected non-blocking stdlib socket, owned by this object."""

    direct = True  # write_nowait may complete a write without a task switch

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray()
        self._flushing = False
        self._flushed = trio.Event()
        self._broken = False
        self._closed = False
        self._drained = False  # the last recv() did not fill its buffer

    async def recv(self) -> bytes:
        """Next bytes from the peer; b"" once it closed or the connection broke.

        After a read that did not fill the buffer the socket is most likely empty, so
        the next call waits for readability first instead of trying a `recv()` that
        would fail with EAGAIN (a syscall and an exception saved per client frame; a
        chat client sends one frame at a time). Data already there costs one trip
        through the scheduler at most.
        """
        sock = self.sock
        if self._drained:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                return b""
        while True:
            try:
                data = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError):
                    return b""
                continue
            except OSError:
                return b""
            self._drained = len(data) < RECEIVE_BYTES
            return data

    def write_nowait(self, data: bytes) -> bool:
        """Write `data` now if possible; True when all of it is in the kernel.

        False: (part of) it is buffered behind earlier bytes or a full socket; somebody
        must `flush()`.
        """
        if self._buf or self._flushing or self._broken or self._closed:
            self._buf += data
            return False
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._broken = True
            n = 0
        if n == len(data):
            return True
        self._buf += memoryview(data)[n:]
        return False

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet written."""
        return len(self._buf)

    async def flush(self) -> None:
        """Write everything buffered; raises TransportClosed if the peer is gone."""
        while self._flushing:  # another task is writing: wait for it, then check again
            await self._flushed.wait()
        if self._broken or self._closed:
            raise TransportClosed("connection lost")
        if not self._buf:
            return
        self._flushing = True
        buf = self._buf
        sock = self.sock
        try:
            while buf:
                try:
                    n = sock.send(buf)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except (trio.ClosedResourceError, OSError) as exc:
                        self._broken = True
                        raise TransportClosed("connection closed") from exc
                    continue
                except OSError as exc:
                    self._broken = True
                    raise TransportClosed(str(exc)) from exc
                del buf[:n]
        finally:
            self._flushing = False
            done, self._flushed = self._flushed, trio.Event()
            done.set()

    def close(self) -> None:
        """Close the socket now (wakes any task waiting on it); never raises."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class StreamIO:
    """A `trio.abc.Stream` (a `trio.SSLStream` in practice) with the same interface."""

    direct = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._flushing = False
        self._flushed = trio.Event()
        self._broken = False

    async def recv(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    def write_nowait(self, data: bytes) -> bool:
        self._buf += data
        return False

    @property
    def pending(self) -> int:
        return len(self._buf)

    async def flush(self) -> None:
        while self._flushing:
            await self._flushed.wait()
        if self._broken:
            raise TransportClosed("connection lost")
        if not self._buf:
            return
        self._flushing = True
        try:
            while self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._broken = True
                    raise TransportClosed(str(exc)) from exc
        finally:
            self._flushing = False
            done, self._flushed = self._flushed, trio.Event()
            done.set()

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if isinstance(self.stream, trio.SSLStream):  # aclose may have been cut short
            await trio.aclose_forcefully(self.stream.transport_stream)
