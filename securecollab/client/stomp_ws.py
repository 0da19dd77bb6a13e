"""STOMP 1.2 over WebSocket for the SDK: one logical session that survives reconnects.

    async with open_stomp(ws_url, token_provider, device_id="laptop") as stomp:
        sub = await stomp.subscribe("/user/queue/private", ack="client-individual")
        await stomp.send("/app/chat/send", json_bytes)      # returns once RECEIPTed
        async for msg in sub:                                 # StompMessage
            handle(msg)
            await stomp.ack(msg)                              # after the app handled it

What it guarantees, and how:

- CONNECT carries the JWT as `passcode` (from `token_provider`, called on every
  (re)connect so a refreshed token is used) and a `device-id`. Heart-beats are
  negotiated (spec rule, `stomp.negotiate_heartbeat`) and sent; a server that stays
  silent for twice its negotiated interval (plus `HEARTBEAT_GRACE_S`) is treated as
  dead, like a closed socket.
- A lost connection is re-established with exponential backoff and jitter
  (`Backoff`: bounded delay, optional overall give-up time), then every subscription is
  subscribed again under its old id.
- `send()` asks for a RECEIPT and returns only when it came: the server sends it after
  the message was committed, so a return means "durable". A send cut off by a
  reconnect is written again on the new connection with the SAME body, hence the same
  `clientMessageId`, which the server de-duplicates: a retry never creates a second
  message. An ERROR that names the send's receipt is the server refusing it: raised as
  `StompError`, never retried.
- No duplicates for the app: every MESSAGE's `message-id` goes through a bounded LRU of
  seen ids. A copy of a message the app already has is dropped; if the app already
  acknowledged it, the copy is ACKed at once (so the server's offline-queue entry goes).
  `ack()` of a message redelivered on a newer connection uses the newest ack id.
- No losses: what was published while this user had no live session waits in the
  server's offline queue and is delivered on re-subscribe to `/user/queue/private`; an
  entry leaves that queue only when ACKed (use `ack="client-individual"` and `ack()`
  after handling). Messages that reached the server while the old connection was dying
  can still slip through; the high-level `Client` closes that gap from history.

Errors: `StompError` (ERROR frame: `message` header + body as `detail`),
`StompAuthError` (CONNECT refused: bad or expired token; not retried),
`ConnectionLost` (no connection within the give-up time, or the client was closed).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

import stomp
from securecollab.client.rest import ClientError, ServerUnavailable

log = logging.getLogger(__name__)

SUBPROTOCOLS = ("v12.stomp", "v11.stomp")
DEFAULT_HEARTBEAT = (10_000, 10_000)  # (we can send every ms, we want a beat every ms)
HEARTBEAT_GRACE_S = 1.0  # network jitter allowed on top of 2x the negotiated interval
ACK_MODES = ("auto", "client", "client-individual")

TokenProvider = Callable[[], Awaitable[str]]


class StompError(ClientError):
    """The server sent an ERROR frame: `message` header, body as `detail`."""

    def __init__(self, message: str, detail: str = "", receipt_id: str | None = None) -> None:
        super().__init__(f"{message}: {detail}" if detail and detail != message else message)
        self.message = message
        self.detail = detail
        self.receipt_id = receipt_id


class StompAuthError(StompError):
    """CONNECT was refused (bad, expired or revoked token); reconnecting will not help."""


class ConnectionLost(ServerUnavailable):
    """No STOMP connection could be (re-)established in time, or the client was closed."""


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: `initial_s * factor**attempt`, capped at `max_s`, minus jitter.

    `jitter` (0..1) is the fraction of each delay drawn at random ("equal jitter"
    when 0.5), so many clients cut off together do not come back together.
    `give_up_after_s`: stop trying once disconnected this long (None: never).
    """

    initial_s: float = 0.2
    max_s: float = 15.0
    factor: float = 2.0
    jitter: float = 0.5
    give_up_after_s: float | None = None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect attempt `attempt` (0-based)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)


