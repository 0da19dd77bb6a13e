"""The REST client against a local fake of our API, for what the real server cannot show
on demand: an access token expiring mid-test, a revoked session, an injected 500.

Everything the real server can show is in test_rest_server.py (and tests/e2e).
"""

from __future__ import annotations

from typing import Any

import pytest

from securecollab.client.e2ee import DeviceKey, RecipientDevice, decrypt_text, encrypt_message
from securecollab.client.rest import (
    ApiError,
    AuthError,
    ForbiddenError,
    NotFoundError,
    RestClient,
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


async def test_path_parameters_are_escaped(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    with pytest.raises(NotFoundError):
        await c.get_key("a/b@example.com", "x")
    assert "/api/keys/a%2Fb@example.com/x" in api.seen_paths[-1]
    await c.aclose()
