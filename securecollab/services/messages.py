"""Sending and reading E2EE messages: the one implementation behind both doors.

`MessageService.send` is what `POST /api/chat/send-message` and `SEND /app/chat/send`
call. Its order of work is the durability contract:

1. validate the envelope (`services.envelope`) and authorize (recipient exists, or
   the sender is a member of the channel). Both answers come from small caches: known
   recipients (`KnownRecipients`, 2 s) and channel member ids
   (`services.membership.ChannelMembers`, invalidated by every `ChannelService` change);
2. ONE store write (`submit_message`) puts the message row, the offline-queue
   entries for recipients with no live session, and an outbox row (topic
   `chat.messages`, keyed by the message id) in one commit. `send` waits for it; the
   STOMP door splits `send` in two (`submit`, then `PendingSend.finish`) so that one
   connection's SENDs are pipelined: each is queued in frame order and finished in
   the same order, while the next frames are read;
3. only then publish deliveries through the backplane, and only then does the caller
   answer 2xx / RECEIPT. A 2xx or a RECEIPT therefore means "durable".

Deliveries: a 1:1 message goes to the recipient's sessions and to the sender's OTHER
sessions on `/user/queue/private`; a channel message to `/topic/messages/{id}`. The
sending STOMP session never gets a copy of its own message (its RECEIPT says it was
stored); a REST send has no session, so every session of the sender gets the copy.

Idempotency: a send with a `clientMessageId` the same sender already used returns the
original message (`created=False`) and publishes nothing again.

Offline queue: a 1:1 message is queued for the recipient in the same commit when no
session of the recipient is SUBSCRIBED to `/user/queue/private` (the broker registers
those subscriptions in the backplane; merely being connected is not enough, as
nothing would be delivered). A message that was sent live but did not reach the
recipient (its session was closing or too slow, the frame was never written, or it
was never ACKed in a client ack mode) is handed back by the broker and queued then
(`hand_back`). With the broker's "queued first, de-duplicated by message-id" SUBSCRIBE
path this makes `/user/queue/private` at-least-once, even for clients that never fetch
history. Channel messages are queued too, for every member other than the sender who
has no live session (presence), and reach them on `/user/queue/private` with
`channelId` set; their live copies on `/topic/messages/{id}` are not handed back.
Queueing is per user, not per device: a device that was offline while another of the
user's devices received a message catches up through history, and a user's own
messages are never queued for it.

History is newest first; `limit` is 1..`MAX_PAGE_LIMIT` (more is refused, not clamped,
so a client never silently gets fewer rows than it asked for).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

import trio

from securecollab.backplane import Backplane, Delivery
from securecollab.ids import now_ms, user_key, uuid7
from securecollab.records import record
from securecollab.services.envelope import Envelope, parse_envelope
from securecollab.services.errors import InvalidInput, NotFoundError
from securecollab.services.membership import ChannelMembers
from securecollab.settle import settle_scope
from securecollab.store import (
    Committing,
    Conflict,
    InsertResult,
    MessageRecord,
    OutboxRecord,
    Page,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

PRIVATE_QUEUE = "/user/queue/private"
MESSAGES_TOPIC = "chat.messages"
MAX_PAGE_LIMIT = 200
MAX_PAGE_OFFSET = 100_000
JSON_HEADERS = (("content-type", "application/json"),)
RECIPIENT_CACHE_TTL_S = 2.0  # how long "this recipient exists" is trusted without a read
RECIPIENT_CACHE_MAX = 10_000  # users remembered; the oldest entry goes first
NOT_QUEUED_MAX = 32_768  # (user, message) pairs remembered as never queued (~6 MB at most)

# compact JSON, one encoder for every call (json.dumps with options builds one per call)
_compact_json = json.JSONEncoder(separators=(",", ":")).encode
# what that encoder writes for a str (ensure_ascii) and an int
_str = encode_basestring_ascii
_int = int.__repr__


def channel_topic(channel_id: str) -> str:
    """The STOMP topic a channel's messages are delivered on."""
    return f"/topic/messages/{channel_id}"