@dataclass(frozen=True)
class StompMessage:
    """A MESSAGE frame as the app sees it (after de-duplication)."""

    subscription: str
    destination: str
    message_id: str
    body: bytes
    headers: Mapping[str, str] = field(repr=False)
    redelivered: bool = False

    def text(self) -> str:
        return self.body.decode("utf-8")


class StompSubscription:
    """One subscription; iterate it (`async for msg in sub`) to receive its messages.

    Messages wait in a bounded buffer (`buffer` frames); when it is full the reader
    waits, which back-pressures the server (a server may then drop a slow consumer,
    and this client reconnects).
    """

    def __init__(
        self, client: StompClient, sub_id: str, destination: str, ack: str, buffer: int
    ) -> None:
        self.id = sub_id
        self.destination = destination
        self.ack = ack
        self._client = client
        self._send, self._recv = trio.open_memory_channel[StompMessage](buffer)
        self.closed: BaseException | None = None

    def __aiter__(self) -> StompSubscription:
        return self

    async def __anext__(self) -> StompMessage:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self.closed is not None:
                raise self.closed from None
            raise StopAsyncIteration from None

    async def receive(self) -> StompMessage:
        """The next message; ConnectionLost/StompError when the client gave up or closed."""
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise self.closed or ConnectionLost("subscription closed") from None

    async def unsubscribe(self) -> None:
        await self._client.unsubscribe(self)


class _Lost(Exception):
    """The connection a frame was written on went away before its answer came."""


@dataclass(eq=False)
class _Waiter:
    """Someone waiting for a RECEIPT."""

    kind: str  # the command the receipt answers
    sub_id: str | None = None
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(eq=False)
class _Live:
    """One established WebSocket + STOMP connection (a "generation")."""

    ws: WebSocketConnection
    generation: int
    version: str
    send_every_s: float  # 0: we send no heart-beats
    expect_every_s: float  # 0: the server sends none
    lock: trio.Lock = field(default_factory=trio.Lock)
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    parser: stomp.Parser = field(default_factory=lambda: stomp.Parser("1.2", side="client"))
    last_send: float = 0.0
    closing: bool = False


_PENDING, _HANDLED = False, True


