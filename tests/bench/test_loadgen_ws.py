"""The load generator's own WebSocket client (scripts/bench_lib/loadgen.py) against the
`websockets` server as a reference implementation: handshake, masking, fragmented
messages, ping/pong, close, and the refusals (wrong Sec-WebSocket-Accept, a masked server
frame). Plain asyncio (the load generator is asyncio), run with asyncio.run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("loadgen", ROOT / "scripts/bench_lib/loadgen.py")
assert _spec is not None and _spec.loader is not None
loadgen: Any = importlib.util.module_from_spec(_spec)
sys.modules["loadgen"] = loadgen
_spec.loader.exec_module(loadgen)


def with_server(
    handler: Callable[[ServerConnection], Awaitable[None]],
    client: Callable[[str], Awaitable[Any]],
) -> Any:
    async def main() -> Any:
        async with serve(handler, "127.0.0.1", 0, subprotocols=["v12.stomp"]) as server:  # type: ignore[list-item]
            port = next(iter(server.sockets)).getsockname()[1]
            return await asyncio.wait_for(client(f"ws://127.0.0.1:{port}/ws"), 10)

    return asyncio.run(main())


def test_mask_matches_the_rfc_example_and_the_pure_python_fallback() -> None:
    # RFC 6455 5.7: "Hello" masked with 37 fa 21 3d
    mask = bytes.fromhex("37fa213d")
    assert loadgen.xor_mask(b"Hello", mask) == bytes.fromhex("7f9f4d5158")
    payload = bytes(range(256)) * 5 + b"xyz"
    c_mask = loadgen._c_apply_mask
    try:
        loadgen._c_apply_mask = None
        pure = loadgen.xor_mask(payload, mask)
    finally:
        loadgen._c_apply_mask = c_mask
    assert pure == loadgen.xor_mask(payload, mask)
    assert loadgen.xor_mask(pure, mask) == payload


def test_frame_header_lengths_and_fresh_masks() -> None:
    for n, head_len in ((0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)):
        f = loadgen.ws_frame(b"a" * n)
        assert f[0] == 0x81 and f[1] & 0x80  # FIN + text, masked
        assert len(f) == head_len + 4 + n
        mask = f[head_len : head_len + 4]
        assert loadgen.xor_mask(f[head_len + 4 :], mask) == b"a" * n
    masks = {loadgen.ws_frame(b"x")[2:6] for _ in range(2000)}
    assert len(masks) > 1900  # random per frame, across os.urandom refills


def test_round_trip_fragments_ping_and_close_with_the_reference_server() -> None:
    got: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.subprotocol == "v12.stomp"
        async for msg in ws:  # the server rejects unmasked client frames (RFC 6455 5.1)
            got.append(str(msg))
            if msg == "fragments":
                await ws.send(["MESS", "AGE\n\n", "body\x00"])  # one message, 3 frames
            elif msg == "ping":
                await asyncio.wait_for(await ws.ping(b"pp"), 5)  # our pong answers it
                await ws.send("pong seen")
            else:
                await ws.send(msg)

    async def client(url: str) -> list[bytes]:
        c = await loadgen.ws_connect(url, 5)
        big = "B" * 70_000  # 64-bit length
        for text in ("hello", "fragments", "ping", big):
            c.send(text.encode())
        out = [await c.recv(5) for _ in range(4)]
        await c.close()
        assert c.is_lost and c.failure is None  # closed by us, cleanly
        return out

    out = with_server(handler, client)
    assert out == [b"hello", b"MESSAGE\n\nbody\x00", b"pong seen", b"B" * 70_000]
    assert got == ["hello", "fragments", "ping", "B" * 70_000]


def test_server_close_is_reported_and_echoed() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(4000, "bye")

    async def client(url: str) -> str | None:
        c = await loadgen.ws_connect(url, 5)
        with pytest.raises(ConnectionError):
            await c.recv(5)
        failure: str | None = c.failure
        return failure

    assert with_server(handler, client) == "closed by server 4000 bye"


def raw_server_test(
    response: Callable[[bytes], bytes],
    use: Callable[[Any], Awaitable[str | None]] | None = None,
) -> str | None:
    """A hand-written server answering the upgrade with response(request).

    Returns the connection error, else what `use(connection)` returns, else "connected".
    """

    async def main() -> str | None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            req = await r.readuntil(b"\r\n\r\n")
            w.write(response(req))
            await w.drain()
            await asyncio.sleep(1)
            w.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            c = await loadgen.ws_connect(f"ws://127.0.0.1:{port}/ws", 5)
            if use is not None:
                return await use(c)
        except ConnectionError as exc:
            return str(exc)
        finally:
            server.close()
        return "connected"

    return asyncio.run(main())


def accept_of(req: bytes) -> str:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in req.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept: str = loadgen.accept_for(key)
    return accept


def upgrade(accept: str, extra: str = "") -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    ).encode()


def test_handshake_refusals() -> None:
    assert raw_server_test(lambda req: upgrade(accept_of(req))) == "connected"
    assert "Sec-WebSocket-Accept" in raw_server_test(lambda req: upgrade("AAAA"))
    assert "refused: HTTP/1.1 404" in raw_server_test(lambda req: b"HTTP/1.1 404 No\r\n\r\n")
    proto = "Sec-WebSocket-Protocol: mqtt\r\n"
    assert "subprotocol" in raw_server_test(lambda req: upgrade(accept_of(req), proto))
    masked = bytes((0x81, 0x81)) + b"\x00\x00\x00\x00x"
    # a masked frame from the server fails the connection (RFC 6455 5.1)

    async def read(c: Any) -> str | None:
        with pytest.raises(ConnectionError):
            await c.recv(5)
        failure: str | None = c.failure
        return failure

    got = raw_server_test(lambda req: upgrade(accept_of(req)) + masked, read)
    assert got == "masked frame from the server"


def test_only_loopback_is_dialled() -> None:
    with pytest.raises(ValueError):
        asyncio.run(loadgen.ws_connect("ws://example.com:80/ws", 1))
