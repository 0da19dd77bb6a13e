"""Backplane port: state and fan-out shared by every node of a deployment.

Adapters: `backplane/memory.py` (default, one process) and, for scale-out, a Redis
adapter (pub/sub for fan-out, ZSET sliding windows, TTL keys for presence) that must
pass the same contract suite (`tests/backplane/`).

The port has three parts:

- rate limits: `hit()` — a sliding-window counter keyed by any string;
- fan-out: `publish()` sends a `Delivery` to every node (this one included); each
  node's broker registers one local handler with `subscribe()` and delivers to its own
  sessions. Services publish; only the broker subscribes.
- presence: per-user session registrations with a TTL, so a crashed node cannot
  leave users ONLINE forever.
- subscribers: which users have a session subscribed to a destination right now
  (the broker registers `/user/queue/private` subscriptions), with the same TTL rule,
  so messaging can tell "would receive it live" from "merely connected" on any node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from securecollab.records import record


@record  # built per SEND (the rate limit): not frozen at runtime, see securecollab/records.py
class RateDecision:
    allowed: bool
    count: int  # hits inside the window, this one included when allowed
    retry_after_ms: int  # 0 when allowed; else when the oldest hit leaves the window


@record  # built per message: not frozen at runtime, see securecollab/records.py
class Delivery:
    """One message for local delivery on every node.

    kind "user": to every session of `user_id` subscribed to `destination`
    (a user destination as the client wrote it, e.g. "/user/queue/private").
    kind "topic": to every subscriber of `destination` (e.g. "/topic/messages/<id>").
    kind "presence": `user_id`'s presence changed; to the subscribers of
    `/topic/presence` who are that user's peers (the broker filters by `hooks.peers_of`).
    kind "control": broker instructions (e.g. end a user's channel subscription);
    `headers` carry the details.
    """

    kind: str
    destination: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    user_id: str | None = None
    message_id: str | None = None
    exclude_session: str | None = None  # e.g. the sending session in multi-device sync


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    user_id: str
    status: str  # "ONLINE" | "AWAY" | "OFFLINE"
    devices: tuple[str, ...]
    last_seen: int  # ms epoch


class Backplane(Protocol):
    async def hit(self, key: str, limit: int, window_ms: int, now_ms: int) -> RateDecision:
        """Count one hit for `key` in a sliding window; refuse (and do not count) over limit."""
        ...

    async def publish(self, delivery: Delivery) -> None:
        """Fan `delivery` out to every node's handler, this node's included."""
        ...

    def subscribe(self, handler: DeliveryHandler) -> None:
        """Register this node's local delivery handler (the broker calls it once)."""
        ...

    async def presence_connect(
        self, user_id: str, session_id: str, device: str, now_ms: int, ttl_ms: int
    ) -> PresenceRecord: ...

    async def presence_refresh(
        self, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None: ...

    async def presence_set_status(
        self, user_id: str, status: str, now_ms: int
    ) -> PresenceRecord: ...

    async def presence_disconnect(
        self, user_id: str, session_id: str, now_ms: int
    ) -> PresenceRecord: ...

    async def presence_get(self, user_ids: list[str], now_ms: int) -> dict[str, PresenceRecord]: ...

    async def presence_offline(self, user_ids: list[str], now_ms: int) -> list[str]:
        """Those of `user_ids` with no unexpired session (status OFFLINE), in input order.

        The per-message question of a channel send (queue it for whom?): an adapter
        answers it without building a `PresenceRecord` per user, as it is asked for
        every member of the channel on every message.
        """
        ...

    async def subscriber_add(
        self, destination: str, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None:
        """`session_id` of `user_id` subscribed to `destination` (idempotent; renews the TTL)."""
        ...

    async def subscriber_refresh(
        self, destination: str, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None:
        """Push the registration's expiry forward; no-op if it is not registered."""
        ...

    async def subscriber_remove(self, destination: str, user_id: str, session_id: str) -> None:
        """The session unsubscribed or closed (idempotent)."""
        ...

    async def subscribed_users(
        self, destination: str, user_ids: list[str], now_ms: int
    ) -> set[str]:
        """Those of `user_ids` with at least one unexpired registration for `destination`."""
        ...