def message_json(m: MessageRecord) -> dict[str, Any]:
    """The client-facing shape of a message (delivery bodies and history rows)."""
    return {
        "id": m.id,
        "from": m.sender_id,
        "to": m.recipient_id,
        "channelId": m.channel_id,
        "encryptedContent": m.encrypted_content,
        "iv": m.iv,
        "keys": m.keys,
        "createdAt": m.created_at,
        # The SDK binds clientMessageId into the AES-GCM associated data, so a
        # reader needs it to decrypt.
        "clientMessageId": m.client_message_id,
    }


def message_body(m: MessageRecord, *, base64_checked: bool = False) -> bytes:
    """A delivery body: compact UTF-8 JSON of `message_json`.

    Written out field by field (every string through the encoder's own C escaper, so
    the bytes are exactly `_compact_json(message_json(m))`): ~2 us less per message
    than building the dict and running the encoder on it.

    `base64_checked`: the base64 fields (encryptedContent, iv, the wrapped keys) passed
    `parse_envelope`, so they hold only A-Z a-z 0-9 + / =, which the escaper leaves as
    they are: they are just quoted (the same bytes, ~1 us less for a send's delivery).
    """
    rid, cid, cmid = m.recipient_id, m.channel_id, m.client_message_id
    if base64_checked:
        content, iv = f'"{m.encrypted_content}"', f'"{m.iv}"'
        keys = ",".join([f'{_str(k)}:"{v}"' for k, v in m.keys.items()])
    else:
        content, iv = _str(m.encrypted_content), _str(m.iv)
        keys = ",".join([f"{_str(k)}:{_str(v)}" for k, v in m.keys.items()])
    return (
        f'{{"id":{_str(m.id)},"from":{_str(m.sender_id)},'
        f'"to":{"null" if rid is None else _str(rid)},'
        f'"channelId":{"null" if cid is None else _str(cid)},'
        f'"encryptedContent":{content},"iv":{iv},'
        f'"keys":{{{keys}}},"createdAt":{_int(m.created_at)},'
        f'"clientMessageId":{"null" if cmid is None else _str(cmid)}}}'
    ).encode()


def outbox_payload(m: MessageRecord, content_bytes: int) -> bytes:
    """The `chat.messages` outbox event of a message: metadata only (the event log has no
    use for ciphertext it cannot read). Compact JSON, written out like `message_body`."""
    rid, cid = m.recipient_id, m.channel_id
    return (
        f'{{"id":{_str(m.id)},"from":{_str(m.sender_id)},'
        f'"to":{"null" if rid is None else _str(rid)},'
        f'"channelId":{"null" if cid is None else _str(cid)},'
        f'"createdAt":{_int(m.created_at)},"contentBytes":{_int(content_bytes)}}}'
    ).encode()


@record  # built per message: not frozen at runtime (see securecollab.records)
class SendResult:
    message: MessageRecord
    created: bool  # False on an idempotent retry (clientMessageId seen before)


