"""Start a REAL server in-process on 127.0.0.1 with ephemeral ports, for integration tests.

    from tests.support.server import running_server

    async def test_x(tmp_path):
        async with running_server(tmp_path, http__rate_limit_user_per_min=5) as srv:
            async with httpx.AsyncClient(base_url=srv.base_url) as client:
                ...

Overrides are `section__key=value` keyword arguments (typed values, validated like the
config file). By default: data dir and SQLite file under `tmp_path`, HTTP on port 0
(the real port is `srv.port`), STOMP/TCP off (`[stomp] port = 0`; pass
`stomp__port=free_port()` to get it, then read `srv.ports["stomp"]`), and cheap argon2
parameters so tests stay fast (the hash is still argon2id). `app_hooks` add routes to
the app (e.g. one that raises). Use `store__url=pg_url` for PostgreSQL.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securecollab.api.rest import AppHook
from securecollab.app import run_server
from securecollab.config import Settings, load_settings
from securecollab.context import AppContext

FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}
PASSWORD = "correct horse battery staple"


@dataclass
class ServerHandle:
    base_url: str  # e.g. "http://127.0.0.1:43121"
    port: int  # the HTTP port
    ctx: AppContext

    @property
    def ports(self) -> dict[str, int]:
        """Bound ports by transport ("http", "stomp" when the broker listens)."""
        return self.ctx.ports

    @property
    def settings(self) -> Settings:
        return self.ctx.settings


def server_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test server under `tmp_path` (overrides: section__key=value)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(tmp_path / "data"), "shutdown_timeout_s": 5},
        "http": {"port": 0},
        "stomp": {"port": 0},
        "store": {"url": f"sqlite:///{tmp_path / 'data' / 'securecollab.db'}"},
        "auth": dict(FAST_ARGON2),
    }
    for name, value in overrides.items():
        section, sep, key = name.partition("__")
        if not sep:
            raise TypeError(f"override {name!r} must be section__key")
        sections.setdefault(section, {})[key] = value
    return load_settings(None, env={}, overrides=sections)


@asynccontextmanager
async def running_server(
    tmp_path: Path, *, app_hooks: Sequence[AppHook] = (), **overrides: Any
) -> AsyncIterator[ServerHandle]:
    """Run a server for the duration of the block; shut it down gracefully on exit."""
    settings = server_settings(tmp_path, **overrides)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        ctx: AppContext = await nursery.start(
            lambda task_status: run_server(
                settings, shutdown=shutdown, app_hooks=app_hooks, task_status=task_status
            )
        )
        scheme = "https" if settings.http.tls else "http"
        port = ctx.ports["http"]
        try:
            yield ServerHandle(f"{scheme}://127.0.0.1:{port}", port, ctx)
        finally:
            shutdown.set()


async def register_and_login(
    client: httpx.AsyncClient, user_id: str, password: str = PASSWORD
) -> dict[str, Any]:
    """Register `user_id` and log in; returns the login JSON (token, refreshToken...)."""
    r = await client.post("/api/auth/register", json={"userId": user_id, "password": password})
    assert r.status_code == 201, r.text
    r = await client.post("/api/auth/login", json={"username": user_id, "password": password})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tls_client_context(cert_path: Path) -> ssl.SSLContext:
    """An SSL context trusting one self-signed certificate."""
    return ssl.create_default_context(cafile=str(cert_path))


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for subprocess servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh self-signed EC certificate for 127.0.0.1 and its key, as PEM files in tmp_path."""
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
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
