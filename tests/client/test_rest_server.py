"""The REST client against the real server (in-process, loopback): the auth half.

Behaviours the real server cannot be made to show on demand (an expired access token
within a test's time, an injected 500) stay in test_rest.py against the fake API.
"""

from __future__ import annotations

from pathlib import Path

import httpx
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
from tests.support.server import PASSWORD, ServerHandle, free_port, running_server

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
LIMITS = {"http__rate_limit_user_per_min": 10_000}


async def logged_in(srv: ServerHandle, user: str) -> RestClient:
    c = RestClient(srv.base_url)
    await c.register(user, PASSWORD)
    await c.login(user, PASSWORD)
    return c


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


async def test_device_keys_register_get_list_delete(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LIMITS) as srv:
        c = await logged_in(srv, ALICE)
        laptop, phone = DeviceKey.generate(ALICE, "laptop"), DeviceKey.generate(ALICE, "phone")
        reg = await c.register_key("laptop", laptop.public_pem())
        assert reg.device_id == "laptop" and reg.bundle_id and reg.registered_at > 0
        await c.register_key("phone", phone.public_pem())
        one = await c.get_key(ALICE, "laptop")
        assert (one.user_id, one.device_id, one.public_key) == (
            ALICE,
            "laptop",
            laptop.public_pem(),
        )
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


async def test_encrypted_conversation_through_rest(tmp_path: Path) -> None:
    """alice (2 devices) writes to bob (2 devices): every device reads it; the server can't."""
    async with running_server(tmp_path, **LIMITS) as srv:
        alice, bob = await logged_in(srv, ALICE), await logged_in(srv, BOB)
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
        db = Path(srv.settings.store.url.removeprefix("sqlite:///"))
        stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert b"usual place" not in stored and env["encryptedContent"].encode() in stored

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


async def test_history_paging(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LIMITS) as srv:
        alice, bob = await logged_in(srv, ALICE), await logged_in(srv, BOB)
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
        with pytest.raises(ApiError) as info:
            await bob.messages(ALICE, limit=500)
        assert info.value.status == 422
        await alice.aclose()
        await bob.aclose()


async def test_channels(tmp_path: Path) -> None:
    async with running_server(tmp_path, **LIMITS) as srv:
        alice, bob, carol = [await logged_in(srv, u) for u in (ALICE, BOB, CAROL)]
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
