"""The REST client against a local HTTP server speaking our API's documented shapes."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from securecollab.client.e2ee import DeviceKey, RecipientDevice, decrypt_text, encrypt_message
from securecollab.client.rest import (
    ApiError,
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimited,
    RestClient,
    ServerUnavailable,
    Session,
)

from .fake_api import FakeApi

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
PASSWORD = "correct horse battery"


async def logged_in(api: FakeApi, user: str, **kw: Any) -> RestClient:
    c = RestClient(api.url, **kw)
    if user not in api.users:
        await c.register(user, PASSWORD)
    await c.login(user, PASSWORD)
    return c


async def test_register_login_me(api: FakeApi) -> None:
    async with RestClient(api.url) as c:
        user = await c.register(ALICE, PASSWORD, display_name="Alice")
        assert (user.user_id, user.display_name) == (ALICE, "Alice")
        session = await c.login(ALICE, PASSWORD)
        assert session.user_id == ALICE and session.token and session.refresh_token
        me = await c.me()
        assert me.user_id == ALICE and me.roles == ("USER",)


async def test_bad_password_and_no_session_are_auth_errors(api: FakeApi) -> None:
    async with RestClient(api.url) as c:
        await c.register(ALICE, PASSWORD)
        with pytest.raises(AuthError) as info:
            await c.login(ALICE, "wrong password!")
        assert (info.value.status, info.value.error) == (401, "invalid_credentials")
        with pytest.raises(AuthError, match="log in first"):
            await c.me()


async def test_validation_error_carries_server_error_and_detail(api: FakeApi) -> None:
    async with RestClient(api.url) as c:
        with pytest.raises(ApiError) as info:
            await c.register(ALICE, "short")
        assert info.value.status == 422
        assert info.value.error == "invalid_input"
        assert "at least 10" in info.value.detail


async def test_refreshes_before_expiry_and_reports_new_session(api: FakeApi) -> None:
    now = [1_000_000.0]
    seen: list[Session | None] = []
    c = await logged_in(api, ALICE, clock=lambda: now[0], on_session=seen.append)
    first = c.session
    assert first is not None and seen == [first]
    await c.me()
    assert api.refresh_calls == 0
    now[0] += 3600 - 59  # less than a minute left: refresh first
    await c.me()
    assert api.refresh_calls == 1
    assert c.session is not None and c.session.token != first.token
    assert c.session.refresh_token != first.refresh_token
    assert seen[-1] == c.session
    await c.aclose()


async def test_concurrent_calls_refresh_once(api: FakeApi) -> None:
    """Rotating refresh tokens: two refreshes with one token would revoke the session."""
    now = [1_000_000.0]
    c = await logged_in(api, ALICE, clock=lambda: now[0])
    now[0] += 3590
    results: list[str] = []

    async def call() -> None:
        results.append((await c.me()).user_id)

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(call)
    assert results == [ALICE] * 8
    assert api.refresh_calls == 1
    assert not api.revoked_families
    await c.aclose()


async def test_401_triggers_one_refresh_and_retry(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    api.expire_access_tokens()
    assert (await c.me()).user_id == ALICE
    assert api.refresh_calls == 1
    await c.aclose()


async def test_revoked_session_asks_to_log_in_again(api: FakeApi) -> None:
    seen: list[Session | None] = []
    c = await logged_in(api, ALICE, on_session=seen.append)
    assert c.session is not None
    api.revoked_families.add(api.refresh_tokens[c.session.refresh_token]["family"])
    api.expire_access_tokens()
    with pytest.raises(AuthError, match="log in again"):
        await c.me()
    assert c.session is None and seen[-1] is None
    await c.aclose()


async def test_saved_session_resumes(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    assert c.session is not None
    saved = c.session.to_json()
    await c.aclose()
    async with RestClient(api.url, session=Session.from_json(saved)) as again:
        assert (await again.me()).user_id == ALICE


async def test_logout_revokes_the_refresh_family(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    assert c.session is not None
    refresh_token = c.session.refresh_token
    await c.logout()
    assert c.session is None
    assert api.refresh_tokens[refresh_token]["family"] in api.revoked_families
    with pytest.raises(AuthError):
        await c.me()
    await c.aclose()


async def test_rate_limited_has_retry_after(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    api.rate_limit_next = 7
    with pytest.raises(RateLimited) as info:
        await c.me()
    assert info.value.retry_after == 7.0 and info.value.status == 429
    assert (await c.me()).user_id == ALICE  # next call goes through
    await c.aclose()


async def test_server_down_is_server_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with RestClient(f"http://127.0.0.1:{port}", timeout=2) as c:
        with pytest.raises(ServerUnavailable, match="cannot connect"):
            await c.login(ALICE, PASSWORD)


async def test_server_error_is_api_error_not_httpx(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    with pytest.raises(ApiError) as info:
        await c._authed("GET", "/boom")
    assert (info.value.status, info.value.error) == (500, "internal")
    with pytest.raises(NotFoundError) as nf:
        await c._authed("GET", "/api/no-such-route")
    assert nf.value.status == 404
    await c.aclose()


async def test_device_keys_register_get_list_delete(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    laptop, phone = DeviceKey.generate(ALICE, "laptop"), DeviceKey.generate(ALICE, "phone")
    reg = await c.register_key("laptop", laptop.public_pem())
    assert reg.device_id == "laptop" and reg.bundle_id and reg.registered_at > 0
    await c.register_key("phone", phone.public_pem())
    one = await c.get_key(ALICE, "laptop")
    assert (one.user_id, one.device_id, one.public_key) == (ALICE, "laptop", laptop.public_pem())
    listed = await c.list_keys(ALICE)
    assert sorted(k.device_id for k in listed) == ["laptop", "phone"]
    await c.delete_key("phone")
    assert [k.device_id for k in await c.list_keys(ALICE)] == ["laptop"]
    with pytest.raises(NotFoundError):
        await c.get_key(ALICE, "phone")
    with pytest.raises(NotFoundError):
        await c.list_keys("nobody@example.com")
    await c.aclose()


async def directory(c: RestClient, *users: str) -> list[RecipientDevice]:
    """Every registered device of `users`, from the key directory."""
    out = []
    for u in users:
        for k in await c.list_keys(u):
            out.append(RecipientDevice.from_pem(k.user_id, k.device_id, k.public_key))
    return out


async def test_encrypted_conversation_through_rest(api: FakeApi) -> None:
    """alice (2 devices) writes to bob (2 devices): every device reads it; the server can't."""
    alice, bob = await logged_in(api, ALICE), await logged_in(api, BOB)
    devices = {
        (ALICE, "laptop"): DeviceKey.generate(ALICE, "laptop"),
        (ALICE, "phone"): DeviceKey.generate(ALICE, "phone"),
        (BOB, "laptop"): DeviceKey.generate(BOB, "laptop"),
        (BOB, "phone"): DeviceKey.generate(BOB, "phone"),
    }
    for (user, dev), key in devices.items():
        await (alice if user == ALICE else bob).register_key(dev, key.public_pem())

    env = encrypt_message(
        "meet at the usual place",
        sender=ALICE,
        to=BOB,
        devices=await directory(alice, ALICE, BOB),
    )
    sent = await alice.send_message(env)
    assert sent.status == "SENT"
    again = await alice.send_message(env)  # a retry with the same clientMessageId
    assert again.id == sent.id
    assert "usual place" not in repr(api.messages)

    history = await bob.messages(ALICE)
    assert [m.id for m in history] == [sent.id]
    for key in devices.values():
        assert decrypt_text(history[0].raw, key) == "meet at the usual place"

    queued = await bob.offline_messages()
    assert [m.id for m in queued] == [sent.id]
    assert await bob.ack_offline([sent.id]) == 1
    assert await bob.offline_messages() == []
    await alice.aclose()
    await bob.aclose()