@record  # built per message: not frozen at runtime (see securecollab.records)
class PendingSend:
    """A submitted message whose commit may still be on its way (`MessageService.submit`)."""

    _service: MessageService
    message: MessageRecord
    _committing: Committing[InsertResult]
    _others: list[str]
    _offline: list[str]
    _expires_at: int
    _outbox: OutboxRecord
    _session_id: str | None

    async def finish(self) -> SendResult:
        """Wait for the commit, then deliver; the result of the send.

        Cancelled (the connection closing, a server shutdown; also when called in an
        already cancelled scope), it first settles the write, shielded and bounded by
        `settle.settle_scope()`: waits for the commit and delivers what this send stored; then
        the cancellation goes on.
        """
        try:
            result = await self._committing.wait()
        except trio.Cancelled:
            with settle_scope():
                await self._settle()
            raise
        await self._delivered(result, base64_checked=result.message is self.message)
        return SendResult(result.message, result.created)

    async def _settle(self) -> None:
        """The write's outcome (the same write: its handle waits again), then its
        deliveries. A failed write is tried once more, as a client's retry would be
        (idempotent: a write that did commit after all comes back created=False, or
        conflicts on its id)."""
        try:
            result = await self._committing.wait()
        except StoreError:
            try:
                again = await self._service.store.insert_message(
                    self.message,
                    offline_for=self._offline,
                    offline_expires_at=self._expires_at,
                    outbox=[self._outbox],
                )
                # This message back (created=False when its clientMessageId found the
                # first write committed after all): it is this send's to deliver. Another
                # message back: this send repeated an earlier one, delivered back then.
                result = InsertResult(again.message, created=again.message.id == self.message.id)
            except Conflict:
                # its id is taken: the first write did commit (the store failed after it)
                try:
                    stored = await self._service.store.get_message(self.message.id)
                except StoreError:
                    stored = None
                if stored is None:
                    log.error("cancelled send of message %s: outcome unknown", self.message.id)
                    return
                result = InsertResult(stored, created=True)
            except StoreError:
                log.exception("cancelled send of message %s: outcome unknown", self.message.id)
                return
        await self._delivered(result)

    async def _delivered(self, result: InsertResult, *, base64_checked: bool = False) -> None:
        """Deliver what this send created (an idempotent retry delivers nothing again)."""
        if result.created:
            service = self._service
            service._created(result.message, self._others, self._offline)
            # the message as inserted: its base64 fields are the envelope's, checked
            await service._deliver(result.message, self._session_id, base64_checked=base64_checked)


def parse_page(params: Mapping[str, str]) -> Page:
    """Build a `Page` from query parameters; raise InvalidInput naming the bad one.

    limit 1..200 (default 50), offset 0..100000 (default 0), fromDate/toDate ms epoch,
    before = a message id (cursor: only older messages).
    """

    def as_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
        raw = params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be an integer") from None
        if not lo <= value <= hi:
            raise InvalidInput(f"{name} must be between {lo} and {hi}")
        return value

    limit = as_int("limit", 50, 1, MAX_PAGE_LIMIT)
    offset = as_int("offset", 0, 0, MAX_PAGE_OFFSET)
    from_date = as_int("fromDate", None, 0, 2**53)
    to_date = as_int("toDate", None, 0, 2**53)
    if from_date is not None and to_date is not None and from_date > to_date:
        raise InvalidInput("fromDate must not be after toDate")
    before = params.get("before") or None
    if before is not None and (len(before) > 64 or not before.replace("-", "").isalnum()):
        raise InvalidInput("before must be a message id")
    assert limit is not None and offset is not None
    return Page(limit=limit, offset=offset, from_date=from_date, to_date=to_date, before_id=before)


