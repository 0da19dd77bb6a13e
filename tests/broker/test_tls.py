"""The raw STOMP listener over TLS ([stomp] tls_cert / tls_key)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.server import free_port, register_and_login, running_server, tls_client_context

from .clients import TcpClient


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "stomp-cert.pem", tmp_path / "stomp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_stomp_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
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
