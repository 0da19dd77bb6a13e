"""`ReadReactor`: readers of `SocketIO` woken through one edge-triggered epoll set."""

from __future__ import annotations

import socket

import trio

from securecollab.transport.sockio import ReadReactor, SocketIO


def pair() -> tuple[SocketIO, socket.socket]:
    a, b = socket.socketpair()
    return SocketIO(a), b


async def read_then_wait_in_vain(io: SocketIO, peer: socket.socket) -> None:
    """Read one chunk, then wait in the reactor (registered, read dry) until cancelled."""
    peer.send(b"x")
    assert await io.recv() == b"x"
    with trio.move_on_after(0.05):
        await io.recv()


async def test_readers_get_data_that_arrives_while_they_wait_or_work() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(ReadReactor().run)
        ios = [pair() for _ in range(3)]
        for io, peer in ios:
            peer.send(b"first")
            assert await io.recv() == b"first"
        got: list[bytes] = []

        async def read(io: SocketIO) -> None:
            got.append(await io.recv())

        async with trio.open_nursery() as readers:
            for io, _ in ios:
                readers.start_soon(read, io)
            await trio.sleep(0.05)  # all three wait in the reactor now
            for i, (_, peer) in enumerate(ios):
                peer.send(b"msg%d" % i)
        assert sorted(got) == [b"msg0", b"msg1", b"msg2"]
        # an edge that comes while nobody waits is not lost
        io, peer = ios[0]
        peer.send(b"while busy")
        await trio.sleep(0.05)
        with trio.fail_after(2):
            assert await io.recv() == b"while busy"
        # end of stream
        peer.close()
        with trio.fail_after(2):
            assert await io.recv() == b""
        nursery.cancel_scope.cancel()


async def test_close_and_cancel_of_a_waiting_reader() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(ReadReactor().run)
        io, peer = pair()
        # a cancelled wait leaves nothing behind: the next wait works
        await read_then_wait_in_vain(io, peer)
        peer.send(b"y")
        with trio.fail_after(2):
            assert await io.recv() == b"y"
        # closing the socket under a waiting reader ends its recv with b""
        result: list[bytes] = []

        async def read() -> None:
            result.append(await io.recv())

        async with trio.open_nursery() as inner:
            inner.start_soon(read)
            await trio.sleep(0.05)
            io.close()
        assert result == [b""]
        peer.close()
        nursery.cancel_scope.cancel()


async def test_readers_fall_back_to_trio_when_the_reactor_stops() -> None:
    io, peer = pair()
    result: list[bytes] = []
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(ReadReactor().run)
            peer.send(b"a")
            assert await io.recv() == b"a"

            async def read() -> None:
                result.append(await io.recv())

            outer.start_soon(read)
            await trio.sleep(0.05)  # waiting in the reactor
            nursery.cancel_scope.cancel()
        await trio.sleep(0.05)  # woken, found nothing, now waits through trio
        peer.send(b"b")
    assert result == [b"b"]
    io.close()
    peer.close()


async def test_a_cancelled_wait_keeps_an_edge_that_came_while_the_reader_was_busy() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(ReadReactor().run)
        io, peer = pair()
        await read_then_wait_in_vain(io, peer)
        peer.send(b"y")  # its edge comes while nobody waits: remembered
        await trio.sleep(0.05)
        with trio.CancelScope() as scope:
            scope.cancel()
            await io.recv()  # cancelled at its checkpoint: reads nothing
        with trio.fail_after(2):
            assert await io.recv() == b"y"
        io.close()
        peer.close()
        nursery.cancel_scope.cancel()
