"""A small in-memory stand-in for the SecureCollab REST API, served by hypercorn on loopback.

It speaks the shapes documented in issues 2 and 5 (routes, JSON fields, `{error,
detail}` errors, rotating refresh tokens with reuse detection, 429 + Retry-After) so
the SDK's REST client can be tested over real HTTP before the real routes exist.
Once they do, these tests move to the real server. Nobody has a live session here,
so every 1:1 message is also queued offline for its recipient.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from quart import request
from quart_trio import QuartTrio

from securecollab.ids import now_ms, uuid7

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
        self.device_keys: dict[tuple[str, str], dict[str, Any]] = {}
        self.messages: list[dict[str, Any]] = []
        self.offline: dict[str, list[str]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
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

    def _channel_for(self, user: str, channel_id: str) -> dict[str, Any]:
        ch = self.channels.get(channel_id)
        if ch is None or user not in ch["members"]:
            raise Fail(404, "not_found", "no such channel")
        return ch

    @staticmethod
    def _page(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        args = request.args
        limit = int(args.get("limit", "50"))
        if not 1 <= limit <= 200:
            raise Fail(422, "invalid_input", "limit must be 1..200")
        offset = int(args.get("offset", "0"))
        items = sorted(items, key=lambda m: m["id"], reverse=True)
        if "before" in args:
            items = [m for m in items if m["id"] < args["before"]]
        if "fromDate" in args:
            items = [m for m in items if m["createdAt"] >= int(args["fromDate"])]
        if "toDate" in args:
            items = [m for m in items if m["createdAt"] <= int(args["toDate"])]
        return items[offset : offset + limit]

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

        @app.post("/api/keys/register")
        async def register_key() -> Reply:
            user = self._user()
            body = await self._json()
            dev, pem = body.get("deviceId"), body.get("publicKey")
            if not isinstance(pem, str) or not pem.startswith("-----BEGIN PUBLIC KEY-----"):
                raise Fail(422, "invalid_input", "publicKey must be a PEM public key")
            if not isinstance(dev, str) or not dev or "/" in dev:
                raise Fail(422, "invalid_input", "deviceId is invalid")
            rec = {
                "bundleId": uuid7(),
                "userId": user,
                "deviceId": dev,
                "publicKey": pem,
                "registeredAt": now_ms(),
                "lastUsedAt": None,
            }
            self.device_keys[(user, dev)] = rec
            return {k: rec[k] for k in ("bundleId", "deviceId", "registeredAt")}, 201

        @app.get("/api/keys/<user_id>/<device_id>")
        async def get_key(user_id: str, device_id: str) -> Reply:
            self._user()
            rec = self.device_keys.get((user_id, device_id))
            if rec is None:
                raise Fail(404, "not_found", "no such device key")
            return {"publicKey": rec["publicKey"], "registeredAt": rec["registeredAt"]}, 200

        @app.get("/api/keys/<user_id>")
        async def list_keys(user_id: str) -> Reply:
            self._user()
            if user_id not in self.users:
                raise Fail(404, "not_found", "no such user")
            return [r for (u, _), r in sorted(self.device_keys.items()) if u == user_id], 200

        @app.delete("/api/keys/<device_id>")
        async def delete_key(device_id: str) -> Reply:
            user = self._user()
            if self.device_keys.pop((user, device_id), None) is None:
                raise Fail(404, "not_found", "no such device key")
            return {"success": True}, 200

        @app.post("/api/chat/send-message")
        async def send() -> Reply:
            user = self._user()
            body = await self._json()
            if "content" in body:
                raise Fail(422, "invalid_input", "plaintext is not accepted")
            to, channel_id = body.get("to"), body.get("channelId")
            if (to is None) == (channel_id is None):
                raise Fail(422, "invalid_input", "exactly one of to and channelId")
            if to is not None and to not in self.users:
                raise Fail(404, "not_found", "no such user")
            if channel_id is not None:
                self._channel_for(user, channel_id)
            cmid = body.get("clientMessageId")
            for m in self.messages:
                if cmid is not None and m["from"] == user and m["clientMessageId"] == cmid:
                    return {"id": m["id"], "status": "SENT", "createdAt": m["createdAt"]}, 200
            msg = {
                "id": uuid7(),
                "from": user,
                "to": to,
                "channelId": channel_id,
                "encryptedContent": body.get("encryptedContent"),
                "iv": body.get("iv"),
                "keys": body.get("keys") or {},
                "createdAt": now_ms(),
                "clientMessageId": cmid,
            }
            self.messages.append(msg)
            if to is not None:
                self.offline.setdefault(to, []).append(msg["id"])
            return {"id": msg["id"], "status": "SENT", "createdAt": msg["createdAt"]}, 200

        @app.get("/api/chat/messages")
        async def history() -> Reply:
            user = self._user()
            other = request.args.get("with", "")
            pair = {user, other}
            return self._page(
                [m for m in self.messages if m["to"] is not None and {m["from"], m["to"]} == pair]
            ), 200

        @app.get("/api/chat/offline-messages")
        async def offline() -> Reply:
            user = self._user()
            by_id = {m["id"]: m for m in self.messages}
            return [by_id[i] for i in self.offline.get(user, [])], 200

        @app.post("/api/chat/offline-messages/ack")
        async def ack() -> Reply:
            user = self._user()
            ids = (await self._json()).get("ids")
            if not isinstance(ids, list):
                raise Fail(422, "invalid_input", "ids must be a list of message ids")
            queue = self.offline.get(user, [])
            before = len(queue)
            self.offline[user] = [i for i in queue if i not in ids]
            return {"acked": before - len(self.offline[user])}, 200

        @app.post("/api/channels/create")
        async def create_channel() -> Reply:
            user = self._user()
            body = await self._json()
            if not isinstance(body.get("name"), str) or not body["name"]:
                raise Fail(422, "invalid_input", "name is required")
            ch = {
                "id": uuid7(),
                "name": body["name"],
                "description": body.get("description") or "",
                "ownerId": user,
                "settings": body.get("settings") or {"encryption": "E2EE"},
                "members": [user],
                "createdAt": now_ms(),
            }
            self.channels[ch["id"]] = ch
            return ch, 201

        @app.post("/api/channels/<channel_id>/invite")
        async def invite(channel_id: str) -> Reply:
            user = self._user()
            ch = self._channel_for(user, channel_id)
            if ch["ownerId"] != user:
                raise Fail(403, "forbidden", "only the owner or an admin may invite")
            ids = (await self._json()).get("userIds") or []
            unknown = [u for u in ids if u not in self.users]
            if unknown:
                raise Fail(422, "unknown_users", "unknown users: " + ", ".join(unknown))
            new = [u for u in ids if u not in ch["members"]]
            ch["members"].extend(new)
            return {"success": True, "invitedCount": len(new)}, 200

        @app.post("/api/channels/<channel_id>/leave")
        async def leave(channel_id: str) -> Reply:
            user = self._user()
            self._channel_for(user, channel_id)["members"].remove(user)
            return {"success": True}, 200

        @app.delete("/api/channels/<channel_id>/members/<user_id>")
        async def remove(channel_id: str, user_id: str) -> Reply:
            user = self._user()
            ch = self._channel_for(user, channel_id)
            if ch["ownerId"] != user:
                raise Fail(403, "forbidden", "only the owner may remove members")
            if user_id not in ch["members"]:
                raise Fail(404, "not_found", "not a member")
            ch["members"].remove(user_id)
            return {"success": True}, 200

        @app.get("/api/channels")
        async def my_channels() -> Reply:
            user = self._user()
            return [c for c in self.channels.values() if user in c["members"]], 200

        @app.get("/api/channels/<channel_id>")
        async def get_channel(channel_id: str) -> Reply:
            return self._channel_for(self._user(), channel_id), 200

        @app.get("/api/channels/<channel_id>/messages")
        async def channel_history(channel_id: str) -> Reply:
            self._channel_for(self._user(), channel_id)
            return self._page([m for m in self.messages if m["channelId"] == channel_id]), 200

        @app.get("/api/presence")
        async def presence() -> Reply:
            self._user()
            ids = [u for u in request.args.get("userIds", "").split(",") if u]
            if not ids:
                raise Fail(422, "missing_user_ids", "userIds is required")
            users = [
                {"userId": u, "status": "OFFLINE", "lastSeen": None, "devices": []}
                for u in ids
                if u in self.users
            ]
            return {"users": users, "hidden": [u for u in ids if u not in self.users]}, 200

        @app.get("/boom")
        async def boom() -> Reply:
            return {"error": "internal", "detail": "request id 1"}, 500

        return app
