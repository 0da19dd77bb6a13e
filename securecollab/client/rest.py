"""Async (trio) client for the SecureCollab REST API.

One `RestClient` per server and user. It logs in, keeps the access token fresh
(refreshes it `REFRESH_MARGIN_S` seconds before it expires, and once more on a 401),
and turns every route into a typed method. Failures surface as the `ClientError`
family below, never as raw httpx exceptions:

- `ServerUnavailable`: no connection, timeout, or a 502/503/504;
- `ApiError(status, error, detail)`: any other 4xx/5xx; subclasses `AuthError` (401),
  `ForbiddenError` (403), `NotFoundError` (404), `RateLimited` (429, `retry_after` s).

Refresh tokens rotate and reusing a rotated one revokes the whole session, so a
client serializes refreshes (one at a time, and none if another task just did one),
and hands every new `Session` to `on_session` for the caller to persist.

Routes (issues 2 and 5): /api/auth/{register,login,refresh,logout}, /api/users/me,
/api/keys/..., /api/chat/..., /api/channels/..., /api/presence.
Message bodies are E2EE envelopes built by `securecollab.client.e2ee`; this module
never sees plaintext.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import trio

USER_AGENT = "securecollab-sdk/0.1"
ME_PATH = "/api/users/me"  # who am I: {userId, displayName, roles, createdAt}
PRESENCE_PATH = (
    "/api/presence"  # ?userIds=a,b -> {users: [{userId, status, devices, lastSeen}], hidden}
)
REFRESH_MARGIN_S = 60.0


# ---------------------------------------------------------------- errors


class ClientError(Exception):
    """Base of every error this SDK raises for a failed call."""


class ServerUnavailable(ClientError):
    """The server could not be reached or answered 502/503/504; retrying later may help."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiError(ClientError):
    """The server refused a request: HTTP `status` with its JSON `error` code and `detail`."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class AuthError(ApiError):
    """401: bad credentials, or the session expired or was revoked (log in again)."""


class ForbiddenError(ApiError):
    """403: authenticated, but not allowed (e.g. not a member of the channel)."""


class NotFoundError(ApiError):
    """404: no such user, device, channel or message (or not visible to you)."""


class RateLimited(ApiError):
    """429: too many requests; `retry_after` is the server's Retry-After in seconds, if any."""

    def __init__(self, status: int, error: str, detail: str, retry_after: float | None) -> None:
        super().__init__(status, error, detail)
        self.retry_after = retry_after


def _bad_response(status: int, what: str) -> ApiError:
    return ApiError(status, "bad_response", f"unexpected response from server: {what}")


# ---------------------------------------------------------------- typed results


def _req(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], status: int = 200) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad_response(status, f"field {key!r} missing or of the wrong type")
    return value


