"""The STOMP door of messaging: `SEND /app/chat/send` and the broker's chat hooks.

`SEND /app/chat/send` takes the same JSON envelope as `POST /api/chat/send-message`
and runs the same `MessageService.send`, in its two halves (`submit`, then
`PendingSend.finish`): the handler is pipelined (`broker.core.AppHandler`), and the
broker sends the RECEIPT only after the completion returned, i.e. after the message
committed and its deliveries went out. Refusals (bad envelope,
plaintext, unknown recipient, not a channel member) become an ERROR frame through
`api.stomp_app.app_handler`, the one place service errors are mapped for STOMP.

Hooks filled here (see `securecollab/broker/__init__.py`):
- `can_subscribe_channel` / `channel_members`: channel membership (the member ids
  through the send path's cache, `services.membership`);
- `initial_messages`: the user's offline queue, oldest first, delivered on SUBSCRIBE
  to `/user/queue/private` before live messages;
- `on_delivered`: remove delivered messages from the offline queue (delete on ack),
  skipping the store for messages this process knows were never queued for that user;
- `delivered_filter`: that skip, synchronously (`MessageService.may_be_queued`), so
  the broker reports a delivered live message only when it may have a queue entry;
- `on_undelivered`: queue private messages that did not reach the client (at-least-once);
- `peers_of`: users sharing a channel or conversation (presence visibility).
"""

from __future__ import annotations

import stomp
from securecollab.api.stomp_app import app_handler, json_body
from securecollab.broker.core import Broker, Completion
from securecollab.broker.hooks import InitialMessage, SessionInfo
from securecollab.services.channels import ChannelService
from securecollab.services.messages import MessageService, message_body
from securecollab.services.offline import OfflineService
from securecollab.store import Store

SEND_DESTINATION = "/app/chat/send"
JSON = (("content-type", "application/json"),)


class StompChat:
    """Registers the chat handler and hooks on one broker."""

    def __init__(
        self,
        broker: Broker,
        store: Store,
        messages: MessageService,
        channels: ChannelService,
        offline: OfflineService,
    ) -> None:
        self.store = store
        self.messages = messages
        self.channels = channels
        self.offline = offline
        # base64 inflates by 4/3; keys and field names need room too
        self.max_body = messages.max_content_bytes * 2 + 256 * 1024
        hooks = broker.hooks
        hooks.can_subscribe_channel = self.can_subscribe_channel
        hooks.channel_members = self.channel_members
        hooks.initial_messages = self.initial_messages
        hooks.on_delivered = self.delivered
        hooks.delivered_filter = self.messages.may_be_queued
        hooks.on_undelivered = self.messages.hand_back
        hooks.peers_of = self.store.peers_of
        broker.register_app_handler(SEND_DESTINATION, app_handler(self.send), pipelined=True)

    async def send(self, session: SessionInfo, frame: stomp.Frame) -> Completion:
        """SEND /app/chat/send: validate and queue the write; the completion waits for the
        commit and delivers (the RECEIPT follows it). Pipelined: the connection's next
        frames are read while this message commits."""
        sending = await self.messages.submit(
            session.user_id, json_body(frame, self.max_body), session_id=session.session_id
        )
        return sending.finish

    async def can_subscribe_channel(self, user_id: str, channel_id: str) -> bool:
        return await self.channels.is_member(user_id, channel_id)

    async def channel_members(self, channel_id: str) -> set[str]:
        return set((await self.messages.members.get(channel_id)).ids)

    async def delivered(self, user_id: str, message_ids: list[str]) -> None:
        """Broker hook: ack delivered messages in the offline queue (those that may be there).

        Filtering again is harmless: `may_be_queued` keeps every id it does not know.
        """
        await self.offline.delivered(user_id, self.messages.may_be_queued(user_id, message_ids))

    async def initial_messages(self, user_id: str) -> list[InitialMessage]:
        """The offline queue as MESSAGE frames, oldest first (removed only once delivered)."""
        entries = await self.offline.pending(user_id)
        self.messages.queued_out(user_id, [e.message.id for e in entries])
        return [InitialMessage(e.message.id, message_body(e.message), JSON) for e in entries]
