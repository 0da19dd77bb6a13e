"""The REST client against a local fake of our API, for what the real server cannot show
on demand: an access token expiring mid-test, a revoked session, an injected 500, and
what exactly goes on the wire (escaped path parameters).

Everything the real server can show is in test_rest_server.py (and tests/e2e).
"""

from __future__ import annotations

from typing import Any

import pytest

from securecollab.client.rest import (
    ApiError,
    AuthError,
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


async def test_path_parameters_are_escaped(api: FakeApi) -> None:
    c = await logged_in(api, ALICE)
    with pytest.raises(NotFoundError):
        await c.get_key("a/b@example.com", "x")
    assert "/api/keys/a%2Fb@example.com/x" in api.seen_paths[-1]
    await c.aclose()
