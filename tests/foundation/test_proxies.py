"""Client addresses behind reverse proxies: `[http] trusted_proxies` and X-Forwarded-For."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from securecollab.config import ConfigError, load_settings
from securecollab.netaddr import client_address, trusted_networks
from securecollab.transport.wscodec import parse_upgrade
from tests.support.server import PASSWORD, running_server

NETS = trusted_networks(("127.0.0.1", "10.0.0.0/8", "fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # not behind a trusted proxy: headers are the client's to forge, ignored
        ("198.51.100.4", "203.0.113.9", "198.51.100.4"),
        # trusted proxy: the right-most hop that is not a trusted proxy
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "1.1.1.1, 203.0.113.9", "203.0.113.9"),  # 1.1.1.1 may be forged
        ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # through two proxies
        ("::ffff:127.0.0.1", "203.0.113.9", "203.0.113.9"),  # v4-mapped peer
        ("fd00::5", "2001:db8::7", "2001:db8::7"),
        ("127.0.0.1", "[2001:db8::7]:443", "2001:db8::7"),
        ("127.0.0.1", "203.0.113.9:5123", "203.0.113.9"),
        # every hop trusted: the left-most
        ("127.0.0.1", "10.0.0.1, 10.0.0.2", "10.0.0.1"),
        # garbage stops the walk at the last good address
        ("127.0.0.1", "203.0.113.9, not-an-ip", "127.0.0.1"),
        ("127.0.0.1", "not-an-ip, 203.0.113.9", "203.0.113.9"),
        # no header
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "", "127.0.0.1"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str) -> None:
    assert client_address(peer, forwarded, NETS) == client


def test_nothing_trusted_by_default() -> None:
    assert client_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


def test_bad_trusted_proxy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(None, env={}, overrides={"http": {"trusted_proxies": ["10.0.0.0/33"]}})


def test_websocket_upgrade_carries_forwarded_for() -> None:
    head = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n"
    )
    up = parse_upgrade(head)
    assert up is not None and up.forwarded_for == "203.0.113.9, 10.0.0.2"
    assert client_address("127.0.0.1", up.forwarded_for, NETS) == "203.0.113.9"


async def _login_ip(tmp_path: Path, **overrides: object) -> str | None:
    async with running_server(tmp_path, **overrides) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            r = await c.post(
                "/api/auth/register", json={"userId": "p@example.com", "password": PASSWORD}
            )
            assert r.status_code == 201
            r = await c.post(
                "/api/auth/login",
                json={"username": "p@example.com", "password": PASSWORD},
                headers={"X-Forwarded-For": "203.0.113.9"},
            )
            assert r.status_code == 200
        entries = await srv.ctx.audit.list(action_prefix="auth.login.success")
        return entries[0].ip


async def test_rest_uses_forwarded_for_only_from_trusted_proxies(tmp_path: Path) -> None:
    assert await _login_ip(tmp_path / "a") == "127.0.0.1"
    assert await _login_ip(tmp_path / "b", http__trusted_proxies=["127.0.0.1"]) == "203.0.113.9"


async def test_per_ip_rate_limit_counts_the_forwarded_client(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, http__trusted_proxies=["127.0.0.1"], http__rate_limit_ip_per_min=2
    ) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            one = {"X-Forwarded-For": "203.0.113.1"}
            two = {"X-Forwarded-For": "203.0.113.2"}
            codes = [(await c.get("/api/users/me", headers=one)).status_code for _ in range(3)]
            assert codes[-1] == 429  # the third request of one client in a minute
            # another client behind the same proxy has its own budget
            assert (await c.get("/api/users/me", headers=two)).status_code == 401
