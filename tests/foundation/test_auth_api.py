"""Identity over REST against a real server: register, login, refresh, logout, bad tokens."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import jwt
import pytest

from securecollab.ids import now_ms
from tests.support.server import PASSWORD, bearer, register_and_login, running_server

SECRET = "test-secret-" + "x" * 60


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(user: str, **extra: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": user,
        "username": user,
        "roles": ["ROLE_USER"],
        "iat": now,
        "exp": now + 3600,
        "jti": "j1",
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def _assert_401(r: httpx.Response, code: str = "invalid_token") -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["error"] == code
    assert body["detail"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_register_login_me_refresh_logout(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.post(
            "/api/auth/register",
            json={"userId": "alice@example.com", "password": PASSWORD, "displayName": "Alice"},
        )
        assert r.status_code == 201
        reg = r.json()
        assert reg["userId"] == "alice@example.com" and reg["displayName"] == "Alice"
        assert abs(reg["createdAt"] - now_ms()) < 60_000

        r = await c.post(
            "/api/auth/login", json={"username": "alice@example.com", "password": PASSWORD}
        )
        assert r.status_code == 200
        login = r.json()
        assert set(login) == {"token", "expiresIn", "userId", "refreshToken"}
        assert login["expiresIn"] == 3600 and login["userId"] == "alice@example.com"
        header = jwt.get_unverified_header(login["token"])
        assert header["alg"] == "HS512"
        claims = jwt.decode(login["token"], options={"verify_signature": False})
        assert {"sub", "username", "roles", "iat", "exp", "jti"} <= set(claims)
        assert claims["exp"] - claims["iat"] == 3600

        r = await c.get("/api/users/me", headers=bearer(login["token"]))
        assert r.status_code == 200
        me = r.json()
        assert me == {
            "userId": "alice@example.com",
            "displayName": "Alice",
            "roles": ["ROLE_USER"],
            "createdAt": reg["createdAt"],
        }

        r = await c.post("/api/auth/refresh", json={"token": login["refreshToken"]})
        assert r.status_code == 200
        pair = r.json()
        assert pair["refreshToken"] != login["refreshToken"] and pair["expiresIn"] == 3600
        assert (await c.get("/api/users/me", headers=bearer(pair["token"]))).status_code == 200

        other = (
            await c.post(
                "/api/auth/login", json={"username": "alice@example.com", "password": PASSWORD}
            )
        ).json()
        r = await c.post("/api/auth/logout", json={}, headers=bearer(pair["token"]))
        assert r.status_code == 200 and r.json() == {"success": True}
        # the session is gone: its refresh token no longer works, nor its access
        # tokens (the one used to log out, and the one before the refresh), at once
        _assert_401(await c.post("/api/auth/refresh", json={"token": pair["refreshToken"]}))
        _assert_401(await c.get("/api/users/me", headers=bearer(pair["token"])), "token_revoked")
        _assert_401(await c.get("/api/users/me", headers=bearer(login["token"])), "token_revoked")
        # another session (another login) of the same user is unaffected
        assert (await c.get("/api/users/me", headers=bearer(other["token"]))).status_code == 200

        actions = [a.action for a in await srv.ctx.audit.list(actor="alice@example.com")]
        assert {"auth.register", "auth.login.success", "auth.logout"} <= set(actions)


async def test_login_is_case_insensitive_and_duplicate_registration_conflicts(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        await register_and_login(c, "Bob@Example.com")
        r = await c.post(
            "/api/auth/login", json={"username": "bob@example.com", "password": PASSWORD}
        )
        assert r.status_code == 200 and r.json()["userId"] == "Bob@Example.com"
        r = await c.post(
            "/api/auth/register", json={"userId": "bob@EXAMPLE.com", "password": PASSWORD}
        )
        assert r.status_code == 409 and r.json()["error"] == "user_exists"


async def test_refresh_rotation_and_reuse_revokes_family(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        login = await register_and_login(c, "carol@example.com")
        other = (
            await c.post(
                "/api/auth/login", json={"username": "carol@example.com", "password": PASSWORD}
            )
        ).json()
        r1 = login["refreshToken"]
        second = (await c.post("/api/auth/refresh", json={"token": r1})).json()
        r2 = second["refreshToken"]
        # r1 was rotated: presenting it again is theft -> the whole family dies
        r = await c.post("/api/auth/refresh", json={"token": r1})
        _assert_401(r, "token_reused")
        _assert_401(await c.post("/api/auth/refresh", json={"token": r2}))
        # another session (another login) of the same user is unaffected
        assert (
            await c.post("/api/auth/refresh", json={"token": other["refreshToken"]})
        ).status_code == 200
        reuse = await srv.ctx.audit.list(action_prefix="auth.refresh.reuse")
        assert len(reuse) == 1 and reuse[0].actor == "carol@example.com"


async def test_refresh_with_unknown_token_is_401(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        _assert_401(await c.post("/api/auth/refresh", json={"token": "nope"}))


async def test_logout_with_explicit_refresh_token(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        a = await register_and_login(c, "dan@example.com")
        b = await register_and_login(c, "erin@example.com")
        # someone else's refresh token is refused and stays valid
        r = await c.post(
            "/api/auth/logout", json={"refreshToken": b["refreshToken"]}, headers=bearer(a["token"])
        )
        assert r.status_code == 422 and r.json()["error"] == "invalid_refresh_token"
        r = await c.post(
            "/api/auth/logout", json={"refreshToken": a["refreshToken"]}, headers=bearer(a["token"])
        )
        assert r.status_code == 200
        _assert_401(await c.post("/api/auth/refresh", json={"token": a["refreshToken"]}))
        assert (
            await c.post("/api/auth/refresh", json={"token": b["refreshToken"]})
        ).status_code == 200


def _bad_tokens(user: str) -> dict[str, tuple[str, str]]:
    """name -> (token, expected error code)."""
    now = int(time.time())
    none_token = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims(user)) + "."
    return {
        "alg_none": (none_token, "invalid_token"),
        "hs256_same_secret": (
            jwt.encode(_claims(user), SECRET, algorithm="HS256"),
            "invalid_token",
        ),
        "expired": (
            jwt.encode(_claims(user, iat=now - 7200, exp=now - 3600), SECRET, algorithm="HS512"),
            "token_expired",
        ),
        "nbf_future": (
            jwt.encode(_claims(user, nbf=now + 3600), SECRET, algorithm="HS512"),
            "invalid_token",
        ),
        "bad_signature": (
            jwt.encode(_claims(user), "another-secret-" + "y" * 60, algorithm="HS512"),
            "invalid_token",
        ),
        "missing_claims": (
            jwt.encode(_claims(user, username=None, roles=None), SECRET, algorithm="HS512"),
            "invalid_token",
        ),
        "unknown_user": (
            jwt.encode(_claims("ghost@example.com"), SECRET, algorithm="HS512"),
            "invalid_token",
        ),
        "garbage": ("not-a-jwt", "invalid_token"),
        "three_garbage_parts": ("a.b.c", "invalid_token"),
    }


@pytest.mark.parametrize("case", list(_bad_tokens("x@example.com")))
async def test_bad_access_tokens_get_401(tmp_path: Path, case: str) -> None:
    async with running_server(tmp_path, server__jwt_secret=SECRET) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            await register_and_login(c, "frank@example.com")
            # a correctly made token for the same user works: the failure below is the case's
            good = jwt.encode(_claims("frank@example.com"), SECRET, algorithm="HS512")
            assert (await c.get("/api/users/me", headers=bearer(good))).status_code == 200
            token, code = _bad_tokens("frank@example.com")[case]
            _assert_401(await c.get("/api/users/me", headers=bearer(token)), code)


async def test_deleted_user_token_gets_401(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        login = await register_and_login(c, "gina@example.com")
        assert (await c.get("/api/users/me", headers=bearer(login["token"]))).status_code == 200
        await srv.ctx.store.set_user_deleted("gina@example.com", now_ms())
        _assert_401(await c.get("/api/users/me", headers=bearer(login["token"])))
        _assert_401(await c.post("/api/auth/refresh", json={"token": login["refreshToken"]}))
        r = await c.post(
            "/api/auth/login", json={"username": "gina@example.com", "password": PASSWORD}
        )
        _assert_401(r, "invalid_credentials")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"Authorization": "Bearer"},
        {"Authorization": "token"},
    ],
    ids=["none", "basic", "empty_bearer", "no_scheme"],
)
async def test_missing_bearer_is_401(tmp_path: Path, headers: dict[str, str]) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        for method, path in [("GET", "/api/users/me"), ("POST", "/api/auth/logout")]:
            r = await c.request(method, path, headers=headers, json={})
            _assert_401(r, "unauthorized")


async def test_password_policy_and_user_id_format(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.post(
            "/api/auth/register", json={"userId": "h@example.com", "password": "short9chr"}
        )
        assert r.status_code == 422
        assert r.json() == {
            "error": "weak_password",
            "detail": "password must have at least 10 characters",
        }
        r = await c.post(
            "/api/auth/register", json={"userId": "h@example.com", "password": " " * 12}
        )
        assert r.status_code == 422 and r.json()["error"] == "weak_password"
        r = await c.post(
            "/api/auth/register", json={"userId": "not an email", "password": PASSWORD}
        )
        assert r.status_code == 422 and r.json()["error"] == "invalid_user_id"
        # exactly the minimum length is accepted
        r = await c.post(
            "/api/auth/register", json={"userId": "h@example.com", "password": "0123456789"}
        )
        assert r.status_code == 201


async def test_registration_disabled(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth__registration_enabled=False) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            r = await c.post(
                "/api/auth/register", json={"userId": "i@example.com", "password": PASSWORD}
            )
            assert r.status_code == 403 and r.json()["error"] == "registration_disabled"


async def test_login_failures_do_not_reveal_whether_the_user_exists(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        await register_and_login(c, "jay@example.com")
        wrong = await c.post(
            "/api/auth/login", json={"username": "jay@example.com", "password": "x" * 12}
        )
        ghost = await c.post(
            "/api/auth/login", json={"username": "nobody@example.com", "password": "x" * 12}
        )
        assert wrong.status_code == ghost.status_code == 401
        assert (
            wrong.json()
            == ghost.json()
            == {
                "error": "invalid_credentials",
                "detail": "invalid username or password",
            }
        )
        failures = await srv.ctx.audit.list(action_prefix="auth.login.failure")
        assert {f.target for f in failures} == {"jay@example.com", "nobody@example.com"}


async def test_login_throttled_per_username(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth__login_limit_per_user_per_min=3) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            await c.post(
                "/api/auth/register", json={"userId": "kim@example.com", "password": PASSWORD}
            )
            for _ in range(3):
                r = await c.post(
                    "/api/auth/login", json={"username": "kim@example.com", "password": "x" * 12}
                )
                assert r.status_code == 401
            # the 4th attempt is refused before the password is even checked, correct or not
            r = await c.post(
                "/api/auth/login", json={"username": "KIM@example.com", "password": PASSWORD}
            )
            assert r.status_code == 429
            assert r.json()["error"] == "login_throttled"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            # other users are not affected
            r = await c.post(
                "/api/auth/login", json={"username": "lee@example.com", "password": "x" * 12}
            )
            assert r.status_code == 401


async def test_login_throttled_per_ip(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth__login_limit_per_ip_per_min=4) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            for i in range(4):
                r = await c.post(
                    "/api/auth/login", json={"username": f"u{i}@example.com", "password": "x" * 12}
                )
                assert r.status_code == 401
            r = await c.post(
                "/api/auth/login", json={"username": "u9@example.com", "password": "x" * 12}
            )
            assert r.status_code == 429 and r.json()["error"] == "login_throttled"
            assert int(r.headers["Retry-After"]) >= 1


async def test_registration_throttled_per_ip(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth__login_limit_per_ip_per_min=2) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            for i in range(2):
                r = await c.post(
                    "/api/auth/register", json={"userId": f"r{i}@example.com", "password": PASSWORD}
                )
                assert r.status_code == 201
            r = await c.post(
                "/api/auth/register", json={"userId": "r9@example.com", "password": PASSWORD}
            )
            assert r.status_code == 429 and r.json()["error"] == "registration_throttled"
            assert int(r.headers["Retry-After"]) >= 1
            # logins have their own budget
            r = await c.post(
                "/api/auth/login", json={"username": "r0@example.com", "password": PASSWORD}
            )
            assert r.status_code == 200