def _opt(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = d.get(key)
    return value if isinstance(value, kind) else None


def _obj(body: Any, status: int = 200) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise _bad_response(status, "expected a JSON object")
    return body


def _items(body: Any, key: str, status: int = 200) -> list[Mapping[str, Any]]:
    """A JSON list of objects, either bare or under `key` in an object."""
    if isinstance(body, Mapping):
        body = body.get(key)
    if not isinstance(body, list) or not all(isinstance(x, Mapping) for x in body):
        raise _bad_response(status, f"expected a list of {key}")
    return body


@dataclass
class Session:
    """A logged-in session: tokens and when the access token expires (Unix seconds)."""

    user_id: str
    token: str
    refresh_token: str
    expires_at: float
    device_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "token": self.token,
            "refreshToken": self.refresh_token,
            "expiresAt": self.expires_at,
            "deviceId": self.device_id,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Session:
        """Inverse of `to_json` (e.g. a session file written by the CLI)."""
        try:
            return cls(
                str(d["userId"]),
                str(d["token"]),
                str(d["refreshToken"]),
                float(d["expiresAt"]),
                d.get("deviceId"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a saved session: {exc}") from None


@dataclass(frozen=True)
class User:
    user_id: str
    display_name: str | None = None
    roles: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> User:
        roles = d.get("roles")
        return cls(
            _req(d, "userId", str),
            _opt(d, "displayName", str),
            tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
        )


@dataclass(frozen=True)
class KeyRegistration:
    bundle_id: str
    device_id: str
    registered_at: int  # ms epoch

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyRegistration:
        return cls(
            str(_req(d, "bundleId", (str, int))),
            _req(d, "deviceId", str),
            _req(d, "registeredAt", int),
        )


@dataclass(frozen=True)
class DeviceKeyInfo:
    """A device's public key from the key directory."""

    user_id: str
    device_id: str
    public_key: str  # PEM
    registered_at: int  # ms epoch
    last_used_at: int | None = None

    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], user_id: str, device_id: str | None = None
    ) -> DeviceKeyInfo:
        """`user_id`/`device_id` fill in what the route implies (GET .../{userId}/{deviceId})."""
        device = _opt(d, "deviceId", str) or device_id
        if device is None:
            raise _bad_response(200, "device key without deviceId")
        return cls(
            _opt(d, "userId", str) or user_id,
            device,
            _req(d, "publicKey", str),
            _req(d, "registeredAt", int),
            _opt(d, "lastUsedAt", int),
        )


@dataclass(frozen=True)
class SendResult:
    id: str
    status: str
    created_at: int  # ms epoch

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SendResult:
        return cls(_req(d, "id", str), _req(d, "status", str), _req(d, "createdAt", int))


@dataclass(frozen=True)
class Message:
    """A stored message as the server returns it; `raw` is the envelope to decrypt."""

    id: str
    sender: str
    to: str | None
    channel_id: str | None
    created_at: int  # ms epoch
    client_message_id: str | None
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Message:
        _req(d, "encryptedContent", str)
        _req(d, "iv", str)
        return cls(
            _req(d, "id", str),
            _req(d, "from", str),
            _opt(d, "to", str),
            _opt(d, "channelId", str),
            _req(d, "createdAt", int),
            _opt(d, "clientMessageId", str),
            dict(d),
        )


@dataclass(frozen=True)
class Channel:
    id: str
    name: str
    owner_id: str
    members: tuple[str, ...]
    created_at: int
    description: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Channel:
        members = _req(d, "members", list)
        settings = d.get("settings")
        return cls(
            _req(d, "id", str),
            _req(d, "name", str),
            _req(d, "ownerId", str),
            tuple(m for m in members if isinstance(m, str)),
            _req(d, "createdAt", int),
            _opt(d, "description", str),
            dict(settings) if isinstance(settings, Mapping) else {},
        )


@dataclass(frozen=True)
class Presence:
    user_id: str
    status: str  # ONLINE | AWAY | OFFLINE
    last_seen: int | None  # ms epoch
    devices: tuple[str, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Presence:
        devices = d.get("devices")
        return cls(
            _req(d, "userId", str),
            _req(d, "status", str),
            _opt(d, "lastSeen", int),
            tuple(x for x in devices if isinstance(x, str)) if isinstance(devices, list) else (),
        )


@dataclass(frozen=True)
class PresenceList:
    """Presence of the users you may see; `hidden` lists requested ids you may not."""

    users: tuple[Presence, ...]
    hidden: tuple[str, ...] = ()

    def get(self, user_id: str) -> Presence | None:
        return next((p for p in self.users if p.user_id == user_id), None)


# ---------------------------------------------------------------- the client

SessionCallback = Callable[[Session | None], Awaitable[None] | None]


def _seg(value: str) -> str:
    """One URL path segment: everything but unreserved characters and "@" escaped."""
    if not value:
        raise ValueError("path parameter must not be empty")
    return quote(value, safe="@")


def _paging(
    limit: int | None,
    offset: int | None,
    before: str | None,
    from_date: int | None,
    to_date: int | None,
) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in (
        ("limit", limit),
        ("offset", offset),
        ("before", before),
        ("fromDate", from_date),
        ("toDate", to_date),
    ):
        if value is not None:
            params[name] = str(value)
    return params


class RestClient:
    """Typed async client for one server; use as `async with RestClient(url) as c:`.

    `session` resumes a saved login; `on_session` (sync or async) is called with the
    new `Session` after login and every refresh, and with None after logout or when
    the session is found revoked. `clock` returns Unix seconds (injectable for tests).
    `timeout` is per request, in seconds. Not safe to share across trio runs.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: Session | None = None,
        on_session: SessionCallback | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._on_session = on_session
        self._clock = clock
        self._refresh_lock = trio.Lock()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            verify=verify,
            transport=transport,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            follow_redirects=False,
        )

    @property
    def session(self) -> Session | None:
        return self._session

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ plumbing

    async def _set_session(self, session: Session | None) -> None:
        self._session = session
        if self._on_session is not None:
            result = self._on_session(session)
            if inspect.isawaitable(result):
                await result

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            return await self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise ServerUnavailable(
                f"{self.base_url}: request timed out ({type(exc).__name__})"
            ) from None
        except httpx.ConnectError as exc:
            raise ServerUnavailable(f"cannot connect to {self.base_url}: {exc}") from None
        except httpx.TransportError as exc:
            raise ServerUnavailable(
                f"{self.base_url}: connection failed: {exc or type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"{self.base_url}: {exc}") from None

    @staticmethod
    def _error(resp: httpx.Response) -> ClientError:
        status = resp.status_code
        error, detail = f"http_{status}", resp.reason_phrase or "error"
        try:
            body = resp.json()
        except ValueError:
            body = None
            text = resp.text.strip()
            if text:
                detail = text[:200]
        if isinstance(body, Mapping):
            error = str(body.get("error") or error)
            detail = str(body.get("detail") or body.get("message") or detail)
        if status in (502, 503, 504):
            return ServerUnavailable(f"server unavailable ({status} {error}: {detail})", status)
        if status == 401:
            return AuthError(status, error, detail)
        if status == 403:
            return ForbiddenError(status, error, detail)
        if status == 404:
            return NotFoundError(status, error, detail)
        if status == 429:
            retry_after: float | None = None
            try:
                retry_after = float(resp.headers.get("Retry-After", ""))
            except ValueError:
                pass
            return RateLimited(status, error, detail, retry_after)
        return ApiError(status, error, detail)

    @staticmethod
    def _body(resp: httpx.Response) -> Any:
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise _bad_response(resp.status_code, "body is not JSON") from None

    async def _public(self, method: str, path: str, json: Any = None) -> Any:
        resp = await self._send(method, path, json=json)
        if resp.status_code >= 400:
            raise self._error(resp)
        return self._body(resp)

    async def _authed(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """An authenticated call: refresh ahead of expiry, and once more on a 401."""
        session = self._session
        if session is None:
            raise AuthError(401, "not_logged_in", "log in first")
        if self._clock() >= session.expires_at - REFRESH_MARGIN_S:
            await self._refresh_if_still(session.token)
            session = self._session
            assert session is not None
        resp = await self._send(method, path, json=json, params=params, token=session.token)
        if resp.status_code == 401:
            await self._refresh_if_still(session.token)
            session = self._session
            assert session is not None
            resp = await self._send(method, path, json=json, params=params, token=session.token)
        if resp.status_code >= 400:
            raise self._error(resp)
        return self._body(resp)

    async def _refresh_if_still(self, stale_token: str) -> None:
        """Refresh unless another task already replaced `stale_token` while we waited."""
        async with self._refresh_lock:
            if self._session is None:
                raise AuthError(401, "not_logged_in", "log in first")
            if self._session.token != stale_token:
                return
            await self._do_refresh(self._session)

    async def _do_refresh(self, session: Session) -> Session:
        resp = await self._send("POST", "/api/auth/refresh", json={"token": session.refresh_token})
        if resp.status_code in (400, 401, 403):
            err = self._error(resp)
            await self._set_session(None)
            assert isinstance(err, ApiError)
            raise AuthError(
                401, err.error, f"session expired or revoked; log in again ({err.detail})"
            )
        if resp.status_code >= 400:
            raise self._error(resp)
        new = self._session_from(_obj(self._body(resp)), session.user_id, session.device_id)
        await self._set_session(new)
        return new

    def _session_from(self, d: Mapping[str, Any], user_id: str, device_id: str | None) -> Session:
        expires_in = _req(d, "expiresIn", (int, float))
        return Session(
            _opt(d, "userId", str) or user_id,
            _req(d, "token", str),
            _req(d, "refreshToken", str),
            self._clock() + float(expires_in),
            _opt(d, "deviceId", str) or device_id,
        )

    # ------------------------------------------------------------ auth

    async def register(self, user_id: str, password: str, display_name: str | None = None) -> User:
        """Create an account (`POST /api/auth/register`); password >= 10 characters."""
        payload: dict[str, Any] = {"userId": user_id, "password": password}
        if display_name is not None:
            payload["displayName"] = display_name
        body = _obj(await self._public("POST", "/api/auth/register", payload))
        return User.from_json({"userId": user_id, **body})

    async def login(self, username: str, password: str, *, device_id: str | None = None) -> Session:
        """Log in (`POST /api/auth/login`) and keep the session; AuthError on bad credentials."""
        payload: dict[str, Any] = {"username": username, "password": password}
        if device_id is not None:
            payload["deviceId"] = device_id
        body = _obj(await self._public("POST", "/api/auth/login", payload))
        session = self._session_from(body, username, device_id)
        await self._set_session(session)
        return session

    async def refresh(self) -> Session:
        """Exchange the refresh token for a new pair now (normally automatic)."""
        async with self._refresh_lock:
            if self._session is None:
                raise AuthError(401, "not_logged_in", "log in first")
            return await self._do_refresh(self._session)

    async def logout(self) -> None:
        """Revoke this session's refresh-token family (`POST /api/auth/logout`) and forget it.

        The local session is dropped even when the call fails (ServerUnavailable is
        still raised, so the caller can say the server may not have revoked it).
        """
        session = self._session
        if session is None:
            return
        try:
            await self._authed(
                "POST", "/api/auth/logout", json={"refreshToken": session.refresh_token}
            )
        except AuthError:
            pass  # already revoked or expired: the goal is reached
        finally:
            await self._set_session(None)

    async def access_token(self) -> str:
        """A valid access token (refreshed first when it expires within the margin).

        For the STOMP CONNECT `passcode`, which has no 401-and-retry of its own.
        """
        session = self._session
        if session is None:
            raise AuthError(401, "not_logged_in", "log in first")
        if self._clock() >= session.expires_at - REFRESH_MARGIN_S:
            await self._refresh_if_still(session.token)
            session = self._session
            assert session is not None
        return session.token

    async def me(self) -> User:
        """The logged-in user."""
        return User.from_json(_obj(await self._authed("GET", ME_PATH)))

    # ------------------------------------------------------------ device keys

    async def register_key(self, device_id: str, public_key_pem: str) -> KeyRegistration:
        """Publish (or replace) this user's device public key (PEM, X25519)."""
        body = await self._authed(
            "POST", "/api/keys/register", json={"deviceId": device_id, "publicKey": public_key_pem}
        )
        return KeyRegistration.from_json(_obj(body))

    async def get_key(self, user_id: str, device_id: str) -> DeviceKeyInfo:
        """One device's public key; NotFoundError if that device has none."""
        body = await self._authed("GET", f"/api/keys/{_seg(user_id)}/{_seg(device_id)}")
        return DeviceKeyInfo.from_json(_obj(body), user_id, device_id)

    async def list_keys(self, user_id: str) -> list[DeviceKeyInfo]:
        """Every registered device of `user_id` (a sender needs them all)."""
        body = await self._authed("GET", f"/api/keys/{_seg(user_id)}")
        return [DeviceKeyInfo.from_json(d, user_id) for d in _items(body, "devices")]

    async def delete_key(self, device_id: str) -> None:
        """Remove one of your own device keys."""
        await self._authed("DELETE", f"/api/keys/{_seg(device_id)}")

    # ------------------------------------------------------------ messages

    async def send_message(self, envelope: Mapping[str, Any]) -> SendResult:
        """Send an E2EE envelope (from `e2ee.encrypt_message`); idempotent per clientMessageId."""
        body = await self._authed("POST", "/api/chat/send-message", json=dict(envelope))
        return SendResult.from_json(_obj(body))

    async def messages(
        self,
        with_user: str,
        *,
        limit: int | None = 50,
        offset: int | None = None,
        before: str | None = None,
        from_date: int | None = None,
        to_date: int | None = None,
    ) -> list[Message]:
        """1:1 history with `with_user`, newest first; limit <= 200, dates in ms epoch.

        Page with `before=<oldest id seen>` (stable under new messages) or `offset`.
        """
        params = {"with": with_user, **_paging(limit, offset, before, from_date, to_date)}
        body = await self._authed("GET", "/api/chat/messages", params=params)
        return [Message.from_json(m) for m in _items(body, "messages")]

    async def offline_messages(self) -> list[Message]:
        """Messages queued while you had no live session, oldest first (not removed)."""
        body = await self._authed("GET", "/api/chat/offline-messages")
        return [Message.from_json(m) for m in _items(body, "messages")]

    async def ack_offline(self, ids: Sequence[str]) -> int | None:
        """Remove these ids from your offline queue; returns how many went, if the server says."""
        body = await self._authed("POST", "/api/chat/offline-messages/ack", json={"ids": list(ids)})
        return _opt(body, "acked", int) if isinstance(body, Mapping) else None

    # ------------------------------------------------------------ channels

    async def create_channel(
        self,
        name: str,
        *,
        description: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> Channel:
        """Create a channel you own (settings default to {"encryption": "E2EE"} server-side)."""
        payload: dict[str, Any] = {"name": name}
        if description is not None:
            payload["description"] = description
        if settings is not None:
            payload["settings"] = dict(settings)
        return Channel.from_json(
            _obj(await self._authed("POST", "/api/channels/create", json=payload))
        )

    async def invite(self, channel_id: str, user_ids: Sequence[str]) -> int:
        """Invite users (owner/admins only); returns how many were newly added."""
        body = _obj(
            await self._authed(
                "POST", f"/api/channels/{_seg(channel_id)}/invite", json={"userIds": list(user_ids)}
            )
        )
        return int(_req(body, "invitedCount", int))

    async def leave_channel(self, channel_id: str) -> None:
        await self._authed("POST", f"/api/channels/{_seg(channel_id)}/leave")

    async def remove_member(self, channel_id: str, user_id: str) -> None:
        """Remove a member (owner only); their live subscription ends at once."""
        await self._authed("DELETE", f"/api/channels/{_seg(channel_id)}/members/{_seg(user_id)}")

    async def channels(self) -> list[Channel]:
        """The channels you are a member of."""
        body = await self._authed("GET", "/api/channels")
        return [Channel.from_json(c) for c in _items(body, "channels")]

    async def channel(self, channel_id: str) -> Channel:
        return Channel.from_json(
            _obj(await self._authed("GET", f"/api/channels/{_seg(channel_id)}"))
        )

    async def channel_messages(
        self,
        channel_id: str,
        *,
        limit: int | None = 50,
        offset: int | None = None,
        before: str | None = None,
        from_date: int | None = None,
        to_date: int | None = None,
    ) -> list[Message]:
        """Channel history, newest first; same paging as `messages`."""
        body = await self._authed(
            "GET",
            f"/api/channels/{_seg(channel_id)}/messages",
            params=_paging(limit, offset, before, from_date, to_date),
        )
        return [Message.from_json(m) for m in _items(body, "messages")]

    # ------------------------------------------------------------ presence

    async def presence(self, user_ids: Sequence[str]) -> PresenceList:
        """Presence (ONLINE / AWAY / OFFLINE, last seen, online devices) of up to 100 users.

        Only yourself and your contacts (shared channel or conversation) are visible;
        other ids come back in `hidden`, never as OFFLINE.
        """
        if not user_ids:
            raise ValueError("presence needs at least one user id")
        body = _obj(
            await self._authed("GET", PRESENCE_PATH, params={"userIds": ",".join(user_ids)})
        )
        hidden = body.get("hidden")
        return PresenceList(
            tuple(Presence.from_json(p) for p in _items(body, "users")),
            tuple(h for h in hidden if isinstance(h, str)) if isinstance(hidden, list) else (),
        )
