"""The offline queue: messages waiting for a user who had no live session.

Entries are written by `MessageService.send` in the same commit as the message and
expire after `[messages] offline_ttl_days` (7 by default).

Delete on ack, not on retrieval. The original design deleted queued messages when
`GET /api/chat/offline-messages` returned them; a crash or a dropped connection
between the read and the client storing them then lost messages. Here an entry
leaves the queue only when the client acknowledged it:

- REST: `GET /api/chat/offline-messages` only reads; `POST
  /api/chat/offline-messages/ack {ids}` deletes (the caller's own entries only: the
  store call is keyed by the caller, so another user's ids match nothing);
- STOMP: on SUBSCRIBE to `/user/queue/private` the broker asks `initial_messages`
  and delivers them first, oldest first; it reports `on_delivered` when the client
  ACKed them (ack `client` / `client-individual`) or, for `ack:auto`, when the frame
  was written to the socket. Live deliveries of messages that were also queued are
  acknowledged the same way, so nothing is delivered twice on the next connect.

`prune_expired` runs every `[messages] offline_prune_interval_s` (hourly) and counts
what it deleted in `securecollab_offline_pruned_total`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from prometheus_client import Counter

from securecollab.ids import now_ms
from securecollab.services.errors import InvalidInput
from securecollab.store import OfflineEntry, Store

log = logging.getLogger(__name__)

MAX_ACK_IDS = 1000
MAX_LIST = 500

OFFLINE_PRUNED = Counter(
    "securecollab_offline_pruned_total", "Offline-queue entries deleted because their TTL passed"
)


class OfflineService:
    """Read, acknowledge and expire a user's queued messages."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def pending(self, user_id: str, *, limit: int = MAX_LIST) -> list[OfflineEntry]:
        """The user's unexpired queued messages, oldest first (at most `limit`)."""
        return await self.store.list_offline(user_id, now=now_ms(), limit=limit)

    async def ack(self, user_id: str, ids: object) -> int:
        """Remove the user's entries for these message ids; return how many went.

        Idempotent: acking an id twice, or an id that is not in the caller's queue,
        removes nothing and is not an error.
        """
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise InvalidInput("ids must be a list of message ids")
        if len(ids) > MAX_ACK_IDS:
            raise InvalidInput(f"at most {MAX_ACK_IDS} ids per ack")
        if not ids:
            return 0
        return await self.store.ack_offline(user_id, ids)

    async def delivered(self, user_id: str, message_ids: Sequence[str]) -> None:
        """Broker hook: these messages reached the user (ACKed, or written for ack:auto)."""
        if message_ids:
            await self.store.ack_offline(user_id, list(message_ids))

    async def prune_expired(self) -> int:
        """Delete expired entries now; return and count how many."""
        pruned = await self.store.prune_offline(now_ms())
        OFFLINE_PRUNED.inc(pruned)
        if pruned:
            log.info("offline queue: pruned %d expired entries", pruned)
        return pruned

    async def run_prune_job(
        self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Periodic job: prune at start, then every `interval_s` seconds, until cancelled."""
        task_status.started()
        while True:
            try:
                await self.prune_expired()
            except Exception:
                # A store hiccup must not end the job; the next run catches up.
                log.exception("offline queue prune failed")
            await trio.sleep(interval_s)