class StompClient:
    """A STOMP session over WebSocket that reconnects; make one with `open_stomp`."""

    def __init__(
        self,
        url: str,
        token: TokenProvider,
        *,
        device_id: str | None = None,
        heartbeat: tuple[int, int] = DEFAULT_HEARTBEAT,
        backoff: Backoff = Backoff(),
        connect_timeout: float = 10.0,
        receipt_timeout: float = 15.0,
        send_timeout: float = 60.0,
        dedup_capacity: int = 10_000,
        on_state: Callable[[str, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.device_id = device_id
        self.heartbeat = heartbeat
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.receipt_timeout = receipt_timeout
        self.send_timeout = send_timeout
        self._dedup_capacity = dedup_capacity
        self._on_state = on_state
        self._rng = rng or random.Random()
        self._ids = count(1)
        self._subs: dict[str, StompSubscription] = {}
        self._seen: OrderedDict[str, bool] = OrderedDict()
        # message id -> (generation, ack id, subscription id) of its newest unacked copy
        self._latest_ack: dict[str, tuple[int, str, str]] = {}
        self._live: _Live | None = None
        self._connected = trio.Event()
        self._changed = trio.Event()  # set (and replaced) on every connect/disconnect
        self._fatal: BaseException | None = None
        self._closing = False
        self._generation = 0
        self.reconnects = 0  # connections established after the first one
        self.session_id: str | None = None  # the server's `session` of the live connection

    # ------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._live is not None

    def _notify(self, state: str, detail: str = "") -> None:
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:  # a display callback must not break the session
                log.exception("on_state callback failed")

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ConnectionLost("the STOMP client is closed")

    async def _wait_connected(self, deadline: float) -> _Live:
        while True:
            self._check_usable()
            live = self._live
            if live is not None and not live.closing:
                return live
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
            if trio.current_time() >= deadline:
                self._check_usable()
                raise ConnectionLost(f"not connected to {self.url} (still reconnecting)")

    # ------------------------------------------------------------ connection loop

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        attempt = 0
        first = True
        down_since = trio.current_time()
        while not self._closing:
            try:
                live = await self._connect_once()
            except StompAuthError as exc:
                if first:
                    raise
                self._fail_all(exc)
                return
            except (ServerUnavailable, OSError, HandshakeError, ConnectionClosed, _Lost) as exc:
                # (ServerUnavailable: the token refresh could not reach the server)
                if first:
                    if isinstance(exc, ServerUnavailable):
                        raise
                    raise ServerUnavailable(
                        f"cannot connect to {self.url}: {_describe(exc)}"
                    ) from None
                if not await self._pause(_describe(exc), attempt, down_since):
                    return
                attempt += 1
                continue
            except trio.TooSlowError:
                if first:
                    raise ServerUnavailable(f"cannot connect to {self.url}: timed out") from None
                if not await self._pause("connect timed out", attempt, down_since):
                    return
                attempt += 1
                continue
            except ClientError as exc:  # e.g. the session was revoked: nothing to retry
                if first:
                    raise
                self._fail_all(exc)
                return
            attempt = 0
            if not first:
                self.reconnects += 1
            ended = await self._serve(live, task_status if first else None)
            first = False
            down_since = trio.current_time()
            if self._closing:
                return
            if isinstance(ended, StompAuthError):
                self._fail_all(ended)
                return
            delay = self.backoff.delay(0, self._rng)
            self._notify("disconnected", f"{_describe(ended)}; reconnecting in {delay:.1f} s")
            await trio.sleep(delay)

    async def _pause(self, reason: str, attempt: int, down_since: float) -> bool:
        """Sleep before reconnect attempt `attempt + 1`; False (session failed) on give-up."""
        give_up = self.backoff.give_up_after_s
        if give_up is not None and trio.current_time() - down_since >= give_up:
            self._fail_all(
                ConnectionLost(f"could not reconnect to {self.url} within {give_up:g} s: {reason}")
            )
            return False
        delay = self.backoff.delay(attempt, self._rng)
        self._notify("reconnecting", f"{reason}; retry in {delay:.1f} s")
        await trio.sleep(delay)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        """The session is over for good: wake every waiter and end every subscription."""
        self._fatal = exc
        for sub in list(self._subs.values()):
            sub.closed = exc
            sub._send.close()
        self._subs.clear()
        self._changed_now()

    async def _connect_once(self) -> _Live:
        token = await self._token()
        split = urlsplit(self.url)
        with trio.fail_after(self.connect_timeout):
            ws = await connect_websocket_url(
                self._nursery, self.url, subprotocols=list(SUBPROTOCOLS), max_message_size=1 << 20
            )
            try:
                headers: list[tuple[str, str]] = [
                    ("accept-version", "1.2,1.1"),
                    ("host", split.hostname or "localhost"),
                    ("passcode", token),
                    ("heart-beat", stomp.format_heartbeat(*self.heartbeat)),
                ]
                if self.device_id:
                    headers.append(("device-id", self.device_id))
                await ws.send_message(stomp.encode(stomp.Frame("CONNECT", tuple(headers)), "1.2"))
                parser = stomp.Parser("1.2", side="client")
                frame = await self._first_frame(ws, parser)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()
                raise
        if frame.command == "ERROR":
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ws.aclose()
            raise StompAuthError(
                frame.get("message", "connection refused"), frame.body.decode("utf-8", "replace")
            )
        if frame.command != "CONNECTED":
            await ws.aclose()
            raise _Lost(f"server answered CONNECT with {frame.command}")
        version = frame.get("version", "1.2")
        try:
            server_hb = stomp.parse_heartbeat(frame.get("heart-beat"))
        except stomp.ProtocolError:
            server_hb = (0, 0)
        # negotiate_heartbeat is written from the server's view; swap for ours.
        server_send, server_expect = stomp.negotiate_heartbeat(self.heartbeat, server_hb)
        self._generation += 1
        self.session_id = frame.get("session")
        live = _Live(
            ws,
            self._generation,
            version,
            send_every_s=server_expect / 1000,
            expect_every_s=server_send / 1000,
            parser=parser,
            last_send=trio.current_time(),
        )
        return live

    async def _first_frame(self, ws: WebSocketConnection, parser: stomp.Parser) -> stomp.Frame:
        while True:
            data = await ws.get_message()
            for event in parser.feed(data.encode("utf-8") if isinstance(data, str) else data):
                if isinstance(event, stomp.Frame):
                    return event  # the server sends nothing before CONNECTED is read

    async def _serve(self, live: _Live, task_status: Any) -> BaseException:
        """Run one connection until it ends; returns why it ended."""
        reason: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:
                self._live = live
                nursery.start_soon(self._reader, live, nursery.cancel_scope, reason)
                if live.send_every_s:
                    nursery.start_soon(self._beater, live, nursery.cancel_scope)
                try:
                    for sub in list(self._subs.values()):
                        # With a receipt, so a refusal (e.g. removed from the channel
                        # meanwhile) names the subscription and drops it instead of
                        # failing every reconnect from now on.
                        receipt = f"r-{next(self._ids)}"
                        live.waiters[receipt] = _Waiter("SUBSCRIBE", sub.id)
                        await self._write(
                            live, self._subscribe_frame(sub).with_header("receipt", receipt)
                        )
                except _Lost as exc:
                    reason.append(exc)
                    nursery.cancel_scope.cancel()
                else:
                    self._connected.set()
                    self._changed_now()
                    self._notify("connected", live.version)
                    if task_status is not None:
                        task_status.started()
        finally:
            live.closing = True
            self._live = None
            self._connected = trio.Event()
            lost = _Lost("connection lost")
            for waiter in live.waiters.values():
                waiter.finish(lost)
            live.waiters.clear()
            self._changed_now()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await live.ws.aclose()
        return reason[0] if reason else _Lost("connection closed")

    async def _reader(
        self, live: _Live, scope: trio.CancelScope, reason: list[BaseException]
    ) -> None:
        parser = live.parser
        try:
            while True:
                timeout = (
                    2 * live.expect_every_s + HEARTBEAT_GRACE_S if live.expect_every_s else None
                )
                if timeout is None:
                    data = await live.ws.get_message()
                else:
                    with trio.move_on_after(timeout) as silent:
                        data = await live.ws.get_message()
                    if silent.cancelled_caught:
                        reason.append(
                            _Lost(f"server silent for {timeout:g} s (heart-beat timeout)")
                        )
                        return
                for event in parser.feed(data.encode("utf-8") if isinstance(data, str) else data):
                    if isinstance(event, stomp.Frame):
                        stop = await self._on_frame(live, event)
                        if stop is not None:
                            reason.append(stop)
                            return
        except ConnectionClosed as exc:
            reason.append(_Lost(f"connection closed ({_close_reason(exc)})"))
        except stomp.ProtocolError as exc:
            reason.append(_Lost(f"protocol error from server: {exc.message}"))
        finally:
            live.closing = True
            scope.cancel()

    async def _on_frame(self, live: _Live, frame: stomp.Frame) -> BaseException | None:
        command = frame.command
        if command == "MESSAGE":
            await self._on_message(live, frame)
        elif command == "RECEIPT":
            waiter = live.waiters.pop(frame.get("receipt-id", ""), None)
            if waiter is not None:
                waiter.finish()
        elif command == "ERROR":
            message = frame.get("message", "server error")
            detail = frame.body.decode("utf-8", "replace")
            receipt_id = frame.get("receipt-id")
            error = StompError(message, detail, receipt_id)
            waiter = live.waiters.pop(receipt_id, None) if receipt_id else None
            if waiter is not None:
                waiter.finish(error)
                if waiter.kind == "SUBSCRIBE" and waiter.sub_id is not None:
                    self._drop_sub(waiter.sub_id, error)
            log.info("STOMP ERROR from %s: %s", self.url, error)
            # The server closes after an ERROR: reconnect, unless it was about our token.
            if "authentication" in message.lower() or "token" in message.lower():
                return StompAuthError(message, detail, receipt_id)
            return error
        return None

    async def _on_message(self, live: _Live, frame: stomp.Frame) -> None:
        message_id = frame.get("message-id", "")
        ack_id = frame.get("ack") if live.version == "1.2" else message_id
        sub = self._subs.get(frame.get("subscription", ""))
        if sub is None:
            return  # unsubscribed meanwhile; an unacked copy comes back next time
        state = self._seen.get(message_id)
        if state is _HANDLED:
            if sub.ack != "auto" and ack_id:
                await self._send_ack(live, sub, ack_id, message_id)
            return
        if sub.ack != "auto" and ack_id:
            self._latest_ack[message_id] = (live.generation, ack_id, sub.id)
        if state is _PENDING:
            return  # the app already holds a copy; its ack() will use the newest ack id
        self._remember(message_id, _HANDLED if sub.ack == "auto" else _PENDING)
        msg = StompMessage(
            sub.id,
            frame.get("destination", sub.destination),
            message_id,
            frame.body,
            frame.header_dict(),
            frame.get("redelivered") == "true",
        )
        try:
            await sub._send.send(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # unsubscribed while we waited for room

    def _remember(self, message_id: str, state: bool) -> None:
        self._seen[message_id] = state
        self._seen.move_to_end(message_id)
        while len(self._seen) > self._dedup_capacity:
            old, _ = self._seen.popitem(last=False)
            self._latest_ack.pop(old, None)

    async def _beater(self, live: _Live, scope: trio.CancelScope) -> None:
        while True:
            due = live.last_send + live.send_every_s
            now = trio.current_time()
            if now < due:
                await trio.sleep(due - now)
                continue
            try:
                await self._write_raw(live, stomp.HEARTBEAT_BYTES)
            except _Lost:
                scope.cancel()  # the reader records why
                return

    # ------------------------------------------------------------ writing

    async def _write_raw(self, live: _Live, data: bytes) -> None:
        if live.closing:
            raise _Lost("connection closing")
        try:
            async with live.lock:
                try:
                    await live.ws.send_message(data.decode("utf-8"))
                except UnicodeDecodeError:
                    await live.ws.send_message(data)
                live.last_send = trio.current_time()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Lost(f"connection closed while writing: {_describe(exc)}") from None

    async def _write(self, live: _Live, frame: stomp.Frame) -> None:
        await self._write_raw(live, stomp.encode(frame, live.version))

    async def _request(self, live: _Live, frame: stomp.Frame, waiter: _Waiter) -> None:
        """Write `frame` with a receipt and wait for it; _Lost / StompError / TooSlowError."""
        receipt = f"r-{next(self._ids)}"
        live.waiters[receipt] = waiter
        try:
            await self._write(live, frame.with_header("receipt", receipt))
            with trio.fail_after(self.receipt_timeout):
                await waiter.done.wait()
        finally:
            live.waiters.pop(receipt, None)
        if waiter.error is not None:
            raise waiter.error

    async def _send_ack(self, live: _Live, sub: StompSubscription, ack_id: str, mid: str) -> None:
        if live.version == "1.2":
            headers: tuple[tuple[str, str], ...] = (("id", ack_id),)
        else:
            headers = (("message-id", mid), ("subscription", sub.id))
        try:
            await self._write(live, stomp.Frame("ACK", headers))
        except _Lost:
            pass  # the message comes again on the next connection and is acked then

    # ------------------------------------------------------------ public API

    def _subscribe_frame(self, sub: StompSubscription) -> stomp.Frame:
        return stomp.Frame(
            "SUBSCRIBE", (("id", sub.id), ("destination", sub.destination), ("ack", sub.ack))
        )

    def _drop_sub(self, sub_id: str, error: BaseException | None) -> None:
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            sub.closed = error
            sub._send.close()

    async def subscribe(
        self, destination: str, *, ack: str = "auto", buffer: int = 1000
    ) -> StompSubscription:
        """Subscribe (and re-subscribe after every reconnect); returns once the server
        confirmed it. StompError when the server refuses (e.g. not a channel member)."""
        if ack not in ACK_MODES:
            raise ValueError(f"ack must be one of {', '.join(ACK_MODES)}")
        sub = StompSubscription(self, f"sub-{next(self._ids)}", destination, ack, buffer)
        self._subs[sub.id] = sub
        deadline = trio.current_time() + self.send_timeout
        while True:
            live = await self._wait_connected(deadline)
            try:
                await self._request(live, self._subscribe_frame(sub), _Waiter("SUBSCRIBE", sub.id))
                return sub
            except StompError:
                self._drop_sub(sub.id, None)
                raise
            except (_Lost, trio.TooSlowError):
                # A new connection re-subscribes everything in _subs by itself; we only
                # wait to learn that it worked.
                continue

    def forget(self, sub: StompSubscription) -> None:
        """Drop a subscription the SERVER already ended (e.g. removed from a channel):
        no UNSUBSCRIBE is sent (the server would answer ERROR for an unknown id)."""
        if self._subs.get(sub.id) is sub:
            self._drop_sub(sub.id, None)

    async def unsubscribe(self, sub: StompSubscription) -> None:
        """End a subscription; unacked messages of it stay queued on the server."""
        if self._subs.get(sub.id) is not sub:
            return
        self._drop_sub(sub.id, None)
        live = self._live
        if live is not None and not live.closing:
            try:
                await self._write(live, stomp.Frame("UNSUBSCRIBE", (("id", sub.id),)))
            except _Lost:
                pass

    async def send(
        self,
        destination: str,
        body: bytes | str,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """SEND and wait for the RECEIPT (= committed), retrying across reconnects.

        The same frame is written again after a reconnect or a receipt timeout, so the
        body must be idempotent on the server (our chat envelopes carry a
        `clientMessageId`). Raises StompError if the server refuses it, ConnectionLost
        if no receipt came within `send_timeout` seconds.
        """
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        pairs = [("destination", destination), ("content-type", content_type)]
        pairs += [(k, v) for k, v in (headers or {}).items()]
        frame = stomp.Frame("SEND", tuple(pairs), data)
        deadline = trio.current_time() + self.send_timeout
        last = "no connection"
        while True:
            if trio.current_time() >= deadline:
                raise ConnectionLost(
                    f"no receipt for SEND to {destination} within {self.send_timeout:g} s ({last})"
                )
            live = await self._wait_connected(deadline)
            try:
                await self._request(live, frame, _Waiter("SEND"))
                return
            except _Lost as exc:
                last = str(exc)
            except trio.TooSlowError:
                # Still connected but no receipt (e.g. dropped by the server's rate
                # limit): write it again; the server answers a repeat with the original.
                last = f"no receipt within {self.receipt_timeout:g} s"
                await trio.sleep(min(1.0, max(0.0, deadline - trio.current_time())))

    async def ack(self, msg: StompMessage) -> None:
        """Acknowledge `msg` once the app has handled it (client / client-individual)."""
        await self.settle(msg.message_id)

    async def nack(self, msg: StompMessage) -> None:
        """Reject `msg`: the server may redeliver it (queues) or drop it (topics)."""
        await self.settle(msg.message_id, nack=True)

    async def wait_state_change(self) -> None:
        """Return at the next connect or disconnect (see `connected`, `reconnects`)."""
        await self._changed.wait()

    def seen(self, message_id: str) -> bool:
        """Whether a message with this id already reached the app (or is being handled)."""
        return message_id in self._seen

    def claim(self, message_id: str) -> bool:
        """Mark a message the app got some other way (e.g. from history) as being handled;
        False when it already had it. Call `settle(message_id)` once handled."""
        if message_id in self._seen:
            return False
        self._remember(message_id, _PENDING)
        return True

    async def settle(self, message_id: str, *, nack: bool = False) -> None:
        """ACK (or NACK) the newest copy of `message_id`, wherever it came from.

        A copy that arrives later (after a reconnect) is ACKed on arrival.
        """
        latest = self._latest_ack.pop(message_id, None)
        if nack:
            self._seen.pop(message_id, None)  # a redelivery is welcome
        else:
            self._remember(message_id, _HANDLED)
        live = self._live
        if latest is None or live is None:
            return
        generation, ack_id, sub_id = latest
        sub = self._subs.get(sub_id)
        if sub is None or generation != live.generation:
            return  # that connection is gone; the redelivered copy gets ACKed on arrival
        if nack:
            if live.version == "1.2":
                headers: tuple[tuple[str, str], ...] = (("id", ack_id),)
            else:
                headers = (("message-id", message_id), ("subscription", sub.id))
            try:
                await self._write(live, stomp.Frame("NACK", headers))
            except _Lost:
                pass
        else:
            await self._send_ack(live, sub, ack_id, message_id)

    async def disconnect(self, grace_s: float = 5.0) -> None:
        """Graceful DISCONNECT (waits for its receipt, at most `grace_s`); no reconnect after."""
        self._closing = True
        live = self._live
        if live is not None and not live.closing:
            with trio.move_on_after(grace_s):
                try:
                    receipt = f"bye-{next(self._ids)}"
                    waiter = _Waiter("DISCONNECT")
                    live.waiters[receipt] = waiter
                    await self._write(live, stomp.Frame("DISCONNECT", (("receipt", receipt),)))
                    await waiter.done.wait()
                except _Lost:
                    pass
        for sub in list(self._subs.values()):
            sub.closed = None
            sub._send.close()
        self._subs.clear()
        self._changed_now()

    _nursery: trio.Nursery  # set by open_stomp: owns the WebSocket connections' tasks


def _close_reason(exc: ConnectionClosed) -> str:
    reason = getattr(exc, "reason", None)
    if reason is None:
        return "no close frame"
    code = getattr(reason, "code", "?")
    text = getattr(reason, "reason", None)
    return f"code {code}{': ' + text if text else ''}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"connection closed ({_close_reason(exc)})"
    if isinstance(exc, HandshakeError):
        return f"WebSocket handshake failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def ws_url(base_url: str, path: str = "/ws") -> str:
    """The WebSocket URL of a server's STOMP endpoint: http(s)://host:port -> ws(s)://.../ws."""
    split = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(split.scheme)
    if scheme is None or not split.netloc:
        raise ValueError(f"not an http(s) or ws(s) URL: {base_url!r}")
    return f"{scheme}://{split.netloc}{split.path.rstrip('/')}{path}"


@asynccontextmanager
async def open_stomp(url: str, token: TokenProvider, **kwargs: Any) -> AsyncIterator[StompClient]:
    """Connect (raises ServerUnavailable / StompAuthError if the first CONNECT fails), keep
    the session alive while the block runs, DISCONNECT gracefully at its end.

    `url` is the ws:// or wss:// URL of `/ws` (see `ws_url`); keyword arguments go to
    `StompClient` (device_id, heartbeat, backoff, timeouts, on_state).
    """
    client = StompClient(url, token, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            await nursery.start(client._run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.disconnect()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_exception(group) from None


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups (trio nurseries wrap what
    a block raises); the group itself when it really holds several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
