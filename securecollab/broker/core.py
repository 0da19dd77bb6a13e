"""The broker: sessions, subscriptions by destination, queues, fan-out, app handlers.

Cross-node traffic goes through the backplane: services (and client SENDs to general
topics) call `backplane.publish(Delivery(...))`; every node's broker receives it in
`_on_delivery` and hands it to its local subscriptions. General-purpose queues
(`/queue/<name>`) are node-local: competing consumers on one node.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

import stomp
from securecollab.backplane import Backplane, Delivery
from securecollab.broker import destinations, metrics
from securecollab.broker.config import BrokerConfig
from securecollab.broker.destinations import (
    PRESENCE_TOPIC,
    PRIVATE_QUEUE,
    Destination,
    Kind,
    acl_allows,
)
from securecollab.broker.errors import AuthenticationFailed, BrokerError, Forbidden
from securecollab.broker.hooks import (
    Authenticator,
    BrokerHooks,
    Credentials,
    Identity,
    SessionInfo,
)
from securecollab.broker.session import (
    RESERVED_HEADERS,
    Connection,
    Outbound,
    Pending,
    Session,
    State,
    Subscription,
)
from securecollab.ids import new_id, now_ms

log = logging.getLogger(__name__)

#: How long a login session ended by a control "disconnect" (logout) is remembered, so a
#: CONNECT authenticated just before it is closed when it attaches (s), and how many.
ENDED_KEY_TTL_S = 120.0
ENDED_KEYS_MAX = 10_000

Completion = Callable[[], Awaitable[object]]
"""The part of an `/app` SEND's work that waits (e.g. for its store commit); see AppHandler."""

AppHandler = Callable[[SessionInfo, stomp.Frame], Awaitable[Completion | None]]
"""Handles a client SEND to an `/app/...` destination. Raise `AppError` to refuse it.

The RECEIPT for the frame (if asked) is sent only after the handler returned, and after
the completion it returned (if any) returned, so a handler whose work ends with its store
commit makes the receipt mean "durable".

A handler registered with `pipelined=True` may split its work: what must happen in frame
order before the next frame is read (validate, queue the store write) in the handler,
the wait (the commit) and what follows (deliveries) in the completion it returns. The
session then reads on while the completion waits, and runs the completions of one
connection one at a time, in frame order (at most `BrokerConfig.pipeline_depth` in
flight). A completion may raise `AppError` like the handler; it must also settle its
work when called in an already cancelled scope (the connection closed before its turn),
shielded, then let the cancellation go on.
"""

# SENDs to these are cheap, never stored, and counted in their own window so that
# typing indicators cannot eat a user's message budget.
SIGNAL_DESTINATIONS = frozenset({"/app/typing", "/app/presence"})
APP_TARGETS_MAX = 1024  # authorized /app destinations remembered (prefix handlers: any name)


@dataclass(eq=False, slots=True)
class QueueMessage:
    message_id: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    redelivered: bool = False
    avoid: Subscription | None = None  # last consumer that NACKed it: prefer another


@dataclass(eq=False, slots=True)
class _Queue:
    name: str
    backlog: deque[QueueMessage] = field(default_factory=deque)
    consumers: list[Subscription] = field(default_factory=list)
    next: int = 0  # round-robin position


