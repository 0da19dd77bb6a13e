"""Presence: ONLINE while any session is connected, AWAY on request, OFFLINE when the last goes.

State lives in the backplane (per-session registrations with a TTL, renewed by the
node every ttl/3 while it runs, whatever the client sends), so a crashed node cannot
leave its users ONLINE forever. Every change
of a user's status or device list is published once (backplane kind "presence"); each
node's broker hands it to its `/topic/presence` subscribers who are peers of the user
(share a channel or conversation: `hooks.peers_of`), so a subscriber only ever hears
about its own contacts.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from securecollab.backplane import Backplane, Delivery, PresenceRecord
from securecollab.ids import new_id, now_ms, user_key
from securecollab.services.errors import InvalidInput

PRESENCE_TOPIC = "/topic/presence"
SETTABLE = ("ONLINE", "AWAY")
MAX_QUERY_USERS = 100

PeersOf = Callable[[str], Awaitable[set[str]]]


@dataclass(frozen=True, slots=True)
class PresenceView:
    """What clients see of one user (JSON: userId, status, devices, lastSeen)."""

    user_id: str
    status: str
    devices: tuple[str, ...]
    last_seen: int | None  # ms epoch; None if never seen

    def to_json(self) -> dict[str, object]:
        return {
            "userId": self.user_id,
            "status": self.status,
            "devices": list(self.devices),
            "lastSeen": self.last_seen,
        }


def _view(record: PresenceRecord) -> PresenceView:
    return PresenceView(record.user_id, record.status, record.devices, record.last_seen or None)


async def _nobody(user_id: str) -> set[str]:
    return set()


class PresenceService:
    """Tracks sessions in the backplane and tells peers about changes.

    `peers_of(user_id) -> set[str]` is late-bound (assign it, or pass a lambda that
    reads a hook) because the channels/messages part provides it.
    """

    def __init__(self, backplane: Backplane, ttl_s: float, peers_of: PeersOf = _nobody) -> None:
        self._backplane = backplane
        self._ttl_ms = int(ttl_s * 1000)
        self.peers_of = peers_of

    async def session_opened(self, user_id: str, session_id: str, device: str) -> PresenceView:
        before = await self._current(user_id)
        record = await self._backplane.presence_connect(
            user_id, session_id, device, now_ms(), self._ttl_ms
        )
        return await self._changed(before, _view(record))

    async def session_closed(self, user_id: str, session_id: str) -> PresenceView:
        before = await self._current(user_id)
        record = await self._backplane.presence_disconnect(user_id, session_id, now_ms())
        return await self._changed(before, _view(record))

    async def refresh(self, user_id: str, session_id: str) -> None:
        """The session is alive (its node renews it every ttl/3): push its TTL forward."""
        await self._backplane.presence_refresh(user_id, session_id, now_ms(), self._ttl_ms)

    async def set_status(self, user_id: str, status: str) -> PresenceView:
        """ONLINE or AWAY, as the user says (OFFLINE follows from disconnecting)."""
        if status not in SETTABLE:
            raise InvalidInput(
                f"status must be one of {', '.join(SETTABLE)}", code="invalid_status"
            )
        before = await self._current(user_id)
        if before.status == "OFFLINE":
            raise InvalidInput("no connected session to set a status for", code="offline")
        record = await self._backplane.presence_set_status(user_id, status, now_ms())
        return await self._changed(before, _view(record))

    async def get(self, user_ids: list[str]) -> list[PresenceView]:
        """Current presence of each user, in the order asked (duplicates removed)."""
        unique = list(dict.fromkeys(user_ids))
        if len(unique) > MAX_QUERY_USERS:
            raise InvalidInput(f"at most {MAX_QUERY_USERS} userIds per request")
        records = await self._backplane.presence_get(unique, now_ms())
        return [_view(records[u]) for u in unique]

    async def visible_to(
        self, viewer: str, user_ids: list[str]
    ) -> tuple[list[PresenceView], list[str]]:
        """Presence of the users `viewer` may see (itself and its peers), and the ids hidden.

        The same rule as the topic: presence is shared only between contacts.
        """
        # by case-insensitive identity: a client may spell an id otherwise than the store
        visible = {user_key(p): p for p in await self.peers_of(viewer)}
        visible[user_key(viewer)] = viewer
        shown: list[str] = []
        hidden: list[str] = []
        for u in dict.fromkeys(user_ids):
            canonical = visible.get(user_key(u))
            if canonical is None:
                hidden.append(u)
            else:
                shown.append(canonical)  # presence is keyed by the stored spelling
        return await self.get(shown), hidden

    async def _current(self, user_id: str) -> PresenceView:
        records = await self._backplane.presence_get([user_id], now_ms())
        return _view(records[user_id])

    async def _changed(self, before: PresenceView, after: PresenceView) -> PresenceView:
        if (before.status, before.devices) != (after.status, after.devices):
            await self.publish(after)
        return after

    async def publish(self, view: PresenceView) -> None:
        """Send `view` on /topic/presence to each peer of its user (never to others).

        One backplane publication (kind "presence", `user_id` = whose presence) per
        change; every node's broker delivers it to its own /topic/presence subscribers
        that are peers of the user (`hooks.peers_of`), so a change costs
        O(subscribers), not O(peers), and nothing when no peer listens.
        """
        await self._backplane.publish(
            Delivery(
                kind="presence",
                destination=PRESENCE_TOPIC,
                body=json.dumps(view.to_json()).encode(),
                headers=(("content-type", "application/json"),),
                user_id=view.user_id,
                message_id=new_id(),
            )
        )
