"""The high-level SDK: log in, keep a device identity, send and read E2EE text messages.

    async with Client.login(url, "alice@example.com", password, device_id="laptop",
                            keystore_path="alice-laptop.key") as alice:
        await alice.send_text("bob@example.com", "hi")
        async for item in alice.messages():          # ReceivedMessage | UndecryptableMessage
            print(item.sender, item.text)

What it does for you:

- Device identity: on first use it generates the device's X25519 key pair, saves it
  (mode 0600, passphrase-encrypted if a passphrase is given, see `keystore`) and
  registers the public key with the server's key directory; later logins load it and
  re-register it if the directory lost or replaced it.
- Sending: the recipients' devices (every member's for a channel) and the sender's own
  devices come from the key directory, cached for `key_cache_ttl_s` (30 s); the text is
  encrypted with `e2ee.encrypt_message` and sent over STOMP with a receipt (retried
  across reconnects with the same clientMessageId) or, without a live STOMP session,
  over REST. Both mean "stored" when they return.
- Receiving (`messages()`): `/user/queue/private` (ack client-individual, ACKed after
  your loop body ran, so the server's offline queue drops it only then), every
  channel you are in (and ones you are invited to later, via `/user/queue/channels`).
  Duplicates are dropped by message id; after a reconnect the conversations seen in
  this session are caught up from history, so a message the dying connection lost
  still arrives (once).
- Decryption failures are never shown as text: they arrive as `UndecryptableMessage`
  carrying the `DecryptionError`.

A device registered after a message was sent cannot read that message: its key was
not among the wrapped keys, and there is no key backup (by design, see ENVELOPE.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from securecollab.client import keystore
from securecollab.client.e2ee import (
    DecryptionError,
    DeviceKey,
    RecipientDevice,
    check_device_id,
    decrypt_text,
    encrypt_message,
)
from securecollab.client.rest import (
    Channel,
    ClientError,
    DeviceKeyInfo,
    Message,
    NotFoundError,
    RestClient,
    Session,
    SessionCallback,
)
from securecollab.client.stomp_ws import (
    Backoff,
    StompClient,
    StompMessage,
    StompSubscription,
    open_stomp,
    single_exception,
    ws_url,
)

log = logging.getLogger(__name__)

PRIVATE_QUEUE = "/user/queue/private"
CHANNEL_EVENTS = "/user/queue/channels"
SEND_DESTINATION = "/app/chat/send"
CATCH_UP_MARGIN_MS = 60_000  # history catch-up looks this far behind the disconnect (clock skew)
HISTORY_PAGE = 200


def channel_topic(channel_id: str) -> str:
    return f"/topic/messages/{channel_id}"


class NoDeviceKey(ClientError):
    """The recipient has no registered device key, so nobody could read the message."""


class UnknownUser(ClientError):
    """No such user (or not visible to you)."""


class DeviceKeyMismatch(ClientError):
    """The key file belongs to another user or device than the one logging in."""


@dataclass(frozen=True)
class ReceivedMessage:
    """A decrypted text message."""

    id: str
    sender: str
    to: str | None
    channel_id: str | None
    text: str
    created_at: int  # ms since the epoch (server time)


@dataclass(frozen=True)
class UndecryptableMessage:
    """A message this device cannot read; `error.reason` says why (see DecryptionError).

    Deliberately has no text: undecryptable bytes are never shown.
    """

    id: str
    sender: str
    to: str | None
    channel_id: str | None
    created_at: int
    error: DecryptionError = field(compare=False)


Item = ReceivedMessage | UndecryptableMessage


@dataclass(frozen=True)
class SentMessage:
    """What a send returns: the server id when it is known (REST), always the clientMessageId."""

    client_message_id: str
    id: str | None = None
    created_at: int | None = None
    via: str = "stomp"  # "stomp" | "rest"


def _item_from(raw: Mapping[str, Any], device: DeviceKey) -> Item:
    """Decrypt one message as delivered (MESSAGE body or history row)."""
    mid = str(raw.get("id") or "")
    sender = str(raw.get("from") or "")
    to = raw.get("to") if isinstance(raw.get("to"), str) else None
    channel = raw.get("channelId") if isinstance(raw.get("channelId"), str) else None
    created = raw.get("createdAt")
    created_at = created if isinstance(created, int) and not isinstance(created, bool) else 0
    try:
        text = decrypt_text(raw, device)
    except DecryptionError as exc:
        return UndecryptableMessage(mid, sender, to, channel, created_at, exc)
    return ReceivedMessage(mid, sender, to, channel, text, created_at)


class _TtlCache:
    """A small time-bounded cache (key directory answers, channel members)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        hit = self._data.get(key)
        if hit is None or self._clock() - hit[0] > self.ttl_s:
            self._data.pop(key, None)
            return None
        return hit[1]

    def put(self, key: str, value: Any) -> None:
        self._data[key] = (self._clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > 1024:
            self._data.popitem(last=False)

    def drop(self, key: str) -> None:
        self._data.pop(key, None)


async def ensure_device_key(
    rest: RestClient,
    user_id: str,
    device_id: str,
    keystore_path: str | os.PathLike[str],
    passphrase: str | None = None,
) -> DeviceKey:
    """Load this device's key, or make, save (0600) and register it on first use.

    Also re-registers a loaded key the directory does not hold (deleted, or replaced by
    another install of the same device id). Raises keystore errors (wrong passphrase...),
    DeviceKeyMismatch, ClientError.
    """
    path = Path(keystore_path)
    check_device_id(device_id)
    if await trio.to_thread.run_sync(path.exists):
        device = await trio.to_thread.run_sync(
            lambda: keystore.load_device_key(path, passphrase=passphrase)
        )
        if (device.user_id, device.device_id) != (user_id, device_id):
            raise DeviceKeyMismatch(
                f"{path} holds the key of {device.user_id}/{device.device_id}, "
                f"not {user_id}/{device_id}"
            )
    else:
        device = DeviceKey.generate(user_id, device_id)
        await trio.to_thread.run_sync(
            lambda: keystore.save_device_key(path, device, passphrase=passphrase)
        )
    try:
        published = await rest.get_key(user_id, device_id)
        current = published.public_key.strip() == device.public_pem().strip()
    except NotFoundError:
        current = False
    if not current:
        await rest.register_key(device_id, device.public_pem())
    return device


class Client:
    """A logged-in user on one device; use `Client.login(...)` or `Client.resume(...)`."""

    def __init__(
        self,
        rest: RestClient,
        device: DeviceKey,
        *,
        key_cache_ttl_s: float = 30.0,
    ) -> None:
        self.rest = rest
        self.device = device
        self.user_id = device.user_id
        self.stomp: StompClient | None = None
        self._keys = _TtlCache(key_cache_ttl_s)
        self._members = _TtlCache(key_cache_ttl_s)
        self._peers: set[str] = set()  # 1:1 conversations seen this session (for catch-up)
        self._channels: set[str] = set()
        self._sent_cmids: OrderedDict[str, None] = OrderedDict()
        self._followed: set[str] = set()  # channel topics subscribed by messages()
        self._following: set[str] = set()  # ... or being subscribed right now
        self._channel_subs: dict[str, StompSubscription] = {}
        self._follow_changed = trio.Event()
        self._nursery: trio.Nursery | None = None  # background pumps (realtime clients)
        self._inbox: trio.MemoryReceiveChannel[tuple[Mapping[str, Any], str | None]] | None = None

    # ------------------------------------------------------------ opening

    @classmethod
    @asynccontextmanager
    async def login(
        cls,
        url: str,
        user_id: str,
        password: str,
        device_id: str,
        keystore_path: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        realtime: bool = True,
        on_session: SessionCallback | None = None,
        **options: Any,
    ) -> AsyncIterator[Client]:
        """Log in with a password, ensure the device key, and (if `realtime`) open STOMP.

        Options: `key_cache_ttl_s`, and for STOMP `backoff`, `heartbeat`, `send_timeout`,
        `on_state`. Raises AuthError (bad password), ServerUnavailable, keystore errors.
        """
        rest = RestClient(url, on_session=on_session)
        try:
            await rest.login(user_id, password, device_id=device_id)
            async with cls._open(
                rest, device_id, keystore_path, passphrase, realtime, options
            ) as c:
                yield c
        finally:
            await rest.aclose()

    @classmethod
    @asynccontextmanager
    async def resume(
        cls,
        url: str,
        session: Session,
        keystore_path: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        realtime: bool = True,
        on_session: SessionCallback | None = None,
        **options: Any,
    ) -> AsyncIterator[Client]:
        """Like `login`, from a saved `Session` (refreshed automatically when due)."""
        if not session.device_id:
            raise ValueError("the saved session has no device id")
        rest = RestClient(url, session=session, on_session=on_session)
        try:
            async with cls._open(
                rest, session.device_id, keystore_path, passphrase, realtime, options
            ) as c:
                yield c
        finally:
            await rest.aclose()

    @classmethod
    @asynccontextmanager
    async def _open(
        cls,
        rest: RestClient,
        device_id: str,
        keystore_path: str | os.PathLike[str],
        passphrase: str | None,
        realtime: bool,
        options: dict[str, Any],
    ) -> AsyncIterator[Client]:
        session = rest.session
        assert session is not None
        device = await ensure_device_key(
            rest, session.user_id, device_id, keystore_path, passphrase
        )
        client_opts = {k: options.pop(k) for k in ("key_cache_ttl_s",) if k in options}
        client = cls(rest, device, **client_opts)
        if not realtime:
            yield client
            return
        options.setdefault("backoff", Backoff())
        try:
            async with open_stomp(
                ws_url(rest.base_url), rest.access_token, device_id=device_id, **options
            ) as stomp:
                client.stomp = stomp
                async with trio.open_nursery() as nursery:
                    client._nursery = nursery
                    try:
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_exception(group) from None

    def following(self, channel_id: str) -> bool:
        """Whether `messages()` is subscribed to this channel's topic."""
        return channel_id in self._followed

    async def wait_following(self, channel_id: str) -> None:
        """Wait until `messages()` follows the channel (e.g. after an invite arrived)."""
        while channel_id not in self._followed:
            await self._follow_changed.wait()

    # ------------------------------------------------------------ key directory

    async def _user_devices(self, user_id: str) -> list[RecipientDevice]:
        cached = self._keys.get(user_id)
        if cached is not None:
            return list(cached)
        try:
            infos: list[DeviceKeyInfo] = await self.rest.list_keys(user_id)
        except NotFoundError:
            raise UnknownUser(f"unknown user {user_id}") from None
        devices: list[RecipientDevice] = []
        for info in infos:
            try:
                devices.append(RecipientDevice.from_pem(user_id, info.device_id, info.public_key))
            except ValueError as exc:  # e.g. a P-256 key from another client: cannot wrap for it
                log.warning("skipping device %s/%s: %s", user_id, info.device_id, exc)
        self._keys.put(user_id, tuple(devices))
        return devices

    async def _targets(
        self, users: Iterable[str], *, required: str | None
    ) -> list[RecipientDevice]:
        """Every device of `users` plus all of ours; NoDeviceKey if `required` has none."""
        targets: dict[str, RecipientDevice] = {self.device.key_id: self.device.recipient()}
        for user in dict.fromkeys([*users, self.user_id]):
            devices = await self._user_devices(user)
            if user == required and not devices:
                raise NoDeviceKey(
                    f"{user} has no registered device key yet: they must log in once with a "
                    "SecureCollab client before you can send them encrypted messages"
                )
            for d in devices:
                targets.setdefault(d.key_id, d)
        return list(targets.values())

    def forget_keys(self, user_id: str | None = None) -> None:
        """Drop cached device lists (all, or one user's) so the next send re-fetches them."""
        if user_id is None:
            self._keys = _TtlCache(self._keys.ttl_s)
        else:
            self._keys.drop(user_id)

    # ------------------------------------------------------------ sending

    async def _send_envelope(self, envelope: dict[str, Any]) -> SentMessage:
        cmid = str(envelope["clientMessageId"])
        self._sent_cmids[cmid] = None
        while len(self._sent_cmids) > 10_000:
            self._sent_cmids.popitem(last=False)
        if self.stomp is not None:
            # Even while reconnecting: send() waits for the connection and retries with
            # the same clientMessageId, where REST would fail while the server is away.
            body = json.dumps(envelope, separators=(",", ":"))
            await self.stomp.send(SEND_DESTINATION, body)
            return SentMessage(cmid, via="stomp")
        result = await self.rest.send_message(envelope)
        return SentMessage(cmid, result.id, result.created_at, via="rest")

    async def send_text(self, to: str, text: str) -> SentMessage:
        """Encrypt `text` for `to`'s devices and ours; returns once the server stored it.

        Over STOMP when the client is realtime (waiting out a reconnect, up to the
        STOMP `send_timeout`), else over REST.

        Raises UnknownUser, NoDeviceKey (recipient never registered a device), StompError /
        ApiError (refused), ServerUnavailable / ConnectionLost.
        """
        devices = await self._targets([to], required=to if to != self.user_id else None)
        envelope = encrypt_message(
            text, sender=self.user_id, devices=devices, to=to, client_message_id=str(uuid.uuid4())
        )
        self._peers.add(to)
        return await self._send_envelope(envelope)

    async def _members_of(self, channel_id: str) -> list[str]:
        cached = self._members.get(channel_id)
        if cached is None:
            cached = (await self.rest.channel(channel_id)).members
            self._members.put(channel_id, cached)
        return list(cached)

    async def send_channel_text(self, channel_id: str, text: str) -> SentMessage:
        """Encrypt `text` for every member device of the channel; returns once stored.

        Members without a registered device cannot read it (they are skipped).
        """
        members = await self._members_of(channel_id)
        devices = await self._targets(members, required=None)
        envelope = encrypt_message(
            text,
            sender=self.user_id,
            devices=devices,
            channel_id=channel_id,
            client_message_id=str(uuid.uuid4()),
        )
        self._channels.add(channel_id)
        return await self._send_envelope(envelope)

    # ------------------------------------------------------------ channels

    async def create_channel(self, name: str, description: str | None = None) -> Channel:
        channel = await self.rest.create_channel(name, description=description)
        self._members.put(channel.id, channel.members)
        return channel

    async def invite(self, channel_id: str, user_ids: list[str]) -> int:
        count = await self.rest.invite(channel_id, user_ids)
        self._members.drop(channel_id)
        return count

    # ------------------------------------------------------------ history

    def decrypt(self, message: Message | Mapping[str, Any]) -> Item:
        """Decrypt one message (history row or delivery body) with this device's key."""
        raw = message.raw if isinstance(message, Message) else message
        return _item_from(raw, self.device)

    async def history(self, with_user: str, *, limit: int = 50) -> list[Item]:
        """The last `limit` messages with `with_user`, decrypted, oldest first."""
        rows = await self.rest.messages(with_user, limit=limit)
        return [self.decrypt(m) for m in reversed(rows)]

    async def channel_history(self, channel_id: str, *, limit: int = 50) -> list[Item]:
        """The last `limit` messages of a channel, decrypted, oldest first."""
        rows = await self.rest.channel_messages(channel_id, limit=limit)
        return [self.decrypt(m) for m in reversed(rows)]

    # ------------------------------------------------------------ receiving

    async def messages(self, *, channels: bool = True) -> AsyncIterator[Item]:
        """Incoming messages, decrypted, until the caller stops iterating (one consumer).

        Each is ACKed when the caller asks for the next one (i.e. after it handled the
        previous one); one the caller never finished comes again next session.
        """
        await self.start_listening(channels=channels)
        stomp, inbox = self.stomp, self._inbox
        assert stomp is not None and inbox is not None
        async for raw, message_id in inbox:
            item = _item_from(raw, self.device)
            self._note_conversation(item)
            yield item
            if message_id is not None:
                await stomp.settle(message_id)

    async def start_listening(self, *, channels: bool = True) -> None:
        """Subscribe now (private queue, channel topics, channel events); `messages()`
        does it on first use. Returns once the server confirmed the subscriptions, so
        nothing sent after this is missed."""
        if self.stomp is None or self._nursery is None:
            raise RuntimeError("receiving messages needs a realtime client (realtime=True)")
        if self._inbox is None:
            self._inbox = await self._listen(self.stomp, self._nursery, channels)

    async def _listen(
        self, stomp: StompClient, nursery: trio.Nursery, channels: bool
    ) -> trio.MemoryReceiveChannel[tuple[Mapping[str, Any], str | None]]:
        """Subscribe everything `messages()` reads; pumps run in the client's nursery."""
        send, recv = trio.open_memory_channel[tuple[Mapping[str, Any], str | None]](256)
        private = await stomp.subscribe(PRIVATE_QUEUE, ack="client-individual")
        nursery.start_soon(self._pump, private, send.clone())
        if channels:
            events = await stomp.subscribe(CHANNEL_EVENTS)
            nursery.start_soon(self._channel_events, events, nursery, send.clone())
            for ch in await self.rest.channels():
                await self._follow_channel(ch.id, nursery, send.clone())
        nursery.start_soon(self._catch_up_on_reconnect, stomp, send.clone())
        send.close()
        return recv

    def _note_conversation(self, item: Item) -> None:
        if item.channel_id is not None:
            self._channels.add(item.channel_id)
        else:
            peer = item.to if item.sender == self.user_id else item.sender
            if peer:
                self._peers.add(peer)

    async def _pump(
        self,
        sub: StompSubscription,
        out: trio.MemorySendChannel[tuple[Mapping[str, Any], str | None]],
    ) -> None:
        async with out:
            async for msg in sub:
                raw = _json_object(msg)
                if raw is None:
                    await self._settle(msg)  # not a chat message: nothing to show
                    continue
                await out.send((raw, msg.message_id))

    async def _settle(self, msg: StompMessage) -> None:
        if self.stomp is not None:
            await self.stomp.settle(msg.message_id)

    async def _follow_channel(
        self,
        channel_id: str,
        nursery: trio.Nursery,
        out: trio.MemorySendChannel[tuple[Mapping[str, Any], str | None]],
    ) -> None:
        assert self.stomp is not None
        if channel_id in self._following:
            await out.aclose()
            return
        self._following.add(channel_id)
        try:
            sub = await self.stomp.subscribe(channel_topic(channel_id))
        except BaseException:
            self._following.discard(channel_id)
            await out.aclose()
            raise
        self._channels.add(channel_id)
        self._followed.add(channel_id)
        self._channel_subs[channel_id] = sub
        nursery.start_soon(self._pump, sub, out)
        self._follow_changed.set()
        self._follow_changed = trio.Event()

    async def _channel_events(
        self,
        sub: StompSubscription,
        nursery: trio.Nursery,
        out: trio.MemorySendChannel[tuple[Mapping[str, Any], str | None]],
    ) -> None:
        """Membership events on /user/queue/channels ({type: INVITED|LEFT|REMOVED,
        channelId, userIds|userId, by}): follow a channel we were invited to, forget one
        we left or were removed from."""
        async with out:
            async for msg in sub:
                event = _json_object(msg) or {}
                channel_id = event.get("channelId")
                if not isinstance(channel_id, str):
                    continue
                self._members.drop(channel_id)
                kind = str(event.get("type") or "").upper()
                if kind in ("REMOVED", "LEFT"):
                    if event.get("userId") == self.user_id:
                        self._unfollow(channel_id)  # the server ended the subscription
                    continue
                try:
                    await self._follow_channel(channel_id, nursery, out.clone())
                except ClientError as exc:
                    log.warning("cannot follow channel %s: %s", channel_id, exc)

    def _unfollow(self, channel_id: str) -> None:
        sub = self._channel_subs.pop(channel_id, None)
        self._followed.discard(channel_id)
        self._following.discard(channel_id)
        self._channels.discard(channel_id)
        if sub is not None and self.stomp is not None:
            self.stomp.forget(sub)

    async def _catch_up_on_reconnect(
        self,
        stomp: StompClient,
        out: trio.MemorySendChannel[tuple[Mapping[str, Any], str | None]],
    ) -> None:
        """After each reconnect, fetch recent history of known conversations: a message
        committed while the old connection was dying may never have been delivered."""
        async with out:
            seen_reconnects = stomp.reconnects
            down_since_ms = _now_ms()
            while True:
                await stomp.wait_state_change()
                if not stomp.connected:
                    down_since_ms = _now_ms()
                    continue
                if stomp.reconnects == seen_reconnects:
                    continue
                seen_reconnects = stomp.reconnects
                since = down_since_ms - CATCH_UP_MARGIN_MS
                try:
                    await self._catch_up(stomp, since, out)
                except ClientError as exc:
                    log.warning("history catch-up after reconnect failed: %s", exc)

    async def _catch_up(
        self,
        stomp: StompClient,
        since_ms: int,
        out: trio.MemorySendChannel[tuple[Mapping[str, Any], str | None]],
    ) -> None:
        rows: list[Message] = []
        for peer in sorted(self._peers):
            rows += await self.rest.messages(peer, limit=HISTORY_PAGE, from_date=since_ms)
        for channel_id in sorted(self._channels):
            rows += await self.rest.channel_messages(
                channel_id, limit=HISTORY_PAGE, from_date=since_ms
            )
        rows.sort(key=lambda m: (m.created_at, m.id))
        for m in rows:
            if m.sender == self.user_id and m.client_message_id in self._sent_cmids:
                continue  # sent by this very client
            if stomp.claim(m.id):
                await out.send((m.raw, m.id))


def _json_object(msg: StompMessage) -> dict[str, Any] | None:
    try:
        value = json.loads(msg.body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = [
    "Client",
    "DeviceKeyMismatch",
    "Item",
    "NoDeviceKey",
    "ReceivedMessage",
    "SentMessage",
    "UndecryptableMessage",
    "UnknownUser",
    "ensure_device_key",
    "single_exception",
]
