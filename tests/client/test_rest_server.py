"""The REST client against the real server (in-process, loopback): the auth half.

Behaviours the real server cannot be made to show on demand (an expired access token
within a test's time, an injected 500) stay in test_rest.py against the fake API.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from securecollab.client.rest import (
    ApiError,
    AuthError,
    RateLimited,
    RestClient,
    ServerUnavailable,
    Session,
)
from tests.support.server import PASSWORD, free_port, running_server

ALICE, BOB = "alice@example.com", "bob@example.com"


async def test_register_login_me_logout(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, RestClient(srv.base_url) as c:
        user = await c.register(ALICE, PASSWORD, display_name="Alice")
        assert (user.user_id, user.display_name) == (ALICE, "Alice")
        session = await c.login(ALICE, PASSWORD, device_id="laptop")
        assert session.user_id == ALICE and session.token and session.refresh_token
        me = await c.me()
        assert me.user_id == ALICE and me.display_name == "Alice" and me.roles
        old = session
        await c.logout()
        assert c.session is None
        # the logged-out refresh token no longer works
        async with RestClient(srv.base_url, session=old, clock=lambda: 4e9) as stale:
            with pytest.raises(AuthError, match="log in again"):
                await stale.me()


async def test_bad_password_short_password_and_no_session(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, RestClient(srv.base_url) as c:
        with pytest.raises(ApiError) as bad:
            await c.register(ALICE, "short")
        assert bad.value.status == 422 and bad.value.detail
        await c.register(ALICE, PASSWORD)
        with pytest.raises(AuthError) as info:
            await c.login(ALICE, "wrong password!")
        assert info.value.status == 401
        with pytest.raises(AuthError, match="log in first"):
            await c.me()


async def test_refresh_before_expiry_rotates_and_concurrent_calls_refresh_once(
    tmp_path: Path,
) -> None:
    """Eight calls at once with an access token about to expire: one refresh. Two would
    present the same refresh token twice, which the server treats as theft and revokes
    the whole session; the calls after it would then fail."""
    now = [1_000_000.0]
    seen: list[Session | None] = []
    async with running_server(tmp_path) as srv:
        async with RestClient(srv.base_url) as c:
            await c.register(ALICE, PASSWORD)
        async with RestClient(srv.base_url, clock=lambda: now[0], on_session=seen.append) as c:
            first = await c.login(ALICE, PASSWORD)
            now[0] += first.expires_at - now[0] - 30  # inside the refresh margin
            results: list[str] = []

            async def call() -> None:
                results.append((await c.me()).user_id)

            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(call)
            assert results == [ALICE] * 8
            assert len(seen) == 2 and seen[-1] is not None
            assert seen[-1].refresh_token != first.refresh_token
            assert (await c.me()).user_id == ALICE  # the session survived
            # a saved session resumes in a new client
            async with RestClient(srv.base_url, session=seen[-1]) as again:
                assert (await again.me()).user_id == ALICE


async def test_rate_limited_carries_retry_after(tmp_path: Path) -> None:
    async with running_server(tmp_path, http__rate_limit_user_per_min=3) as srv:
        async with RestClient(srv.base_url) as c:
            await c.register(ALICE, PASSWORD)
            await c.login(ALICE, PASSWORD)
            with pytest.raises(RateLimited) as info:
                for _ in range(10):
                    await c.me()
            assert info.value.status == 429
            assert info.value.retry_after is not None and info.value.retry_after > 0


async def test_presence_of_self_and_strangers(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            r = await http.post("/api/auth/register", json={"userId": BOB, "password": PASSWORD})
            assert r.status_code == 201
        async with RestClient(srv.base_url) as c:
            await c.register(ALICE, PASSWORD)
            await c.login(ALICE, PASSWORD)
            found = await c.presence([ALICE, BOB])
            me = found.get(ALICE)
            assert me is not None and me.status in ("ONLINE", "AWAY", "OFFLINE")
            # bob shares nothing with alice yet: presence is not revealed to strangers
            assert found.get(BOB) is None and BOB in found.hidden


async def test_server_down_is_server_unavailable() -> None:
    async with RestClient(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(ServerUnavailable, match="cannot connect"):
            await c.login(ALICE, PASSWORD)