class KnownRecipients:
    """A small cache of recipients known to exist: user key -> (stored userId, expiry).

    Why: checking "does the recipient exist" was a store read (a worker-thread hop)
    on every 1:1 send, ~10 % of the event loop's time under load. Only positive
    answers are kept (a user registered a moment ago is found at once), for
    `ttl_s` seconds, at most `max_entries` (oldest dropped first; all expired ones are
    dropped lazily).

    Trade-off: a user deleted (`deleted_at` set) less than `ttl_s` ago may still
    receive a message from a sender whose check hit the cache: the same outcome as a
    send that committed just before the deletion. (Accounts are deleted by the store
    call `set_user_deleted`, which no request path of this process makes today.)
    """

    def __init__(
        self,
        ttl_s: float = RECIPIENT_CACHE_TTL_S,
        max_entries: int = RECIPIENT_CACHE_MAX,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock  # seconds, monotonic
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()  # see NotQueued

    def get(self, user_id: str) -> str | None:
        """The stored spelling of `user_id` if known to exist (and not expired), else None."""
        key = user_key(user_id)
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[1] <= self._clock():
            del self._entries[key]
            return None
        return hit[0]

    def put(self, user_id: str) -> None:
        """Remember that `user_id` (its stored spelling) exists, for `ttl_s`."""
        if self.ttl_s <= 0 or self.max_entries <= 0:
            return
        key = user_key(user_id)
        self._entries.pop(key, None)  # re-insert at the end: FIFO order = expiry order
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = (user_id, self._clock() + self.ttl_s)


class NotQueued:
    """(user, message id) pairs this process knows have no offline-queue entry.

    Why: the broker reports every message of `/user/queue/private` that reached a
    client (`on_delivered`), and acking it used to be a store write (a DELETE that
    found nothing, for nearly every live 1:1 message). A pair is added when this
    process committed a 1:1 message without queueing it for that user (a subscribed
    recipient; the sender's own sync copy, never queued for its sender), and removed
    when the message is handed back (queued after all), when it comes out of the
    queue (`initial_messages`), or once its delivery was reported. An unknown pair
    (sent by another node, or evicted: at most `max_entries`, oldest first) is acked
    in the store as before, so a miss costs one write, never a message.
    """

    def __init__(self, max_entries: int = NOT_QUEUED_MAX) -> None:
        self.max_entries = max_entries
        # An OrderedDict, not a dict: once full, every add evicts the oldest pair, and
        # `next(iter(dict))` walks the dict's deleted slots from the front (measured at
        # 32,768 pairs: 6.7 us per add, against 0.5 us with popitem(last=False)).
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()

    def add(self, user_id: str, message_id: str) -> None:
        """`message_id` was committed without a queue entry for `user_id`."""
        if self.max_entries <= 0:
            return
        pairs = self._pairs
        while len(pairs) >= self.max_entries:
            pairs.popitem(last=False)
        pairs[(user_key(user_id), message_id)] = None

    def discard(self, user_id: str, message_ids: list[str]) -> None:
        """These messages are (or may now be) queued for `user_id`."""
        key = user_key(user_id)
        for message_id in message_ids:
            self._pairs.pop((key, message_id), None)

    def may_be_queued(self, user_id: str, message_ids: list[str]) -> list[str]:
        """The ids that may have a queue entry for `user_id` (the rest are forgotten)."""
        key = user_key(user_id)
        return [m for m in message_ids if self._pairs.pop((key, m), 0) is not None]


class MessageService:
    """Send, deliver and page messages. State: its ports and two small in-memory caches."""

    def __init__(
        self,
        store: Store,
        backplane: Backplane,
        *,
        max_content_bytes: int = 65536,
        offline_ttl_ms: int = 7 * 24 * 3600 * 1000,
        recipient_cache_ttl_s: float = RECIPIENT_CACHE_TTL_S,
        members: ChannelMembers | None = None,
    ) -> None:
        self.store = store
        self.backplane = backplane
        self.max_content_bytes = max_content_bytes
        self.offline_ttl_ms = offline_ttl_ms
        self.known_recipients = KnownRecipients(recipient_cache_ttl_s)
        self.not_queued = NotQueued()
        # shared with ChannelService (same store object), which invalidates it
        self.members = members if members is not None else ChannelMembers.for_store(store)

    # ------------------------------------------------------------------ sending
    async def send(
        self, sender_id: str, payload: object, *, session_id: str | None = None
    ) -> SendResult:
        """Validate, durably store, then deliver one message.

        `payload` is the decoded JSON the client sent. `session_id` is the sending
        STOMP session (excluded from multi-device sync); None for REST sends.
        Raises InvalidInput (bad envelope), NotFoundError (unknown recipient or channel, or a
        channel the sender is not in).
        """
        sending = await self.submit(sender_id, payload, session_id=session_id)
        return await sending.finish()

    async def submit(
        self, sender_id: str, payload: object, *, session_id: str | None = None
    ) -> PendingSend:
        """The first half of `send`: validate, authorize and queue the store write; the
        returned `PendingSend.finish()` waits for the commit and delivers.

        A STOMP connection's pipelined SENDs: each is submitted in frame order (the store
        commits in submission order) and finished in the same order, so its messages are
        delivered in the order they were sent. Raises like `send`, before anything was
        queued. Once this returned the write is queued: the caller must call `finish()`
        (in a cancelled scope too: it then settles the write, shielded).
        """
        env = parse_envelope(payload, max_content_bytes=self.max_content_bytes)
        if env.to is not None:
            recipient_id = self.known_recipients.get(env.to)  # no coroutine on a hit
            if recipient_id is None:
                recipient_id = await self._direct_recipient(env)
            others = [] if recipient_id == sender_id else [recipient_id]
        else:
            assert env.channel_id is not None
            others, recipient_id = await self._channel_others(sender_id, env.channel_id), None

        now = now_ms()
        message = MessageRecord(
            id=uuid7(),
            sender_id=sender_id,
            recipient_id=recipient_id,
            channel_id=env.channel_id,
            encrypted_content=env.encrypted_content,
            iv=env.iv,
            keys=env.keys,
            created_at=now,
            client_message_id=env.client_message_id,
        )
        if env.channel_id is None:
            # 1:1: the users with no session subscribed to the private queue on any node
            offline = []
            if others:
                live = await self.backplane.subscribed_users(PRIVATE_QUEUE, others, now)
                if len(live) < len(others):
                    offline = [u for u in others if u not in live]
        else:
            offline = await self._offline_users(others, now)
        outbox = OutboxRecord(
            id=message.id,
            topic=MESSAGES_TOPIC,
            key=message.id,
            # Metadata only: the event log has no use for ciphertext it cannot read.
            payload=outbox_payload(message, len(env.encrypted_content) * 3 // 4),
            created_at=now,
        )
        # Once handed to the store the message may commit; from then on its delivery
        # must be attempted even if the caller is cancelled (its connection closing, a
        # server shutdown), or a message the recipient was online for would be stored
        # but never delivered nor queued. No shield on the way (a CancelScope per send
        # was ~5 % of the event loop): a cancelled `finish` settles the write itself.
        expires_at = now + self.offline_ttl_ms
        committing = await self.store.submit_message(
            message, offline_for=offline, offline_expires_at=expires_at, outbox=[outbox]
        )
        return PendingSend(
            self, message, committing, others, offline, expires_at, outbox, session_id
        )

    def _created(self, m: MessageRecord, others: list[str], offline: list[str]) -> None:
        """Bookkeeping for a message this process committed, before its deliveries go
        out (their on_delivered may come at once)."""
        if m.channel_id is None:  # the sender, and `others` (1:1: the recipient) but offline
            add = self.not_queued.add
            add(m.sender_id, m.id)
            for user_id in others:
                if user_id != m.sender_id and user_id not in offline:
                    add(user_id, m.id)

    async def _direct_recipient(self, env: Envelope) -> str:
        """The recipient's stored userId; NotFoundError when unknown or deleted."""
        assert env.to is not None
        known = self.known_recipients.get(env.to)
        if known is not None:
            return known
        user = await self.store.get_user(env.to)
        if user is None or user.deleted_at is not None:
            raise NotFoundError(f"recipient {env.to} does not exist")
        self.known_recipients.put(user.user_id)
        return user.user_id  # the stored spelling, not the client's

    async def _channel_others(self, sender_id: str, channel_id: str) -> list[str]:
        """The channel's members but the sender; NotFoundError when the sender is not one."""
        members = await self.members.get(channel_id)
        if sender_id not in members:
            # Same answer for "no such channel" and "not a member": no probing.
            raise NotFoundError(f"channel {channel_id} not found")
        return members.others(sender_id)

    async def hand_back(self, user_id: str, message_ids: list[str]) -> None:
        """Broker hook `on_undelivered`: queue messages that did not reach `user_id` live.

        Idempotent (already queued: kept as is); messages the user sent are skipped.
        """
        if message_ids:
            self.not_queued.discard(user_id, message_ids)
            await self.store.enqueue_offline(user_id, message_ids, now_ms() + self.offline_ttl_ms)

    def may_be_queued(self, user_id: str, message_ids: list[str]) -> list[str]:
        """Of these messages delivered to `user_id`, those that may have a queue entry.

        For the `on_delivered` hook: the others were never queued for that user, so
        acking them would be a store write that deletes nothing.
        """
        return self.not_queued.may_be_queued(user_id, message_ids)

    def queued_out(self, user_id: str, message_ids: list[str]) -> None:
        """These messages were read from `user_id`'s queue (they are queued)."""
        self.not_queued.discard(user_id, message_ids)

    async def _offline_users(self, user_ids: list[str], now: int) -> list[str]:
        """Users with no live session on any node (presence status OFFLINE)."""
        if not user_ids:
            return []
        return await self.backplane.presence_offline(user_ids, now)

    async def _deliver(
        self, m: MessageRecord, session_id: str | None, *, base64_checked: bool = False
    ) -> None:
        """Publish the committed message; a fan-out failure never undoes a send.

        `base64_checked`: as for `message_body` (`m` is the envelope of this send)."""
        body = message_body(m, base64_checked=base64_checked)
        deliveries: list[Delivery] = []
        if m.channel_id is not None:
            deliveries.append(
                Delivery(
                    kind="topic",
                    destination=channel_topic(m.channel_id),
                    body=body,
                    headers=JSON_HEADERS,
                    message_id=m.id,
                    exclude_session=session_id,
                )
            )
        else:
            assert m.recipient_id is not None
            if m.recipient_id != m.sender_id:
                deliveries.append(
                    Delivery(
                        kind="user",
                        destination=PRIVATE_QUEUE,
                        body=body,
                        headers=JSON_HEADERS,
                        user_id=m.recipient_id,
                        message_id=m.id,
                    )
                )
            # Multi-device sync: the sender's other sessions see what this one sent.
            deliveries.append(
                Delivery(
                    kind="user",
                    destination=PRIVATE_QUEUE,
                    body=body,
                    headers=JSON_HEADERS,
                    user_id=m.sender_id,
                    message_id=m.id,
                    exclude_session=session_id,
                )
            )
        for i, d in enumerate(deliveries):
            try:
                await self.backplane.publish(d)
            except trio.Cancelled:
                # A backplane that waits (a network one; the memory backplane never
                # does) was interrupted: publish this delivery again (at-least-once)
                # and the rest, shielded and bounded, then let the cancellation go on.
                with settle_scope():
                    for rest in deliveries[i:]:
                        await self._publish(rest)
                raise
            except Exception:
                # The message is committed (history, offline queue, outbox); a lost
                # live delivery is recovered by the client's history fetch.
                log.exception("delivery of message %s failed", m.id)

    async def _publish(self, d: Delivery) -> None:
        try:
            await self.backplane.publish(d)
        except Exception:
            log.exception("delivery of message %s failed", d.message_id)

    # ------------------------------------------------------------------ reading
    async def direct_history(self, user_id: str, with_user: str, page: Page) -> list[MessageRecord]:
        """The caller's 1:1 conversation with `with_user`, newest first.

        Only ever the caller's own conversation: the caller is always one side.
        """
        other = await self.store.get_user(with_user)
        if other is None:
            raise NotFoundError(f"user {with_user} does not exist")
        return await self.store.list_direct_messages(user_id, other.user_id, page)

    async def channel_history(
        self, user_id: str, channel_id: str, page: Page
    ) -> list[MessageRecord]:
        """A channel's messages, newest first; members only (others get NotFoundError)."""
        if await self.store.get_member(channel_id, user_id) is None:
            raise NotFoundError(f"channel {channel_id} not found")
        return await self.store.list_channel_messages(channel_id, page)