async def test_history_paging(api: FakeApi) -> None:
    alice, bob = await logged_in(api, ALICE), await logged_in(api, BOB)
    key = DeviceKey.generate(BOB, "laptop")
    ids = []
    for i in range(5):
        env = encrypt_message(f"m{i}", sender=ALICE, to=BOB, devices=[key.recipient()])
        ids.append((await alice.send_message(env)).id)
    newest_first = ids[::-1]
    page1 = await bob.messages(ALICE, limit=2)
    assert [m.id for m in page1] == newest_first[:2]
    page2 = await bob.messages(ALICE, limit=2, before=page1[-1].id)
    assert [m.id for m in page2] == newest_first[2:4]
    by_offset = await bob.messages(ALICE, limit=2, offset=4)
    assert [m.id for m in by_offset] == newest_first[4:]
    assert "limit=2" in api.seen_paths[-1] and "offset=4" in api.seen_paths[-1]
    with pytest.raises(ApiError) as info:
        await bob.messages(ALICE, limit=500)
    assert info.value.status == 422
    await alice.aclose()
    await bob.aclose()


async def test_channels(api: FakeApi) -> None:
    alice, bob, carol = [await logged_in(api, u) for u in (ALICE, BOB, CAROL)]
    ch = await alice.create_channel("engineering", description="builds")
    assert (ch.name, ch.owner_id, ch.members) == ("engineering", ALICE, (ALICE,))
    assert ch.settings == {"encryption": "E2EE"}
    assert await alice.invite(ch.id, [BOB, CAROL]) == 2
    assert await alice.invite(ch.id, [BOB]) == 0  # already a member: not counted
    with pytest.raises(ApiError) as unknown:
        await alice.invite(ch.id, ["ghost@example.com"])
    assert unknown.value.status == 422 and "ghost@example.com" in unknown.value.detail
    with pytest.raises(ForbiddenError):
        await bob.invite(ch.id, [ALICE])
    assert [c.id for c in await bob.channels()] == [ch.id]
    assert set((await carol.channel(ch.id)).members) == {ALICE, BOB, CAROL}

    members = [DeviceKey.generate(u, "laptop") for u in (ALICE, BOB, CAROL)]
    env = encrypt_message(
        "channel hello", sender=BOB, channel_id=ch.id, devices=[m.recipient() for m in members]
    )
    await bob.send_message(env)
    got = await carol.channel_messages(ch.id, limit=10)
    assert [decrypt_text(m.raw, members[2]) for m in got] == ["channel hello"]

    await carol.leave_channel(ch.id)
    with pytest.raises(NotFoundError):
        await carol.channel(ch.id)
    await alice.remove_member(ch.id, BOB)
    with pytest.raises(NotFoundError):
        await bob.channel_messages(ch.id)
    for c in (alice, bob, carol):
        await c.aclose()


async def test_presence(api: FakeApi) -> None:
    alice = await logged_in(api, ALICE)
    await logged_in(api, BOB)
    found = await alice.presence([BOB, "nobody@example.com"])
    p = found.get(BOB)
    assert p is not None and (p.user_id, p.status) == (BOB, "OFFLINE")
    assert found.hidden == ("nobody@example.com",)
    await alice.aclose()


async def test_path_parameters_are_escaped(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    with pytest.raises(NotFoundError):
        await c.get_key("a/b@example.com", "x")
    assert "/api/keys/a%2Fb@example.com/x" in api.seen_paths[-1]
    await c.aclose()
