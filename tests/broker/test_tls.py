"""The raw STOMP listener over TLS ([stomp] tls_cert / tls_key)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.support.server import (
    free_port,
    register_and_login,
    running_server,
    self_signed_cert,
    tls_client_context,
)

from .clients import TcpClient


async def test_stomp_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    async with (
        running_server(
            tmp_path, stomp__port=port, stomp__tls_cert=str(cert), stomp__tls_key=str(key)
        ) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as http,
    ):
        token = (await register_and_login(http, "tls@example.com"))["token"]
        raw = await trio.open_tcp_stream("127.0.0.1", srv.ports["stomp"])
        stream = trio.SSLStream(raw, tls_client_context(cert), server_hostname="127.0.0.1")
        client = TcpClient(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.reader)
            connected = await client.connect(passcode=token)
            assert connected.command == "CONNECTED"
            assert connected.get("user-name") == "tls@example.com"
            await client.subscribe("/user/queue/x")
            await client.frame("DISCONNECT", {"receipt": "bye"})
            assert (await client.next("RECEIPT")).get("receipt-id") == "bye"
            await client.wait_closed()
        # plain text on the TLS port is not STOMP: the server just drops the connection
        plain = await trio.open_tcp_stream("127.0.0.1", srv.ports["stomp"])
        await plain.send_all(b"CONNECT\naccept-version:1.2\n\n\x00")
        with trio.fail_after(10):
            data = await plain.receive_some(1024)
            while data and b"CONNECTED" not in data:
                data = await plain.receive_some(1024)
        assert not data
        await plain.aclose()


async def test_stomp_tcp_listens_on_the_http_address_when_its_host_is_empty(
    tmp_path: Path,
) -> None:
    # [stomp] host "" means [http] host (127.0.0.1 here), not every interface: the
    # listener answers on 127.0.0.1 and refuses ::1
    async with running_server(tmp_path, stomp__port=free_port(), stomp__host="") as srv:
        assert srv.ctx.settings.http.host == "127.0.0.1"
        stream = await trio.open_tcp_stream("127.0.0.1", srv.ports["stomp"])
        await stream.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("::1", srv.ports["stomp"])
