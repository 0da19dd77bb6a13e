"""The STOMP door: builds the broker for a server and registers the `/app` handlers.

Handlers here are thin (parse the JSON body, call a service); service errors become
ERROR frames in one place, `stomp_errors`. Other parts register theirs the same way:

    from securecollab.api.stomp_app import app_handler

    @app_handler
    async def send_chat(session: SessionInfo, frame: stomp.Frame) -> None:
        await ctx.messages.send(session.user_id, parse_json(frame), ...)

    broker.register_app_handler("/app/chat/send", send_chat)

Destinations handled here:
- `SEND /app/presence {"status": "AWAY" | "ONLINE"}`
- `SEND /app/typing {"to": userId} | {"channelId": id}` (optional `"typing": false` to
  stop): relayed on `/user/queue/typing` to the peer, or to every other member of the
  channel (members only), as `{"from", "to"|"channelId", "typing", "at"}`. Never stored.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import stomp
from securecollab.api import client_json
from securecollab.backplane import Delivery
from securecollab.broker import metrics
from securecollab.broker.config import AclRule, BrokerConfig
from securecollab.broker.core import AppHandler, Broker, Completion
from securecollab.broker.errors import AppError, AuthenticationFailed
from securecollab.broker.hooks import Authenticator, BrokerHooks, Credentials, Identity, SessionInfo
from securecollab.config import Settings
from securecollab.ids import new_id, now_ms, user_key
from securecollab.services.auth import AuthService
from securecollab.services.errors import RateLimited, ServiceError, Unauthorized
from securecollab.services.presence import PresenceService
from securecollab.store import UserRecord

log = logging.getLogger(__name__)

TYPING_QUEUE = "/user/queue/typing"
MAX_JSON_BODY = 16 * 1024  # presence/typing bodies are tiny


def broker_config(settings: Settings) -> BrokerConfig:
    """BrokerConfig from `[stomp]`, `[broker]` and `[presence]`."""
    s = settings.stomp
    import securecollab

    return BrokerConfig(
        server_name=f"SecureCollab/{securecollab.__version__}",
        max_frame_bytes=s.max_frame_bytes,
        max_headers=s.max_headers,
        max_header_line=s.max_header_line,
        connect_timeout_s=s.connect_timeout_s,
        heartbeat_send_ms=s.heartbeat_send_ms,
        heartbeat_recv_ms=s.heartbeat_recv_ms,
        outbound_queue_frames=s.outbound_queue_frames,
        outbound_queue_bytes=s.outbound_queue_bytes,
        ws_always_binary=s.ws_always_binary,
        pipeline_depth=s.pipeline_depth,
        send_limit=s.send_limit,
        send_window_s=s.send_window_s,
        acl=tuple(
            AclRule(r.pattern, tuple(r.subscribe), tuple(r.send)) for r in settings.broker.acl
        ),
        # refresh well inside the TTL so a live session never lapses
        presence_refresh_s=min(60.0, settings.presence.ttl_s / 3),
        presence_ttl_s=float(settings.presence.ttl_s),
    )


def _looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2 and " " not in value


def _host_of(peer: str) -> str:
    # "127.0.0.1:5555" / "[::1]:5555" / bare host (WebSocket Remote-Addr)
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    return peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer


def authenticator(auth: AuthService) -> Authenticator:
    """CONNECT credentials -> Identity, via the same AuthService the REST door uses.

    Order: Bearer token of the WebSocket upgrade; a JWT in `passcode` (login ignored);
    else `login`/`passcode` as username/password (throttled and audited like REST login).
    """

    async def authenticate(creds: Credentials) -> Identity:
        try:
            if creds.bearer is not None:
                principal = await auth.verify_access_token(creds.bearer)
            elif creds.passcode is not None and _looks_like_jwt(creds.passcode):
                principal = await auth.verify_access_token(creds.passcode)
            elif creds.login is not None and creds.passcode is not None:
                principal = await auth.authenticate_password(
                    creds.login, creds.passcode, _host_of(creds.peer)
                )
            else:
                raise AuthenticationFailed(
                    "authentication failed",
                    "CONNECT needs passcode=<access token>, login/passcode, or"
                    " Authorization: Bearer on the WebSocket upgrade",
                )
        except RateLimited as exc:
            raise AuthenticationFailed("too many login attempts", exc.detail) from None
        except Unauthorized as exc:
            raise AuthenticationFailed("authentication failed", exc.detail) from None
        except ServiceError as exc:
            raise AuthenticationFailed("authentication failed", exc.detail) from None
        return Identity(
            principal.user_id,
            tuple(principal.roles),
            principal.device_id,
            session_key=principal.family_id,
        )

    return authenticate


def app_handler(
    fn: Callable[[SessionInfo, stomp.Frame], Awaitable[Completion | None]],
) -> AppHandler:
    """Wrap an /app handler so service errors become ERROR frames (`code: detail`), in
    the handler and in the completion it may return (see `broker.core.AppHandler`)."""

    async def handler(session: SessionInfo, frame: stomp.Frame) -> Completion | None:
        try:
            done = await fn(session, frame)
        except ServiceError as exc:
            raise AppError(exc.detail, f"{exc.code}: {exc.detail}") from None
        if done is None:
            return None

        async def completion() -> None:
            try:
                await done()
            except ServiceError as exc:
                raise AppError(exc.detail, f"{exc.code}: {exc.detail}") from None

        return completion

    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


def json_body(frame: stomp.Frame, max_bytes: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The frame's body as a JSON object; AppError otherwise."""
    if len(frame.body) > max_bytes:
        dest = frame.get("destination", "")
        raise AppError(f"body too large for {dest}", f"at most {max_bytes} bytes")
    try:
        data = client_json.loads(frame.body)
    except client_json.BadJson as exc:
        dest = frame.get("destination", "")
        raise AppError(
            f"invalid JSON body for {dest}: {exc}", "the body must be a JSON object"
        ) from None
    if not isinstance(data, dict):
        dest = frame.get("destination", "")
        raise AppError(f"invalid JSON body for {dest}", "the body must be a JSON object")
    return data


