"""stompman (asyncio STOMP client, run in its own thread) over TCP and over WebSocket:
connect, subscribe, send with receipt, receive, client ack, nack -> redelivery,
transaction commit/abort, heart-beats, disconnect."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY

from .conftest import InteropServer

stompman = pytest.importorskip("stompman")

WAIT_S = 10.0
HEARTBEAT_MS = 200


async def _next(queue: asyncio.Queue[Any], what: str) -> Any:
    try:
        return await asyncio.wait_for(queue.get(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _scenario(port: int, tokens: list[str], ws_path: str | None) -> list[str]:
    """Runs under asyncio in a worker thread; returns the steps that passed."""
    steps: list[str] = []
    if ws_path is None:
        connection_class: Any = stompman.connection.Connection
    else:
        from stompman.connection_ws import WebSocketConnection

        connection_class = WebSocketConnection

    def client(token: str) -> Any:
        params = stompman.ConnectionParameters(
            "127.0.0.1", port, login="", passcode=token, ws_uri_path=ws_path
        )
        return stompman.Client(
            [params],
            heartbeat=stompman.Heartbeat(HEARTBEAT_MS, HEARTBEAT_MS),
            connection_class=connection_class,
            connect_retry_attempts=1,
            on_error_frame=lambda frame: errors.append(frame),
        )

    errors: list[Any] = []
    async with client(tokens[0]) as a, client(tokens[1]) as b, client(tokens[2]) as c:
        steps.append("connect")

        got_b: asyncio.Queue[Any] = asyncio.Queue()

        async def on_b(frame: Any) -> None:
            await got_b.put(frame)

        sub_b = await b.subscribe_with_manual_ack(
            "/queue/sm", on_b, ack="client-individual", receipt_timeout=WAIT_S
        )
        await a.send(
            b'{"n":1}', "/queue/sm", content_type="application/json", receipt_timeout=WAIT_S
        )
        frame = await _next(got_b, "queue message")
        assert frame.body == b'{"n":1}'
        assert frame.headers["destination"] == "/queue/sm"
        assert frame.headers["content-type"] == "application/json"
        await frame.ack()
        await sub_b.unsubscribe()
        steps.append("send-receive-ack")

        # NACK: the message goes to the other consumer, marked redelivered
        got_nb: asyncio.Queue[Any] = asyncio.Queue()
        got_nc: asyncio.Queue[Any] = asyncio.Queue()

        async def on_nb(frame: Any) -> None:
            await got_nb.put(frame)

        async def on_nc(frame: Any) -> None:
            await got_nc.put(frame)

        sub_nb = await b.subscribe_with_manual_ack("/queue/sm-nack", on_nb, receipt_timeout=WAIT_S)
        sub_nc = await c.subscribe_with_manual_ack("/queue/sm-nack", on_nc, receipt_timeout=WAIT_S)
        await a.send(b"job", "/queue/sm-nack", receipt_timeout=WAIT_S)
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(got_nb.get()), asyncio.ensure_future(got_nc.get())],
            timeout=WAIT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for fut in pending:  # a dangling get() would swallow the redelivery
            fut.cancel()
        assert done, "no first delivery"
        first = done.pop().result()
        first_was_b = first.headers["subscription"] == sub_nb.id
        await first.nack()
        again = await _next(got_nc if first_was_b else got_nb, "redelivery")
        assert again.body == b"job"
        assert again.headers.get("redelivered") == "true"
        await again.ack()
        await sub_nb.unsubscribe()
        await sub_nc.unsubscribe()
        steps.append("nack-redelivery")

        # transaction: invisible until COMMIT; an exception in the block ABORTs
        got_t: asyncio.Queue[Any] = asyncio.Queue()

        async def on_t(frame: Any) -> None:
            await got_t.put(frame)

        sub_t = await b.subscribe(
            "/queue/sm-tx", on_t, ack="auto", on_suppressed_exception=print, receipt_timeout=WAIT_S
        )
        async with a.begin() as tx:
            await tx.send(b"t1", "/queue/sm-tx")
            await tx.send(b"t2", "/queue/sm-tx")
            await asyncio.sleep(0.3)
            assert got_t.empty(), "transactional SEND visible before COMMIT"
        assert (await _next(got_t, "t1")).body == b"t1"
        assert (await _next(got_t, "t2")).body == b"t2"
        with pytest.raises(RuntimeError):
            async with a.begin() as tx:
                await tx.send(b"never", "/queue/sm-tx")
                raise RuntimeError("abort it")
        await a.send(b"after", "/queue/sm-tx", receipt_timeout=WAIT_S)
        assert (await _next(got_t, "after abort")).body == b"after"
        steps.append("transaction")

        # heart-beats both ways: idle for 5 intervals, still the same connection
        await asyncio.sleep(HEARTBEAT_MS * 5 / 1000)
        await a.send(b"alive", "/queue/sm-tx", receipt_timeout=WAIT_S)
        assert (await _next(got_t, "after idle")).body == b"alive"
        await sub_t.unsubscribe()  # stompman's client waits for its subscriptions to end
        steps.append("heart-beats")
    assert not errors, errors
    steps.append("disconnect")
    return steps


def _connections(transport: str) -> float:
    return (
        REGISTRY.get_sample_value("securecollab_stomp_connections_total", {"transport": transport})
        or 0.0
    )


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_stompman(interop_server: InteropServer, transport: str) -> None:
    if transport == "ws":
        pytest.importorskip(
            "websockets", reason="stompman's WebSocket transport needs `websockets`"
        )
        port, path = interop_server.srv.port, "/ws"
    else:
        port, path = interop_server.stomp_port, None
    before = _connections(transport)
    # bounded inside the thread too: a stuck asyncio client must fail, not hang the suite
    scenario = _scenario(port, interop_server.tokens, path)
    with trio.fail_after(60):
        steps = await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(scenario, 45)))
    assert steps == [
        "connect",
        "send-receive-ack",
        "nack-redelivery",
        "transaction",
        "heart-beats",
        "disconnect",
    ]
    # no reconnects: the heart-beats kept all three connections alive
    assert _connections(transport) - before == 3
