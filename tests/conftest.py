"""Shared fixtures: throwaway PostgreSQL databases and service availability.

Tests that need PostgreSQL or Redis skip with a printed reason on a laptop without
them; under CI=true they fail instead, so CI can never go green by skipping.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "SECURECOLLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SECURECOLLAB_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    """Skip (or, under CI, fail) when a service is not listening."""
    if _port_open(host, port):
        return
    msg = f"{name} is not listening on {host}:{port}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: services must run)")
    pytest.skip(msg)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def make_pg_database() -> str:
    """Create an empty throwaway database; return its URL."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    name = "sc_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = make_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def redis_url() -> str:
    need_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL
