"""A small in-memory stand-in for the SecureCollab REST API, served by hypercorn on loopback.

Only what the real server cannot be made to show on demand: access tokens that expire
when a test says so, a refresh-token family revoked behind the client's back, a 500,
and a record of the exact paths requested. Everything else is tested against the real
server (tests/client/test_rest_server.py, tests/e2e).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from quart import request
from quart_trio import QuartTrio

from securecollab.ids import now_ms

Reply = (
    tuple[dict[str, Any] | list[Any], int] | tuple[dict[str, Any] | list[Any], int, dict[str, str]]
)


class Fail(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status, self.error, self.detail = status, error, detail


class FakeApi:
    def __init__(self, *, access_ttl_s: int = 3600) -> None:
        self.access_ttl_s = access_ttl_s
        self.url = ""
        self.users: dict[str, dict[str, Any]] = {}
        self.access: dict[str, tuple[str, float]] = {}  # token -> (userId, expires at)
        self.refresh_tokens: dict[str, dict[str, Any]] = {}  # token -> {userId, family, used}
        self.revoked_families: set[str] = set()
        self.refresh_calls = 0
        self.rate_limit_next: float | None = (
            None  # answer the next request 429 with this Retry-After
        )
        self.seen_paths: list[str] = []
        self.app = self._build()

    # ------------------------------------------------------------ test hooks

    def expire_access_tokens(self) -> None:
        """As if every access token had expired server-side (clients get 401)."""
        self.access.clear()

    # ------------------------------------------------------------ helpers

    def _issue(self, user_id: str, family: str) -> dict[str, Any]:
        token, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        self.access[token] = (user_id, time.time() + self.access_ttl_s)
        self.refresh_tokens[refresh] = {"userId": user_id, "family": family, "used": False}
        return {
            "token": token,
            "expiresIn": self.access_ttl_s,
            "userId": user_id,
            "refreshToken": refresh,
        }

    def _user(self) -> str:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        entry = self.access.get(token)
        if entry is None or entry[1] < time.time():
            raise Fail(401, "unauthorized", "missing, invalid or expired token")
        return entry[0]

    async def _json(self) -> dict[str, Any]:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise Fail(400, "bad_request", "body must be a JSON object")
        return body

    # ------------------------------------------------------------ routes

    def _build(self) -> QuartTrio:
        app = QuartTrio("fake_api")

        @app.errorhandler(Fail)
        async def on_fail(e: Fail) -> Reply:
            return {"error": e.error, "detail": e.detail}, e.status

        @app.before_request
        async def rate_limit() -> Reply | None:
            # raw: as the client escaped it on the wire
            raw = request.scope.get("raw_path") or request.path.encode()
            self.seen_paths.append(raw.decode("latin-1") + "?" + request.query_string.decode())
            if self.rate_limit_next is not None:
                retry, self.rate_limit_next = self.rate_limit_next, None
                return (
                    {"error": "rate_limited", "detail": "too many requests"},
                    429,
                    {"Retry-After": str(int(retry))},
                )
            return None

        @app.post("/api/auth/register")
        async def register() -> Reply:
            body = await self._json()
            uid, pw = body.get("userId"), body.get("password")
            if not isinstance(uid, str) or "@" not in uid:
                raise Fail(422, "invalid_input", "userId must be an email-like id")
            if not isinstance(pw, str) or len(pw) < 10:
                raise Fail(422, "invalid_input", "password must be at least 10 characters")
            if uid in self.users:
                raise Fail(409, "conflict", "userId is taken")
            name = body.get("displayName") or uid.split("@")[0]
            self.users[uid] = {"password": pw, "displayName": name}
            return {"userId": uid, "displayName": name, "createdAt": now_ms()}, 201

        @app.post("/api/auth/login")
        async def login() -> Reply:
            body = await self._json()
            user = self.users.get(body.get("username", ""))
            if user is None or user["password"] != body.get("password"):
                raise Fail(401, "invalid_credentials", "wrong username or password")
            return self._issue(body["username"], secrets.token_hex(8)), 200

        @app.post("/api/auth/refresh")
        async def refresh() -> Reply:
            self.refresh_calls += 1
            body = await self._json()
            entry = self.refresh_tokens.get(body.get("token", ""))
            if entry is None or entry["family"] in self.revoked_families:
                raise Fail(401, "invalid_refresh_token", "refresh token is not valid")
            if entry["used"]:
                self.revoked_families.add(entry["family"])
                raise Fail(401, "refresh_token_reused", "refresh token reuse: session revoked")
            entry["used"] = True
            return self._issue(entry["userId"], entry["family"]), 200

        @app.post("/api/auth/logout")
        async def logout() -> Reply:
            user = self._user()
            body = await self._json()
            entry = self.refresh_tokens.get(body.get("refreshToken", ""))
            if entry is not None and entry["userId"] == user:
                self.revoked_families.add(entry["family"])
            return {"success": True}, 200

        @app.get("/api/users/me")
        async def me() -> Reply:
            user = self._user()
            return {
                "userId": user,
                "displayName": self.users[user]["displayName"],
                "roles": ["USER"],
            }, 200

        @app.get("/api/keys/<user_id>/<device_id>")
        async def get_key(user_id: str, device_id: str) -> Reply:
            self._user()
            raise Fail(404, "not_found", "no such device key")

        @app.get("/boom")
        async def boom() -> Reply:
            return {"error": "internal", "detail": "request id 1"}, 500

        return app