class Broker:
    """All sessions of this node. Transports call `serve_connection`; see module docstring."""

    def __init__(
        self,
        backplane: Backplane,
        config: BrokerConfig,
        authenticate: Authenticator,
        hooks: BrokerHooks | None = None,
    ) -> None:
        self.backplane = backplane
        self.config = config
        self.hooks = hooks if hooks is not None else BrokerHooks()
        self._authenticate = authenticate
        self.sessions: dict[str, Session] = {}
        self._by_user: dict[str, set[Session]] = {}
        # login sessions ended by a control "disconnect" with `session-key`, remembered
        # ENDED_KEY_TTL_S so a CONNECT that was authenticating at that moment is closed
        # when it attaches: key -> (expiry, message); oldest first
        self._ended_keys: dict[str, tuple[float, str]] = {}
        self._user_subs: dict[tuple[str, str], list[Subscription]] = {}
        self._topic_subs: dict[str, list[Subscription]] = {}
        # users with a /topic/presence subscription here -> how many (presence fan-out
        # visits only these, never the subject's whole contact list)
        self._presence_viewers: dict[str, int] = {}
        self._queues: dict[str, _Queue] = {}
        self._app: dict[str, AppHandler] = {}
        self._pipelined: set[str] = set()  # registrations (keys of _app) made pipelined
        # authorized /app destinations as sent -> parsed (parse + checks once, not per SEND)
        self._app_targets: dict[str, Destination] = {}
        self._shutting_down = False
        # At-least-once on /user/queue/private: message ids to hand back
        # (hooks.on_undelivered) and backplane registrations to remove, collected in
        # sync code and flushed at the next await point (`flush`).
        self._undelivered: dict[str, list[str]] = {}
        self._unregister: list[tuple[str, str]] = []  # (user_id, session_id)
        self._recent_private: dict[str, float] = {}  # user -> when its last sub here ended
        self._idle = trio.Event()
        self._idle.set()
        # the write pass (`write_forever`): sessions with frames for an idle writer
        self.coalescing = False
        self._write_queue: list[Session] = []
        self._write_wake = trio.Event()
        backplane.subscribe(self._on_delivery)

    # ------------------------------------------------------------------ registration
    def register_app_handler(
        self, destination: str, handler: AppHandler, *, pipelined: bool = False
    ) -> None:
        """Route SENDs to `destination` (exact, e.g. "/app/chat/send") or, when it ends
        with "/", to everything under it (e.g. "/app/webrtc/"); the longest match wins.
        `pipelined`: see `AppHandler`."""
        if not destination.startswith("/app/"):
            raise ValueError("application destinations start with /app/")
        if destination in self._app:
            raise ValueError(f"{destination} already has a handler")
        self._app[destination] = handler
        if pipelined:
            self._pipelined.add(destination)

    def pipelined(self, target: Destination) -> bool:
        """Is `target` an /app destination whose registration was made `pipelined`?
        (By registration, not by handler: one handler object may serve several
        destinations, pipelined on some only.)"""
        return target.kind is Kind.APP and self._app_key(target.name) in self._pipelined

    def _app_handler(self, destination: str) -> AppHandler | None:
        key = self._app_key(destination)
        return None if key is None else self._app[key]

    def _app_key(self, destination: str) -> str | None:
        """The registration that serves `destination`: itself, or the longest prefix."""
        if destination in self._app:
            return destination
        best = ""
        for prefix in self._app:
            if prefix.endswith("/") and destination.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return best or None

    # ------------------------------------------------------------------ connections
    async def serve_connection(self, conn: Connection) -> None:
        """Run one connection to its end (transports call this from their handler task)."""
        if self._shutting_down:
            await conn.close(1001)
            return
        session = Session(self, conn)
        self.sessions[session.id] = session
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        metrics.CONNECTIONS.labels(conn.transport).inc()
        metrics.CONNECTIONS_TOTAL.labels(conn.transport).inc()
        try:
            await session.run()
        finally:
            metrics.CONNECTIONS.labels(conn.transport).dec()
            del self.sessions[session.id]
            if not self.sessions:
                self._idle.set()

    async def shutdown(self, grace_s: float = 3.0) -> None:
        """Refuse new connections; ERROR "server shutting down" + close (1001) to all."""
        self._shutting_down = True
        for session in list(self.sessions.values()):
            session.close("server shutting down", "the server is restarting or stopping", code=1001)
        with trio.move_on_after(grace_s):
            await self._idle.wait()

    async def authenticate(self, creds: Credentials) -> Identity:
        try:
            return await self._authenticate(creds)
        except BrokerError:
            raise
        except Exception:
            log.exception("authenticator failed")
            raise AuthenticationFailed("authentication failed", "internal error") from None

    async def attach(self, session: Session) -> None:
        """A session completed CONNECT."""
        self._by_user.setdefault(session.user_id, set()).add(session)
        assert session.info is not None
        await self._call_hook("on_session_open", self.hooks.on_session_open(session.info))
        key = session.session_key
        if key is not None and key in self._ended_keys:
            expiry, message = self._ended_keys[key]
            if expiry > trio.current_time():
                # its login session ended while this CONNECT was being authenticated
                session.close(message, code=1008)

    def _remember_ended(self, key: str, message: str) -> None:
        ended = self._ended_keys
        now = trio.current_time()
        ended.pop(key, None)
        while ended and (len(ended) >= ENDED_KEYS_MAX or next(iter(ended.values()))[0] <= now):
            del ended[next(iter(ended))]
        ended[key] = (now + ENDED_KEY_TTL_S, message)

    async def write_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The write pass, until cancelled: once per scheduler pass in which sessions
        queued frames for an idle writer, send each such session's frames in one
        `send()` (`Session.write_queued`).

        Under load the tasks woken by one group commit deliver a MESSAGE to one
        connection and a RECEIPT to another each; a connection that gets both in the
        same pass now costs one syscall, not two (on loopback a `send()` also runs the
        receiver's TCP input path: ~14 us). The cost is one task switch per pass, not
        per frame. Not running (tests that build a bare Broker): frames are written by
        the task that produces them.
        """
        self.coalescing = True
        task_status.started()
        try:
            while True:
                await self._write_wake.wait()
                self._write_wake = trio.Event()
                self._write_pass()
        finally:
            self.coalescing = False
            self._write_pass()

    def write_soon(self, session: Session) -> None:
        """`session` has frames for the next write pass."""
        self._write_queue.append(session)
        self._write_wake.set()

    def _write_pass(self) -> None:
        queue, self._write_queue = self._write_queue, []
        for session in queue:
            try:
                session.write_queued()
            except Exception:  # a bug, never the end of every connection's writes
                log.exception("write pass of session %s failed", session.id)

    async def refresh_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew this node's backplane registrations every `presence_refresh_s` until
        cancelled. A node that stops (or crashes) stops renewing, so its users lapse
        to OFFLINE (and "not subscribed") after `presence_ttl_s`."""
        task_status.started()
        while True:
            await trio.sleep(self.config.presence_refresh_s)
            await self.refresh_sessions()

    async def refresh_sessions(self) -> None:
        """One renewal round: presence (hooks.on_session_activity) and private-queue
        subscriber registrations of every connected session. Never raises."""
        ttl_ms = int(self.config.presence_ttl_s * 1000)
        cutoff = trio.current_time() - self.config.handback_grace_s
        for user_id in [u for u, t in self._recent_private.items() if t < cutoff]:
            del self._recent_private[user_id]
        for session in list(self.sessions.values()):
            if session.state is not State.CONNECTED or session.info is None:
                continue
            info = session.info
            await self._call_hook("on_session_activity", self.hooks.on_session_activity(info))
            if _has_private(session):
                try:
                    await self.backplane.subscriber_refresh(
                        PRIVATE_QUEUE, info.user_id, info.session_id, now_ms(), ttl_ms
                    )
                except Exception:
                    log.exception("renewing the private-queue registration failed")

    async def detach(self, session: Session) -> None:
        """The connection ended: drop subscriptions, redeliver unacked, abort transactions,
        hand back private messages that did not reach the client."""
        session.transactions.clear()
        for sub in list(session.subscriptions.values()):
            self.unsubscribe(sub)
        for user_id, message_id in session.take_unwritten():
            self.hand_back(user_id, [message_id])
        await self.flush()
        if session.info is None:
            return
        users = self._by_user.get(session.user_id)
        if users is not None:
            users.discard(session)
            if not users:
                del self._by_user[session.user_id]
        await self._call_hook("on_session_close", self.hooks.on_session_close(session.info))

    def hand_back(self, user_id: str, message_ids: list[str]) -> None:
        """Private-queue messages that did not reach `user_id`: report them at the next
        `flush` (hooks.on_undelivered)."""
        if message_ids:
            metrics.DROPS.labels("handed_back").inc(len(message_ids))
            self._undelivered.setdefault(user_id, []).extend(message_ids)

    async def flush(self) -> None:
        """Report handed-back messages and remove ended backplane registrations.

        Shielded (bounded by `close_grace_s` + 5 s): it often runs in a task that is
        being cancelled (a closing session, shutdown), and a popped batch must not be lost.
        """
        if not (self._unregister or self._undelivered):
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.close_grace_s + 5
            await self._flush()

    async def _flush(self) -> None:
        while self._unregister:
            user_id, session_id = self._unregister.pop()
            try:
                await self.backplane.subscriber_remove(PRIVATE_QUEUE, user_id, session_id)
            except Exception:
                log.exception("removing the private-queue registration failed")
        while self._undelivered:
            user_id, ids = self._undelivered.popitem()
            await self._call_hook(
                "on_undelivered", self.hooks.on_undelivered(user_id, list(dict.fromkeys(ids)))
            )

    async def _call_hook(self, name: str, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception:
            log.exception("broker hook %s failed", name)

    def to_report(self, items: list[tuple[str, str]]) -> dict[str, list[str]]:
        """Of these delivered (user_id, message_id), those `on_delivered` must hear of,
        by user (`hooks.delivered_filter`, once per user)."""
        by_user: dict[str, list[str]] = {}
        for user_id, message_id in items:
            by_user.setdefault(user_id, []).append(message_id)
        keep = self.hooks.delivered_filter
        return {u: kept for u, ids in by_user.items() if (kept := keep(u, ids))}

    async def report_delivered(self, by_user: dict[str, list[str]]) -> None:
        """Tell `on_delivered` about what `to_report` kept."""
        for user_id, ids in by_user.items():
            await self._call_hook("on_delivered", self.hooks.on_delivered(user_id, ids))

    async def delivered(self, items: list[tuple[str, str]]) -> None:
        """Report messages of /user/queue/private that reached their client."""
        await self.report_delivered(self.to_report(items))

    # ------------------------------------------------------------------ SEND
    def authorize_send(self, session: Session, destination: str) -> Destination:
        """Classify and authorize a client SEND; raises BrokerError/Forbidden."""
        target = self._app_targets.get(destination)
        if target is not None:
            return target  # an /app destination with a handler: the same for every user
        if destinations.server_only(destination):
            hint = (
                "send chat messages to /app/chat/send" if destination.startswith("/topic/") else ""
            )
            raise Forbidden(
                f"clients cannot send to {destination}", hint or "server-only destination"
            )
        target = destinations.parse(destination, session.user_id)
        if target.kind is Kind.APP:
            if self._app_handler(target.name) is None:
                raise BrokerError(
                    f"no handler for {destination}", "unknown application destination"
                )
            if len(self._app_targets) < APP_TARGETS_MAX:  # handlers are never removed
                self._app_targets[destination] = target
        elif not acl_allows(self.config.acl, target.name, session.user_id, "send"):
            raise Forbidden(f"not allowed to send to {destination}")
        return target

    async def allow_send(self, session: Session, target: Destination) -> bool:
        """Sliding-window SEND limit per user; a notice on /user/queue/errors once a window."""
        cfg = self.config
        bucket = "signal" if target.name in SIGNAL_DESTINATIONS else "send"
        window_ms = int(cfg.send_window_s * 1000)
        now = now_ms()
        user_id = session.user_id
        decision = await self.backplane.hit(
            f"stomp:{bucket}:{user_id}", cfg.send_limit, window_ms, now
        )
        if decision.allowed:
            return True
        metrics.DROPS.labels("rate_limited").inc()
        notice = await self.backplane.hit(f"stomp:notice:{bucket}:{user_id}", 1, window_ms, now)
        if notice.allowed:
            body = {
                "error": "rate_limited",
                "detail": f"more than {cfg.send_limit} SEND frames in {cfg.send_window_s:g} s;"
                " frames are dropped until the window frees up",
                "destination": target.name,
                "retryAfterMs": decision.retry_after_ms,
            }
            await self.backplane.publish(
                Delivery(
                    kind="user",
                    destination="/user/queue/errors",
                    body=json.dumps(body).encode(),
                    headers=(("content-type", "application/json"),),
                    user_id=user_id,
                    message_id=new_id(),
                )
            )
        return False

    async def send(
        self, session: Session, target: Destination, frame: stomp.Frame
    ) -> Completion | None:
        """Carry out an authorized SEND (now, or at COMMIT). For an /app destination,
        the handler's completion, if it returned one: the caller must run it
        (`complete_app`), in frame order."""
        if target.kind is Kind.APP:
            handler = self._app_handler(target.name)
            if handler is None:
                raise BrokerError(f"no handler for {target.name}")
            assert session.info is not None
            try:
                return await handler(session.info, frame)
            except BrokerError:
                raise
            except Exception:
                log.exception("app handler for %s failed", target.name)
                raise BrokerError(
                    f"internal error handling {target.name}", "the request was not processed"
                ) from None
        headers = tuple(h for h in frame.headers if h[0] not in RESERVED_HEADERS)
        if target.kind is Kind.QUEUE:
            queue = self._queues.get(target.name)
            if queue is None:
                queue = self._queues[target.name] = _Queue(target.name)
            if len(queue.backlog) >= self.config.queue_max_messages:
                metrics.DROPS.labels("queue_full").inc()
                raise BrokerError(
                    f"queue {target.name} is full",
                    f"{self.config.queue_max_messages} messages wait for a consumer",
                )
            queue.backlog.append(QueueMessage(new_id(), frame.body, headers))
            self.dispatch(queue)
        else:
            await self.backplane.publish(
                Delivery("topic", target.name, frame.body, headers, message_id=new_id())
            )
        return None

    @staticmethod
    async def complete_app(name: str, completion: Completion) -> None:
        """Run an /app handler's completion; its failures become BrokerErrors, as the
        handler's own do in `send`."""
        try:
            await completion()
        except BrokerError:
            raise
        except Exception:
            log.exception("app handler for %s failed", name)
            raise BrokerError(
                f"internal error handling {name}", "the request was not processed"
            ) from None

    # ------------------------------------------------------------------ SUBSCRIBE
    async def subscribe(self, session: Session, sub_id: str, destination: str, ack: str) -> None:
        if ack not in ("auto", "client", "client-individual"):
            raise BrokerError(
                f"invalid ack mode {ack}", "ack must be auto, client or client-individual"
            )
        user_id = session.user_id
        target = destinations.parse(destination, user_id)
        sub = Subscription(session, sub_id, destination, target, ack)
        if target.kind is Kind.APP:
            raise BrokerError(
                f"cannot subscribe to {destination}", "/app destinations only take SEND"
            )
        if target.kind is Kind.CHANNEL:
            assert target.channel_id is not None
            try:
                allowed = await self.hooks.can_subscribe_channel(user_id, target.channel_id)
            except Exception:
                log.exception("can_subscribe_channel hook failed")
                allowed = False
            if not allowed:
                raise Forbidden(
                    f"not allowed to subscribe to {destination}", "not a member of this channel"
                )
            if session.state is not State.CONNECTED:
                return
        elif target.kind in (Kind.QUEUE, Kind.TOPIC):
            if not acl_allows(self.config.acl, target.name, user_id, "subscribe"):
                raise Forbidden(f"not allowed to subscribe to {destination}")
        session.subscriptions[sub_id] = sub
        if target.kind in (Kind.USER, Kind.PRESENCE):
            if target.name == PRIVATE_QUEUE:
                # buffer live deliveries from the moment the subscription is visible
                sub.buffer = []
            self._user_subs.setdefault((user_id, target.name), []).append(sub)
            if target.kind is Kind.PRESENCE:
                self._presence_viewers[user_id] = self._presence_viewers.get(user_id, 0) + 1
            if target.name == PRIVATE_QUEUE:
                await self._initial_messages(sub)
        elif target.kind is Kind.QUEUE:
            queue = self._queues.get(target.name)
            if queue is None:
                queue = self._queues[target.name] = _Queue(target.name)
            queue.consumers.append(sub)
            sub.queue = queue
            self.dispatch(queue)
        else:
            self._topic_subs.setdefault(target.name, []).append(sub)

    async def _initial_messages(self, sub: Subscription) -> None:
        """Register the subscriber, then offline messages first (oldest first), then the
        live ones that arrived meanwhile.

        Order matters: the subscription already buffers live deliveries when the
        backplane registration makes senders see the user as reachable (they then
        skip the offline queue), and the offline queue is read only after that, so a
        message is either queued before the read, or published after the subscription
        exists.
        """
        session = sub.session
        user_id = session.user_id
        try:
            await self.backplane.subscriber_add(
                PRIVATE_QUEUE, user_id, session.id, now_ms(), int(self.config.presence_ttl_s * 1000)
            )
            initial = await self.hooks.initial_messages(user_id)
        except Exception:
            log.exception("subscribing %s to the private queue failed", user_id)
            self.unsubscribe(sub)
            raise BrokerError("could not load queued messages", "try subscribing again") from None
        if sub.buffer is None:
            return  # unsubscribed (or closed) meanwhile: the buffer was handed back
        seen: set[str] = set()
        for message in initial:
            if message.message_id in seen:
                continue
            seen.add(message.message_id)
            if not session.deliver(sub, message.message_id, message.body, message.headers):
                return  # closing: still queued; unsubscribe hands back the buffer
        buffered, sub.buffer = sub.buffer, None
        for i, (message_id, body, headers) in enumerate(buffered):
            if message_id not in seen and not session.deliver(sub, message_id, body, headers):
                self.hand_back(user_id, [m for m, _, _ in buffered[i:] if m not in seen])
                return

    def unsubscribe(self, sub: Subscription) -> None:
        """End a subscription; its unacked queue messages go back to the queue."""
        session = sub.session
        if session.subscriptions.get(sub.id) is not sub:
            return
        del session.subscriptions[sub.id]
        target = sub.target
        if target.kind in (Kind.USER, Kind.PRESENCE):
            _discard(self._user_subs, (session.user_id, target.name), sub)
            if target.kind is Kind.PRESENCE:
                left = self._presence_viewers.get(session.user_id, 0) - 1
                if left > 0:
                    self._presence_viewers[session.user_id] = left
                else:
                    self._presence_viewers.pop(session.user_id, None)
            if target.name == PRIVATE_QUEUE and target.kind is Kind.USER:
                user_id = session.user_id
                self._recent_private[user_id] = trio.current_time()
                if sub.buffer:
                    self.hand_back(user_id, [m for m, _, _ in sub.buffer])
                sub.buffer = None
                if not _has_private(session):
                    self._unregister.append((user_id, session.id))
        elif target.kind is Kind.QUEUE and sub.queue is not None:
            queue = sub.queue
            if sub in queue.consumers:
                queue.consumers.remove(sub)
        else:
            _discard(self._topic_subs, target.name, sub)
        entries = list(sub.unacked.values())
        sub.unacked.clear()
        for entry in entries:
            session.acks.pop(entry.ack_id, None)
        self.requeue(sub, entries)
        if sub.queue is not None and not sub.queue.consumers and not sub.queue.backlog:
            self._queues.pop(sub.queue.name, None)

    # ------------------------------------------------------------------ queues
    def requeue(self, sub: Subscription, entries: list[Pending]) -> None:
        """NACKed or abandoned messages: queue messages go back to the front, redelivered."""
        queue = sub.queue
        dropped = 0
        back: list[str] = []
        for entry in reversed(entries):
            if entry.queue_msg is not None and queue is not None:
                msg = entry.queue_msg
                msg.redelivered = True
                msg.avoid = sub
                queue.backlog.appendleft(msg)
            elif entry.track:
                back.append(entry.message_id)  # private queue: offline, next SUBSCRIBE
            else:
                dropped += 1  # topic/user messages are not redelivered
        if dropped:
            metrics.DROPS.labels("nacked").inc(dropped)
        if back:
            self.hand_back(sub.session.user_id, back[::-1])
        if queue is not None:
            if queue.name not in self._queues and queue.backlog:
                self._queues[queue.name] = queue
            self.dispatch(queue)

    def dispatch(self, queue: _Queue) -> None:
        """Hand waiting messages to consumers, round-robin, respecting the prefetch bound."""
        prefetch = self.config.outbound_queue_frames
        while queue.backlog:
            ready = [
                s
                for s in queue.consumers
                if s.session.state is State.CONNECTED
                and (s.ack == "auto" or len(s.unacked) < prefetch)
            ]
            if not ready:
                return
            msg = queue.backlog[0]
            start = queue.next % len(ready)
            order = ready[start:] + ready[:start]
            chosen = next((s for s in order if s is not msg.avoid), order[0])
            queue.next = (ready.index(chosen) + 1) % max(1, len(ready))
            queue.backlog.popleft()
            if not chosen.session.deliver(
                chosen,
                msg.message_id,
                msg.body,
                msg.headers,
                redelivered=msg.redelivered,
                queue_msg=msg,
            ):
                queue.backlog.appendleft(msg)  # that session is closing now; try the others

    # ------------------------------------------------------------------ fan-out
    async def _on_delivery(self, delivery: Delivery) -> None:
        """Backplane handler: deliver to this node's subscriptions. Never raises."""
        try:
            if delivery.kind == "user":
                self._deliver_user(delivery)
            elif delivery.kind == "topic":
                message_id = delivery.message_id or new_id()
                shared: dict[tuple[str, str, str], Outbound | None] = {}  # encode once per key
                for sub in list(self._topic_subs.get(delivery.destination, ())):
                    if sub.session.id != delivery.exclude_session:
                        sub.session.deliver(
                            sub, message_id, delivery.body, delivery.headers, shared=shared
                        )
            elif delivery.kind == "presence":
                await self._deliver_presence(delivery)
            elif delivery.kind == "control":
                self._control(delivery)
            else:
                log.warning("ignoring delivery of unknown kind %r", delivery.kind)
        except Exception:
            log.exception("delivery to %s failed", delivery.destination)
        await self.flush()

    def _deliver_user(self, delivery: Delivery) -> None:
        user_id = delivery.user_id
        if not user_id:
            log.warning("user delivery to %s without user_id", delivery.destination)
            return
        dest = delivery.destination
        own = f"/user/{user_id}/"
        if dest.startswith(own):  # the Spring form a service may use
            dest = "/user/" + dest[len(own) :]
        message_id = delivery.message_id or new_id()
        subs = list(self._user_subs.get((user_id, dest), ()))
        accepted = attempted = False
        for sub in subs:
            if sub.session.id == delivery.exclude_session:
                continue
            attempted = True
            if sub.buffer is not None:
                if len(sub.buffer) >= self.config.outbound_queue_frames:
                    sub.session.slow_consumer()
                    continue
                sub.buffer.append((message_id, delivery.body, delivery.headers))
                accepted = True
                continue
            if sub.session.deliver(sub, message_id, delivery.body, delivery.headers):
                accepted = True
        if dest != PRIVATE_QUEUE or accepted:
            return
        # At-least-once: a private message that reached none of the user's sessions goes
        # back to the offline queue when a session here was meant to take it (it was
        # closing or too slow), or the user's last subscription here ended so recently
        # that the sender may still have seen it registered.
        recent = self._recent_private.get(user_id)
        if attempted or (
            not subs
            and recent is not None
            and trio.current_time() - recent <= self.config.handback_grace_s
        ):
            self.hand_back(user_id, [message_id])

    async def _deliver_presence(self, delivery: Delivery) -> None:
        """kind "presence": `user_id`'s presence changed; deliver it on /topic/presence to
        the local subscribers among that user's peers (hooks.peers_of), nobody else.

        Cost is O(local presence subscribers): the peer set is asked for only when some
        other user here subscribes to presence, and nothing is sent per non-subscriber.
        """
        subject = delivery.user_id
        if not subject:
            log.warning("presence delivery without user_id")
            return
        if not any(u != subject for u in self._presence_viewers):
            return
        try:
            peers = await self.hooks.peers_of(subject)
        except Exception:
            log.exception("peers_of hook failed; presence change of %s not delivered", subject)
            return
        message_id = delivery.message_id or new_id()
        shared: dict[tuple[str, str, str], Outbound | None] = {}  # encode once per key
        # the subscriber set may have changed during the await: read it again; walk the
        # smaller of the two sets
        viewers = self._presence_viewers
        small, big = (peers, viewers) if len(peers) <= len(viewers) else (viewers, peers)
        for user_id in sorted(u for u in small if u in big and u != subject):
            for sub in list(self._user_subs.get((user_id, PRESENCE_TOPIC), ())):
                sub.session.deliver(sub, message_id, delivery.body, delivery.headers, shared=shared)

    def _control(self, delivery: Delivery) -> None:
        """kind "control": header `action` = "unsubscribe" (end `user_id`'s subscriptions to
        `destination`) or "disconnect" (close `user_id`'s sessions, only those of login
        session `session-key` when that header is given; header `message`)."""
        headers = dict(delivery.headers)
        action = headers.get("action")
        sessions = list(self._by_user.get(delivery.user_id or "", ()))
        if action == "unsubscribe":
            for session in sessions:
                for sub in list(session.subscriptions.values()):
                    if sub.target.name == delivery.destination:
                        self.unsubscribe(sub)
        elif action == "disconnect":
            key = headers.get("session-key")
            message = headers.get("message", "disconnected by the server")
            if key is not None:
                self._remember_ended(key, message)
            for session in sessions:
                if key is not None and session.session_key != key:
                    continue
                session.close(message, code=1008)
        else:
            log.warning("ignoring control delivery with action %r", action)

    # ------------------------------------------------------------------ queries
    def user_sessions(self, user_id: str) -> list[SessionInfo]:
        """Connected sessions of `user_id` on this node."""
        return [s.info for s in self._by_user.get(user_id, ()) if s.info is not None]


def _has_private(session: Session) -> bool:
    return any(
        s.target.kind is Kind.USER and s.target.name == PRIVATE_QUEUE
        for s in session.subscriptions.values()
    )


def _discard(
    index: dict[tuple[str, str], list[Subscription]] | dict[str, list[Subscription]],
    key: object,
    sub: Subscription,
) -> None:
    subs = index.get(key)  # type: ignore[call-overload]
    if subs is not None and sub in subs:
        subs.remove(sub)
        if not subs:
            del index[key]  # type: ignore[arg-type]
