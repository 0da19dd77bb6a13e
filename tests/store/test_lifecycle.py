"""Contract: migrations, schema version guard, durability, ping, closed store."""

from __future__ import annotations

import pytest

from securecollab.store import SchemaTooNew, Store, StoreUnavailable, open_store
from securecollab.store.schema import latest_version

from .conftest import raw_execute
from .factories import message, user


async def test_migrate_twice_is_a_no_op(store: Store) -> None:
    dialect = "sqlite" if store.url.startswith("sqlite:") else "postgres"
    latest = latest_version(dialect)
    assert latest >= 1
    assert await store.schema_version() == latest
    await store.create_user(user("alice@example.com"))

    assert await store.migrate() == latest
    assert await store.migrate() == latest
    assert await store.schema_version() == latest
    # data written before the re-run is intact
    assert await store.get_user("alice@example.com") is not None


async def test_fresh_database_has_version_zero_until_migrated(store_url: str) -> None:
    async with open_store(store_url) as s:
        assert await s.schema_version() == 0
        assert await s.migrate() >= 1
        assert await s.schema_version() >= 1


async def test_database_newer_than_code_refuses(store: Store) -> None:
    await raw_execute(
        store,
        "INSERT INTO schema_version (version, name, applied_at) VALUES (999, 'from_the_future', 0)",
    )
    with pytest.raises(SchemaTooNew, match="999"):
        await store.migrate()
    # and again after reopening, as a restarted old release would
    async with open_store(store.url) as again:
        with pytest.raises(SchemaTooNew, match="newer"):
            await again.migrate()


async def test_written_data_survives_close_and_reopen(store_url: str) -> None:
    m = message("alice@example.com", to="bob@example.com", client_id="durable-1")
    async with open_store(store_url) as s:
        await s.migrate()
        await s.create_user(user("alice@example.com"))
        await s.insert_message(
            m, offline_for=["bob@example.com"], offline_expires_at=m.created_at + 1
        )
    async with open_store(store_url) as s:
        assert await s.migrate() == await s.schema_version()
        assert await s.get_user("alice@example.com") is not None
        assert await s.get_message(m.id) == m
        assert [e.message.id for e in await s.list_offline("bob@example.com", now=0)] == [m.id]


async def test_ping_and_closed_store(store_url: str) -> None:
    async with open_store(store_url) as s:
        await s.migrate()
        await s.ping()
    with pytest.raises(StoreUnavailable):
        await s.create_user(user("late@example.com"))
    with pytest.raises(StoreUnavailable):
        await s.get_user("late@example.com")


def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported store url"):
        open_store("mysql://localhost/db")
    with pytest.raises(ValueError, match="file path"):
        open_store("sqlite:///:memory:")
