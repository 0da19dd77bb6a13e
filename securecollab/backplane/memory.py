"""In-process backplane: the embedded default for a single node."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from securecollab.backplane import Delivery, DeliveryHandler, PresenceRecord, RateDecision


@dataclass(slots=True)
class _UserPresence:
    sessions: dict[str, tuple[str, int]] = field(
        default_factory=dict
    )  # session -> (device, expiry)
    away: bool = False
    last_seen: int = 0


class MemoryBackplane:
    """Rate windows, fan-out and presence held in this process's memory.

    `max_keys` bounds the rate-limit table: when it is full, idle windows are dropped
    first, so a flood of distinct keys (e.g. spoofed IPs) cannot grow memory forever.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self._windows: dict[str, deque[int]] = {}
        self._max_keys = max_keys
        self._handlers: list[DeliveryHandler] = []
        self._presence: dict[str, _UserPresence] = {}
        # user -> latest expiry among its sessions (ms epoch); absent: no session.
        # Kept next to `_presence` so "is this user offline" is one dict lookup.
        self._online_until: dict[str, int] = {}
        # (destination, user) -> session -> expiry (ms epoch)
        self._subscribers: dict[tuple[str, str], dict[str, int]] = {}

    # ------------------------------------------------------------------ rate limits
    async def hit(self, key: str, limit: int, window_ms: int, now_ms: int) -> RateDecision:
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._max_keys:
                self._evict(now_ms, window_ms)
            window = self._windows[key] = deque()
        start = now_ms - window_ms
        while window and window[0] <= start:
            window.popleft()
        if len(window) >= limit:
            return RateDecision(False, len(window), max(1, window[0] + window_ms - now_ms))
        window.append(now_ms)
        return RateDecision(True, len(window), 0)

    def _evict(self, now_ms: int, window_ms: int) -> None:
        stale = [k for k, w in self._windows.items() if not w or w[-1] <= now_ms - window_ms]
        for k in stale:
            del self._windows[k]
        if len(self._windows) >= self._max_keys:  # all busy: drop the oldest half
            for k in list(self._windows)[: self._max_keys // 2]:
                del self._windows[k]

    # ------------------------------------------------------------------ fan-out
    async def publish(self, delivery: Delivery) -> None:
        for handler in self._handlers:
            await handler(delivery)

    def subscribe(self, handler: DeliveryHandler) -> None:
        self._handlers.append(handler)

    # ------------------------------------------------------------------ presence
    def _sessions_changed(self, user_id: str, p: _UserPresence) -> None:
        if p.sessions:
            self._online_until[user_id] = max(exp for _, exp in p.sessions.values())
        else:
            self._online_until.pop(user_id, None)

    def _record(self, user_id: str, p: _UserPresence | None, now_ms: int) -> PresenceRecord:
        if p is not None:
            expired = [s for s, (_, exp) in p.sessions.items() if exp <= now_ms]
            if expired:
                for sid in expired:
                    del p.sessions[sid]
                self._sessions_changed(user_id, p)
        if p is None or not p.sessions:
            return PresenceRecord(user_id, "OFFLINE", (), p.last_seen if p else 0)
        devices = tuple(sorted({d for d, _ in p.sessions.values()}))
        return PresenceRecord(user_id, "AWAY" if p.away else "ONLINE", devices, p.last_seen)

    async def presence_connect(
        self, user_id: str, session_id: str, device: str, now_ms: int, ttl_ms: int
    ) -> PresenceRecord:
        p = self._presence.setdefault(user_id, _UserPresence())
        if not self._record(user_id, p, now_ms).devices:
            p.away = False
        p.sessions[session_id] = (device, now_ms + ttl_ms)
        p.last_seen = now_ms
        self._sessions_changed(user_id, p)
        return self._record(user_id, p, now_ms)

    async def presence_refresh(
        self, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None:
        p = self._presence.get(user_id)
        if p is not None and session_id in p.sessions:
            p.sessions[session_id] = (p.sessions[session_id][0], now_ms + ttl_ms)
            p.last_seen = now_ms
            self._sessions_changed(user_id, p)

    async def presence_set_status(self, user_id: str, status: str, now_ms: int) -> PresenceRecord:
        p = self._presence.setdefault(user_id, _UserPresence())
        p.away = status == "AWAY"
        p.last_seen = now_ms
        return self._record(user_id, p, now_ms)

    async def presence_disconnect(
        self, user_id: str, session_id: str, now_ms: int
    ) -> PresenceRecord:
        p = self._presence.get(user_id)
        if p is not None:
            p.sessions.pop(session_id, None)
            p.last_seen = now_ms
            self._sessions_changed(user_id, p)
        return self._record(user_id, p, now_ms)

    async def presence_get(self, user_ids: list[str], now_ms: int) -> dict[str, PresenceRecord]:
        return {u: self._record(u, self._presence.get(u), now_ms) for u in user_ids}

    async def presence_offline(self, user_ids: list[str], now_ms: int) -> list[str]:
        # One lookup per user: asked for every member of a channel on every message.
        until = self._online_until.get
        return [u for u in user_ids if until(u, 0) <= now_ms]

    # ------------------------------------------------------------------ subscribers
    async def subscriber_add(
        self, destination: str, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None:
        self._subscribers.setdefault((destination, user_id), {})[session_id] = now_ms + ttl_ms

    async def subscriber_refresh(
        self, destination: str, user_id: str, session_id: str, now_ms: int, ttl_ms: int
    ) -> None:
        sessions = self._subscribers.get((destination, user_id))
        if sessions is not None and session_id in sessions:
            sessions[session_id] = now_ms + ttl_ms

    async def subscriber_remove(self, destination: str, user_id: str, session_id: str) -> None:
        key = (destination, user_id)
        sessions = self._subscribers.get(key)
        if sessions is not None:
            sessions.pop(session_id, None)
            if not sessions:
                del self._subscribers[key]

    async def subscribed_users(
        self, destination: str, user_ids: list[str], now_ms: int
    ) -> set[str]:
        found: set[str] = set()
        for user_id in user_ids:
            key = (destination, user_id)
            sessions = self._subscribers.get(key)
            if sessions is None:
                continue
            if sessions and min(sessions.values()) <= now_ms:
                for sid in [s for s, exp in sessions.items() if exp <= now_ms]:
                    del sessions[sid]  # a crashed node's registrations lapse here
            if sessions:
                found.add(user_id)
            else:
                del self._subscribers[key]
        return found
