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

`ReadReactor` (run by the server next to the broker's write pass) tells `SocketIO`
readers that their socket became readable through one edge-triggered epoll set of its
own, each socket registered once. Through trio's `wait_readable` every wait re-arms a
one-shot registration (an `epoll_ctl` syscall and its bookkeeping per client frame);
through the reactor a frame costs a dict entry, and a scheduler pass one `epoll_wait`
on the reactor's set however many sockets became readable in it. Without a running
reactor (tests that build bare transports) readers use trio's `wait_readable`.
"""

from __future__ import annotations

import select
import socket

import outcome
import trio

from securecollab.broker.session import TransportClosed

RECEIVE_BYTES = 65_536
_EDGE_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


class ReadReactor:
    """Readability of many sockets through one edge-triggered epoll set (module docstring).

    Edge-triggered: the kernel reports a socket once per arrival of data. An edge that
    comes while its reader is busy (processing the previous frame) is remembered in
    `_ready`, so its next wait returns at once; the reader then reads until `recv()`
    comes back short, as `SocketIO.recv` does. A spurious wake-up (an fd number reused
    after a close) costs one `recv()` that fails with EAGAIN and a new wait.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._ready: set[int] = set()
        self.running = False

    def register(self, fd: int) -> None:
        """Watch `fd` until `unregister`; an fd that is readable already is reported."""
        self._epoll.register(fd, _EDGE_READ)
        self._ready.add(fd)  # whatever came before registration: read before waiting

    def unregister(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed); its waiting reader gets
        ClosedResourceError."""
        self._ready.discard(fd)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed
        task = self._waiting.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError("closed")))

    async def wait_readable(self, fd: int) -> None:
        """Until `fd` got data (or an edge came since the last wait); a checkpoint."""
        if fd in self._ready:
            await trio.lowlevel.checkpoint()
            # consumed only now: a wait cancelled at that checkpoint keeps the edge (its
            # data is still unread, and the kernel reports no new edge for it)
            self._ready.discard(fd)
            return
        if fd in self._waiting:
            raise trio.BusyResourceError("another task is already reading this socket")
        task = trio.lowlevel.current_task()
        self._waiting[fd] = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._waiting.get(fd) is task:
                del self._waiting[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve readers until cancelled; then wake them all (they fall back to trio)."""
        self.running = True
        _REACTOR.set(self)
        task_status.started()
        epoll = self._epoll
        waiting = self._waiting
        ready = self._ready
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _flags in epoll.poll(0):
                    task = waiting.pop(fd, None)
                    if task is None:
                        ready.add(fd)
                    else:
                        reschedule(task)
        finally:
            self.running = False
            _REACTOR.set(None)
            for task in waiting.values():
                reschedule(task)  # a spurious wake-up: the reader tries recv() again
            waiting.clear()
            epoll.close()


_REACTOR: trio.lowlevel.RunVar[ReadReactor | None] = trio.lowlevel.RunVar(
    "securecollab_read_reactor", None
)


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
        self._reactor: ReadReactor | None = None  # registered with it at the first wait

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
                await self._wait_readable()
            except (trio.ClosedResourceError, OSError):
                return b""
        while True:
            try:
                data = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                try:
                    await self._wait_readable()
                except (trio.ClosedResourceError, OSError):
                    return b""
                continue
            except OSError:
                return b""
            self._drained = len(data) < RECEIVE_BYTES
            return data

    async def _wait_readable(self) -> None:
        reactor = self._reactor
        if reactor is None:
            reactor = _REACTOR.get()
            if reactor is not None and not self._closed:
                reactor.register(self.sock.fileno())
                self._reactor = reactor
        if reactor is not None and reactor.running:
            await reactor.wait_readable(self.sock.fileno())
        else:
            await trio.lowlevel.wait_readable(self.sock)

    def release(self) -> None:
        """The socket gets another owner (hypercorn, for a plain HTTP request): stop
        watching it through the reactor, which would wake for every request on it."""
        if self._reactor is not None:
            self._reactor.unregister(self.sock.fileno())
            self._reactor = None

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
        if self._reactor is not None:
            self._reactor.unregister(self.sock.fileno())
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
