"""Channel membership as the per-message paths need it: member ids, cached per channel.

Why: every channel message needs its channel's members twice (is the sender one, and
who gets an offline-queue entry), and reading them was a store read of every member row
on every message (a worker-thread hop and 1,000 row objects for a 1,000-member channel,
the largest cost of a channel send after presence).

Rules:

- read through: a miss reads `store.list_channel_members` once; concurrent misses for
  one channel wait for that one read instead of each making their own;
- invalidated on change: every membership change made through `ChannelService` (create,
  invite, leave, remove) calls `changed(channel_id)` once its write committed. A read
  that was in flight while a change happened is handed to its callers (it is what an
  uncached read would have returned) but not kept, so the next send reads again;
- bounded: an entry lives `ttl_s` seconds; only non-empty member lists are kept (an
  unknown or made-up channel id is never remembered, so probing ids does not fill the
  cache); at most `max_members` member ids over all entries, oldest entry dropped first.

One instance per store object (`for_store`), so the services of one server share it
without wiring: a change made by `ChannelService` is seen by the next
`MessageService.send` at once. Code that changes membership by calling the store
directly must call `ChannelMembers.for_store(store).changed(channel_id)` too.

Multi-node: a change made on another node (or directly in the database) is seen here
only when the entry expires, at most `ttl_s` later. Until then a member removed there
may still send into the channel from this node, and may still get offline-queue entries
for its messages (its live topic subscription is ended at once everywhere: that is a
backplane control delivery). A multi-node deployment (a shared backplane such as Redis)
therefore needs the invalidation to travel too: publish one "members changed"
notification per change on the backplane and have every node call `changed()` on it
(the broker, the backplane's only subscriber today, ignores unknown kinds, so this needs
a small broker hook), or construct the services with `ttl_s=0`, which disables the cache.
The in-process backplane is single-node, so this process is the only writer today.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import trio

from securecollab.store import Store

MEMBERS_CACHE_TTL_S = 2.0  # bound on staleness for changes this process did not make
MEMBERS_CACHE_MAX = 200_000  # member ids kept over all channels (~20 MB at most)


@dataclass(frozen=True, slots=True)
class Members:
    """One channel's members: ids in the store's order (joined_at, user_id), and as a set."""

    ids: tuple[str, ...]
    index: frozenset[str]

    def __contains__(self, user_id: object) -> bool:
        return user_id in self.index

    def others(self, user_id: str) -> list[str]:
        """Every member but `user_id` (the sender of a message), in order."""
        return [u for u in self.ids if u != user_id]


@dataclass(slots=True)
class _Entry:
    members: Members
    expires: float


_BY_STORE: weakref.WeakKeyDictionary[Store, ChannelMembers] = weakref.WeakKeyDictionary()


class ChannelMembers:
    """Read-through cache of channel member ids; see the module docstring."""

    def __init__(
        self,
        store: Store,
        ttl_s: float = MEMBERS_CACHE_TTL_S,
        max_members: int = MEMBERS_CACHE_MAX,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_members = max_members
        self._clock = clock  # seconds, monotonic
        self._entries: dict[str, _Entry] = {}  # insertion order = expiry order
        self._size = 0  # member ids over all entries
        self._loading: dict[str, trio.Event] = {}
        self._changes = 0  # bumped by every `changed`; a read spanning one is not kept

    @classmethod
    def for_store(cls, store: Store) -> ChannelMembers:
        """The instance shared by everything that uses this store object."""
        cache = _BY_STORE.get(store)
        if cache is None:
            cache = _BY_STORE[store] = cls(store)
        return cache

    async def get(self, channel_id: str) -> Members:
        """The channel's members (empty when there is no such channel)."""
        while True:
            entry = self._entries.get(channel_id)
            if entry is not None:
                if entry.expires > self._clock():
                    return entry.members
                self._drop(channel_id)
            loading = self._loading.get(channel_id)
            if loading is None:
                break
            await loading.wait()  # then look again: kept, or dropped by a change
        done = self._loading[channel_id] = trio.Event()
        changes = self._changes
        try:
            ids = tuple(m.user_id for m in await self.store.list_channel_members(channel_id))
        finally:
            del self._loading[channel_id]
            done.set()
        members = Members(ids, frozenset(ids))
        if changes == self._changes:
            self._keep(channel_id, members)
        return members

    def changed(self, channel_id: str) -> None:
        """Membership of `channel_id` changed (call after the write committed)."""
        self._changes += 1
        self._drop(channel_id)

    def _keep(self, channel_id: str, members: Members) -> None:
        size = len(members.ids)
        if self.ttl_s <= 0 or size == 0 or size > self.max_members:
            return
        self._drop(channel_id)
        while self._entries and self._size + size > self.max_members:
            self._drop(next(iter(self._entries)))
        self._entries[channel_id] = _Entry(members, self._clock() + self.ttl_s)
        self._size += size

    def _drop(self, channel_id: str) -> None:
        entry = self._entries.pop(channel_id, None)
        if entry is not None:
            self._size -= len(entry.members.ids)