class StompApp:
    """Presence and typing over STOMP, and the broker hooks that keep presence current."""

    def __init__(
        self,
        broker: Broker,
        presence: PresenceService,
        find_user: Callable[[str], Awaitable[UserRecord | None]],
    ) -> None:
        self.broker = broker
        self.presence = presence
        self.find_user = find_user  # client-typed ids -> the stored spelling deliveries use
        self._local: dict[str, str] = {}  # user -> status, users with a session on this node
        self._counts: Counter[str] = Counter()  # status -> users in _local with it
        hooks = broker.hooks
        hooks.on_session_open = self._opened
        hooks.on_session_close = self._closed
        hooks.on_session_activity = self._activity
        broker.register_app_handler("/app/presence", app_handler(self.set_presence))
        broker.register_app_handler("/app/typing", app_handler(self.typing))

    # ------------------------------------------------------------------ presence hooks
    def _track(self, user_id: str, status: str) -> None:
        # counted incrementally: a recount of every local user per CONNECT was O(users)
        old = self._local.get(user_id)
        new = status if self.broker.user_sessions(user_id) and status != "OFFLINE" else None
        if old == new:
            return
        if new is None:
            del self._local[user_id]
        else:
            self._local[user_id] = new
        if old is not None:
            self._counts[old] -= 1
            metrics.PRESENCE.labels(old).set(self._counts[old])
        if new is not None:
            self._counts[new] += 1
            metrics.PRESENCE.labels(new).set(self._counts[new])

    async def _opened(self, info: SessionInfo) -> None:
        view = await self.presence.session_opened(info.user_id, info.session_id, info.device_id)
        self._track(info.user_id, view.status)

    async def _closed(self, info: SessionInfo) -> None:
        view = await self.presence.session_closed(info.user_id, info.session_id)
        self._track(info.user_id, view.status)

    async def _activity(self, info: SessionInfo) -> None:
        await self.presence.refresh(info.user_id, info.session_id)

    # ------------------------------------------------------------------ /app handlers
    async def set_presence(self, session: SessionInfo, frame: stomp.Frame) -> None:
        status = json_body(frame).get("status")
        if not isinstance(status, str):
            raise AppError("invalid presence", 'body must be {"status": "ONLINE" | "AWAY"}')
        view = await self.presence.set_status(session.user_id, status.upper())
        self._track(session.user_id, view.status)

    async def typing(self, session: SessionInfo, frame: stomp.Frame) -> None:
        data = json_body(frame)
        to, channel_id = data.get("to"), data.get("channelId")
        typing = data.get("typing", True)
        if (to is None) == (channel_id is None) or not isinstance(typing, bool):
            raise AppError(
                "invalid typing notice",
                'body must be {"to": userId} or {"channelId": id}, optional "typing": bool',
            )
        event: dict[str, object] = {"from": session.user_id, "typing": typing, "at": now_ms()}
        if to is not None:
            if not isinstance(to, str) or not to or user_key(to) == user_key(session.user_id):
                raise AppError("invalid typing notice", '"to" must be another user\'s id')
            user = await self.find_user(to)
            if user is None or user.deleted_at is not None:
                raise AppError("invalid typing notice", f"no user {to!r}")
            event["to"] = user.user_id
            recipients = {user.user_id}
        else:
            if not isinstance(channel_id, str) or not channel_id:
                raise AppError("invalid typing notice", '"channelId" must be a channel id')
            if not await self.broker.hooks.can_subscribe_channel(session.user_id, channel_id):
                raise AppError(
                    f"not a member of channel {channel_id}", "typing notices go to members only"
                )
            event["channelId"] = channel_id
            recipients = await self.broker.hooks.channel_members(channel_id) - {session.user_id}
        body = json.dumps(event).encode()
        for user_id in sorted(recipients):
            await self.broker.backplane.publish(
                Delivery(
                    kind="user",
                    destination=TYPING_QUEUE,
                    body=body,
                    headers=(("content-type", "application/json"),),
                    user_id=user_id,
                    message_id=new_id(),
                )
            )


def build_broker(
    settings: Settings, backplane: Any, auth: AuthService
) -> tuple[Broker, PresenceService]:
    """The server's broker with presence and typing wired in (hooks for messaging unset)."""
    hooks = BrokerHooks()
    broker = Broker(backplane, broker_config(settings), authenticator(auth), hooks)
    presence = PresenceService(backplane, settings.presence.ttl_s, lambda u: hooks.peers_of(u))
    StompApp(broker, presence, auth.get_user)
    return broker, presence
