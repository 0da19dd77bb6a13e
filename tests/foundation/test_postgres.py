"""The foundation on the PostgreSQL store: auth happy path and /readyz when the DB goes away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import PG_ADMIN_URL
from tests.support.server import PASSWORD, bearer, register_and_login, running_server

pytestmark = pytest.mark.postgres


async def test_auth_happy_path_on_postgres(tmp_path: Path, pg_url: str) -> None:
    async with running_server(tmp_path, store__url=pg_url) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            login = await register_and_login(c, "pg@example.com")
            me = await c.get("/api/users/me", headers=bearer(login["token"]))
            assert me.status_code == 200 and me.json()["userId"] == "pg@example.com"
            r1 = login["refreshToken"]
            pair = (await c.post("/api/auth/refresh", json={"token": r1})).json()
            assert (await c.post("/api/auth/refresh", json={"token": r1})).status_code == 401
            assert (
                await c.post("/api/auth/refresh", json={"token": pair["refreshToken"]})
            ).status_code == 401
            r = await c.post(
                "/api/auth/login", json={"username": "PG@example.com", "password": PASSWORD}
            )
            assert r.status_code == 200
            assert (await c.get("/readyz")).status_code == 200
            actions = {a.action for a in await srv.ctx.audit.list(actor="pg@example.com")}
            assert {"auth.register", "auth.login.success", "auth.refresh.reuse"} <= actions


async def _terminate_backends(db: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        # refuse new connections, then cut the server's existing ones: the DB is "down"
        await conn.execute(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS false')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db
        )
    finally:
        await conn.close()


async def test_readyz_503_when_postgres_is_unreachable(tmp_path: Path, pg_url: str) -> None:
    async with running_server(tmp_path, store__url=pg_url) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            assert (await c.get("/readyz")).status_code == 200
            db = pg_url.rsplit("/", 1)[1]
            await trio.to_thread.run_sync(asyncio.run, _terminate_backends(db))
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            assert (await c.get("/healthz")).status_code == 200


def test_a_broken_connection_state_is_store_unavailable() -> None:
    # what a pooled connection whose backend was terminated mid-query raised in a CI
    # run (readiness then answered 500 instead of 503)
    import asyncpg

    from securecollab.store import StoreUnavailable
    from securecollab.store.postgres import _map_error

    exc = asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    assert isinstance(_map_error(exc), StoreUnavailable)
