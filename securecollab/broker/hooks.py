"""Extension points the chat layers fill in; the broker itself knows no chat rule.

Every hook is an async callable attribute of `BrokerHooks`; assign to replace one
(`broker.hooks.can_subscribe_channel = channels.is_member`). Defaults are the safe
answer: deny, nobody, nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is behind a connection, as the authenticator established it."""

    user_id: str
    roles: tuple[str, ...] = ()
    device_id: str | None = None
    # the login session behind the credentials (the access token's refresh-token family):
    # a control "disconnect" with header `session-key` closes only that session's
    # connections (logout)
    session_key: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client presented: CONNECT headers plus the WebSocket upgrade's bearer token."""

    login: str | None
    passcode: str | None
    bearer: str | None  # `Authorization: Bearer` of the WebSocket upgrade
    host: str | None
    peer: str  # remote address, for password rate limits and audit


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A connected session as hooks and `/app` handlers see it."""

    session_id: str
    user_id: str
    roles: tuple[str, ...]
    device_id: str  # CONNECT `device-id` header, else the token's device, else "web"
    transport: str  # "tcp" | "ws"
    peer: str


@dataclass(frozen=True, slots=True)
class InitialMessage:
    """One message delivered before live traffic on `/user/queue/private` (offline queue)."""

    message_id: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)


Authenticator = Callable[[Credentials], Awaitable[Identity]]
"""Raises `broker.errors.AuthenticationFailed` (or returns an Identity)."""


async def _deny(user_id: str, channel_id: str) -> bool:
    return False


async def _nobody(key: str) -> set[str]:
    return set()


async def _no_messages(user_id: str) -> list[InitialMessage]:
    return []


async def _ignore_delivered(user_id: str, message_ids: list[str]) -> None:
    return None


def _all_delivered(user_id: str, message_ids: list[str]) -> list[str]:
    return message_ids


async def _ignore_session(info: SessionInfo) -> None:
    return None


@dataclass(slots=True)
class BrokerHooks:
    """Async callables the broker (and the /app handlers) call out to.

    Used by the broker itself:
    - `can_subscribe_channel(user_id, channel_id) -> bool`: SUBSCRIBE to
      `/topic/messages/{channel_id}` is allowed iff True. Default: deny.
    - `initial_messages(user_id) -> list[InitialMessage]`: on SUBSCRIBE to
      `/user/queue/private`, delivered first, oldest first; live deliveries that arrive
      meanwhile are buffered and de-duplicated by message-id.
    - `on_delivered(user_id, message_ids)`: messages on `/user/queue/private` reached
      the client: ACKed (client / client-individual) or, for ack:auto, written to the
      socket. Called once per batch; errors are logged, never fatal.
    - `delivered_filter(user_id, message_ids) -> message_ids` (synchronous, optional):
      which of these delivered messages `on_delivered` needs to hear about. A session
      that wrote a frame straight from the delivering task reports only what this
      returns, so the common "never queued, nothing to delete" case costs no task
      switch. Default: all of them.
    - `on_undelivered(user_id, message_ids)`: messages of `/user/queue/private` that
      were accepted for live delivery but did not reach the client: dropped (session
      closing, slow consumer), queued but unwritten when the connection ended, NACKed,
      or unACKed (client modes) at UNSUBSCRIBE/disconnect. Called before the session's
      close completes (so before the store closes at shutdown); errors are logged.
      (Queue them offline here: the next SUBSCRIBE delivers them first.)
    - `on_session_open / on_session_close / on_session_activity(SessionInfo)`:
      connection life (presence). Activity is called for every connected session every
      `presence_refresh_s` while the node runs (`Broker.refresh_forever`).

    Used by the /app handlers (api/stomp_app.py):
    - `peers_of(user_id) -> set[str]`: users who share a channel or conversation with
      `user_id`; presence changes go only to them. Default: nobody.
    - `channel_members(channel_id) -> set[str]`: typing relay to a channel.
    """

    can_subscribe_channel: Callable[[str, str], Awaitable[bool]] = _deny
    initial_messages: Callable[[str], Awaitable[list[InitialMessage]]] = _no_messages
    on_delivered: Callable[[str, list[str]], Awaitable[None]] = _ignore_delivered
    delivered_filter: Callable[[str, list[str]], list[str]] = _all_delivered
    on_undelivered: Callable[[str, list[str]], Awaitable[None]] = _ignore_delivered
    on_session_open: Callable[[SessionInfo], Awaitable[None]] = _ignore_session
    on_session_close: Callable[[SessionInfo], Awaitable[None]] = _ignore_session
    on_session_activity: Callable[[SessionInfo], Awaitable[None]] = _ignore_session
    peers_of: Callable[[str], Awaitable[set[str]]] = _nobody
    channel_members: Callable[[str], Awaitable[set[str]]] = _nobody
