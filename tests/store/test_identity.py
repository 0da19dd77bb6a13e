"""Contract: users, refresh tokens, audit log (on every adapter)."""

from __future__ import annotations

import dataclasses

import pytest

from securecollab.ids import new_id
from securecollab.store import AuditRecord, Conflict, NotFound, Store

from .factories import T0, token, user


async def test_user_round_trip_and_case_insensitive_identity(store: Store) -> None:
    alice = user("Alice@Example.com")
    await store.create_user(alice)

    assert await store.get_user("alice@example.com") == alice
    assert await store.get_user("ALICE@EXAMPLE.COM") == alice
    assert await store.get_user("bob@example.com") is None

    with pytest.raises(Conflict):
        await store.create_user(user("alice@example.COM"))
    # the failed registration changed nothing
    assert (await store.get_user("alice@example.com")) == alice


async def test_existing_users_and_deletion(store: Store) -> None:
    for uid in ("ann@example.com", "Ben@example.com", "cy@example.com"):
        await store.create_user(user(uid))

    found = await store.existing_users(["ANN@example.com", "ben@example.com", "zed@example.com"])
    assert found == {"ann@example.com", "Ben@example.com"}  # stored spelling
    assert await store.existing_users([]) == set()

    await store.set_user_deleted("ann@example.com", T0 + 5)
    gone = await store.get_user("ann@example.com")
    assert gone is not None and gone.deleted_at == T0 + 5  # still readable, marked deleted
    assert await store.existing_users(["ann@example.com", "cy@example.com"]) == {"cy@example.com"}

    with pytest.raises(NotFound):
        await store.set_user_deleted("nobody@example.com", T0)


async def test_refresh_token_rotation_is_single_use(store: Store) -> None:
    family = new_id()
    first = token("alice@example.com", family, device_id="phone")
    await store.add_refresh_token(first)
    assert await store.get_refresh_token(first.token_hash) == first

    second = token("alice@example.com", family, at=T0 + 10)
    assert await store.rotate_refresh_token(first.token_hash, second, T0 + 10) is True
    used = await store.get_refresh_token(first.token_hash)
    assert used is not None and used.used_at == T0 + 10
    assert await store.get_refresh_token(second.token_hash) == second

    # replaying the rotated token: refused, and the would-be successor is not stored
    thief = token("alice@example.com", family, at=T0 + 20)
    assert await store.rotate_refresh_token(first.token_hash, thief, T0 + 20) is False
    assert await store.get_refresh_token(thief.token_hash) is None

    # an unknown token cannot be rotated either
    stray = token("alice@example.com", family)
    assert await store.rotate_refresh_token("00" * 32, stray, T0 + 30) is False
    assert await store.get_refresh_token(stray.token_hash) is None


async def test_revoke_token_family(store: Store) -> None:
    family, other = new_id(), new_id()
    a = token("alice@example.com", family)
    b = token("alice@example.com", family)
    c = token("alice@example.com", other)
    for t in (a, b, c):
        await store.add_refresh_token(t)

    assert await store.revoke_token_family(family, T0 + 99) == 2
    assert await store.revoke_token_family(family, T0 + 100) == 0  # already revoked
    for t in (a, b):
        got = await store.get_refresh_token(t.token_hash)
        assert got is not None and got.revoked_at == T0 + 99
    untouched = await store.get_refresh_token(c.token_hash)
    assert untouched is not None and untouched.revoked_at is None
    assert await store.family_revoked(family) is True
    assert await store.family_revoked(other) is False
    assert await store.family_revoked(new_id()) is False  # no such family

    # a revoked token cannot be rotated
    assert await store.rotate_refresh_token(b.token_hash, token("x@y.z", family), T0) is False


async def test_duplicate_refresh_token_conflicts(store: Store) -> None:
    t = token("alice@example.com", new_id())
    await store.add_refresh_token(t)
    with pytest.raises(Conflict):
        await store.add_refresh_token(t)


async def test_audit_append_list_filter_prune(store: Store) -> None:
    entries = [
        AuditRecord("alice@example.com", "auth.login.success", None, T0 + 1, ip="127.0.0.1"),
        AuditRecord(None, "auth.login.failure", "bob@example.com", T0 + 2, ip="10.0.0.9"),
        AuditRecord("alice@example.com", "channel.invite", "c1", T0 + 3, detail='{"n":2}'),
        AuditRecord("bob@example.com", "auth_login.weird", None, T0 + 4),
    ]
    for e in entries:
        await store.append_audit(e)

    listed = await store.list_audit()
    assert [e.action for e in listed] == [
        "auth_login.weird",
        "channel.invite",
        "auth.login.failure",
        "auth.login.success",
    ]  # newest first
    assert all(e.id is not None for e in listed)
    assert dataclasses.replace(listed[-1], id=None) == entries[0]

    assert [e.action for e in await store.list_audit(actor="alice@example.com")] == [
        "channel.invite",
        "auth.login.success",
    ]
    # a prefix is literal: "_" is not a wildcard, and case matters
    assert [e.target for e in await store.list_audit(action_prefix="auth.")] == [
        "bob@example.com",
        None,
    ]
    assert await store.list_audit(action_prefix="AUTH.") == []
    assert len(await store.list_audit(limit=1)) == 1

    assert await store.prune_audit(older_than=T0 + 3) == 2
    assert [e.at for e in await store.list_audit()] == [T0 + 4, T0 + 3]
    assert await store.prune_audit(older_than=T0 + 3) == 0
