"""One STOMP connection, whatever carries it (TCP, TLS or WebSocket).

A transport adapter wraps its socket in a `Connection` and calls
`Broker.serve_connection(conn)`; the `Session` then runs three tasks in its own
nursery (inside the transport's handler task, so inside the server's nursery):

- reader: bytes -> `stomp.Parser` -> frames, handled one at a time in arrival order
  (a slow `/app` handler back-pressures that one client, nobody else);
- completer: SENDs to a pipelined `/app` handler (chat messages) do not hold the
  reader while their store write commits: the handler validates and queues the write,
  the reader reads on, and this task runs the handlers' completions (wait for the
  commit, deliver, RECEIPT) one at a time in frame order, at most
  `BrokerConfig.pipeline_depth` in flight. Any other frame (but an ACK/NACK without a
  receipt), and any error, waits until the SENDs before it are complete, so replies
  keep frame order. When the connection
  ends first, the completions still queued settle their writes (delivered if stored);
  only their RECEIPTs are lost;
- writer: drains the bounded outbound queue; the adapter writes everything queued in
  one send (WebSocket: still one STOMP frame per WebSocket message). When the adapter
  offers `send_nowait` (a raw socket), frames queued while the writer is idle skip
  it: the broker's write pass (`Broker.write_forever`) sends, once per scheduler
  pass, everything each such connection got in one `send()` (no task switch per
  frame; a RECEIPT and a MESSAGE produced in the same pass share a syscall). Without
  a running write pass the producing task writes the frame at once. Only what the
  kernel did not take wakes the writer;
- timer: CONNECT timeout, heart-beats out, silent-peer detection.

Every protocol violation becomes one ERROR frame (`message` header, `receipt-id` when
the frame asked for a receipt), flushed within `close_grace_s`, then the connection
closes. The outbound queue is bounded in frames and bytes: a client that cannot keep up
gets ERROR "slow consumer" and is closed; nobody else waits for it.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import trio

import stomp
from securecollab.broker import metrics
from securecollab.broker.destinations import PRIVATE_QUEUE, Destination, Kind
from securecollab.broker.errors import BrokerError
from securecollab.broker.hooks import Credentials, SessionInfo
from securecollab.ids import new_id
from securecollab.settle import settling

if TYPE_CHECKING:
    from securecollab.broker.core import Broker, Completion, QueueMessage, _Queue

log = logging.getLogger(__name__)

# Headers of a client SEND that are the broker's to set on MESSAGE frames.
RESERVED_HEADERS = frozenset(
    {
        "destination",
        "subscription",
        "message-id",
        "ack",
        "receipt",
        "receipt-id",
        "transaction",
        "content-length",
        "redelivered",
    }
)
MAX_TRANSACTIONS = 64  # open transactions per session
MAX_TX_FRAMES = 1_000  # frames buffered in one transaction
DEVICE_ID_MAX = 128


class TransportClosed(Exception):
    """The peer went away while we were writing."""


@dataclass(slots=True)
class Outbound:
    """One encoded STOMP frame (or heart-beat) waiting for the writer."""

    data: bytes
    text: bool  # the body is valid UTF-8: a WebSocket adapter may send a text message
    command: str  # "" for a heart-beat
    delivered: tuple[str, str] | None = None  # (user_id, message_id): report once written


HEARTBEAT = Outbound(stomp.HEARTBEAT_BYTES, True, "")


class Connection(Protocol):
    """What a transport adapter provides to a Session."""

    transport: str  # "tcp" | "ws"
    peer: str  # remote address
    bearer: str | None  # `Authorization: Bearer` of a WebSocket upgrade

    async def receive(self) -> bytes | None:
        """Next chunk of bytes from the peer; None once the peer closed."""
        ...

    async def send(self, items: Sequence[Outbound]) -> None:
        """Write frames in order; raise TransportClosed if the peer is gone."""
        ...

    async def close(self, code: int) -> None:
        """Close the connection (WebSocket close `code`); must not raise."""
        ...

    # Optional: `send_nowait(items) -> bool`, a synchronous write that returns True when
    # all of `items` reached the kernel and False when (part of) them stayed buffered in
    # the adapter, to be written by the next `send` (an attribute set to None, or absent,
    # when the adapter cannot write without waiting, e.g. TLS).


class State(Enum):
    NEW = "new"  # waiting for CONNECT
    CONNECTED = "connected"
    CLOSING = "closing"  # final frame queued; no more input handled


@dataclass(eq=False, slots=True)
class Pending:
    """A MESSAGE sent on a client-ack subscription, not yet ACKed or NACKed."""

    ack_id: str
    message_id: str
    queue_msg: QueueMessage | None = None  # set for /queue/<name> messages (redelivery)
    track: bool = False  # /user/queue/private: report to hooks.on_delivered on ACK


@dataclass(eq=False, slots=True)
class Subscription:
    session: Session
    id: str
    destination: str  # as the client wrote it (MESSAGE `destination` header)
    target: Destination  # normalized
    ack: str  # "auto" | "client" | "client-individual"
    unacked: OrderedDict[str, Pending] = field(default_factory=OrderedDict)
    # While `initial_messages` loads, live deliveries wait here (None afterwards).
    buffer: list[tuple[str, bytes, tuple[tuple[str, str], ...]]] | None = None
    queue: _Queue | None = None
    # The fixed parts of this subscription's ack:auto MESSAGE frames, when its id and
    # destination hold nothing to escape (`_auto_message`); None otherwise.
    plain_head: tuple[str, str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if _NOT_PLAIN.search(self.id) is None and _NOT_PLAIN.search(self.destination) is None:
            self.plain_head = (
                f"MESSAGE\nsubscription:{self.id}\nmessage-id:",
                f"\ndestination:{self.destination}\n",
            )


class Session:
    """Protocol state of one client connection; see the module docstring."""

    def __init__(self, broker: Broker, conn: Connection) -> None:
        self.broker = broker
        self.conn = conn
        self.config = broker.config
        self.id = new_id()
        self.parser = stomp.Parser(
            "1.2",
            stomp.Limits(
                max_frame_bytes=self.config.max_frame_bytes,
                max_headers=self.config.max_headers,
                max_header_line=self.config.max_header_line,
                max_body_bytes=self.config.max_frame_bytes,
            ),
            side="server",
        )
        self.version = "1.2"
        self.state = State.NEW
        self.info: SessionInfo | None = None
        self.session_key: str | None = None  # Identity.session_key, set at CONNECT
        self.subscriptions: dict[str, Subscription] = {}
        self.transactions: dict[str, list[stomp.Frame]] = {}
        self.acks: dict[str, tuple[Subscription, Pending]] = {}
        self.close_code = 1000
        self.send_ms = 0  # negotiated: we send a heart-beat this often (0: never)
        self.expect_ms = 0  # negotiated: the peer sends this often (0: never)
        now = trio.current_time()
        self.last_recv = now
        self.last_send = now
        self._ack_seq = 0
        self._out: deque[Outbound] = deque()
        self._inflight: list[Outbound] = []  # the batch the writer is sending right now
        self._out_bytes = 0
        self._wake = trio.Event()
        self._send_nowait = getattr(conn, "send_nowait", None)
        self._writer_idle = False  # the writer waits for work (a direct write may go)
        self._write_pending = False  # queued for the broker's next write pass
        self._to_report: dict[str, list[str]] = {}  # written, on_delivered not yet told
        self._timer_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reader_scope: trio.CancelScope | None = None
        # pipelined SENDs not complete yet, oldest (the one the completer runs) first:
        # (completion, receipt, destination)
        self._pipe: deque[tuple[Completion, str | None, str]] = deque()
        self._pipe_idle: trio.lowlevel.Task | None = None  # the completer, parked
        self._pipe_moved: trio.Event | None = None  # set when one completed (reader waits)

    # ------------------------------------------------------------------ lifecycle
    @property
    def user_id(self) -> str:
        assert self.info is not None
        return self.info.user_id

    async def run(self) -> None:
        """Serve the connection until either side closes it; always cleans up."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._timer_loop)
                if self.config.pipeline_depth > 1:
                    nursery.start_soon(self._complete_loop)
        finally:
            self.state = State.CLOSING
            if self._pipe:
                # Shielded; bounded by `settle.SETTLE_S` for all of them (the SEND that was
                # running when the session ended settled within its own bound before).
                with trio.CancelScope(shield=True):
                    await self._settle_left()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 5
                try:
                    await self.broker.detach(self)
                finally:
                    await self.conn.close(self.close_code)

    def close(self, message: str | None, detail: str = "", *, code: int = 1000) -> None:
        """Close from outside the reader (shutdown, control delivery): ERROR first if `message`."""
        if message is None:
            self._begin_close(None, code=code)
        else:
            self._begin_close(self._error_frame(message, detail, None), code=code)

    def _begin_close(
        self, final: stomp.Frame | None, *, discard_queued: bool = False, code: int = 1000
    ) -> None:
        if self.state is State.CLOSING:
            return
        self.state = State.CLOSING
        self.close_code = code
        if discard_queued:
            self._out.clear()
            self._out_bytes = 0
        if final is not None:
            item = self._outbound(final)
            if item is not None:
                self._out.append(item)
        self._wake.set()
        self._timer_wake.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        if self._nursery is not None:
            # The writer gets close_grace_s to flush; a peer that does not read is cut off.
            scope = self._nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + self.config.close_grace_s)

    def _abort(self) -> None:
        self.state = State.CLOSING
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def fail(
        self,
        message: str,
        detail: str = "",
        receipt: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Send ERROR `message` (receipt-id when the frame asked for a receipt), then close."""
        metrics.ERRORS.inc()
        self._begin_close(self._error_frame(message, detail, receipt, extra))

    def _error_frame(
        self,
        message: str,
        detail: str,
        receipt: str | None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> stomp.Frame:
        headers: list[tuple[str, str]] = [("message", message)]
        if receipt is not None:
            headers.append(("receipt-id", receipt))
        headers.extend(extra)
        body = (detail or message).encode()
        headers += [
            ("content-type", "text/plain;charset=utf-8"),
            ("content-length", str(len(body))),
        ]
        return stomp.Frame("ERROR", tuple(headers), body)

    # ------------------------------------------------------------------ reader
    async def _read_loop(self) -> None:
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            while True:
                data = await self.conn.receive()
                if data is None:
                    self._abort()  # peer closed: nothing more to say to it
                    return
                self.last_recv = trio.current_time()
                error: stomp.ProtocolError | None = None
                try:
                    events = self.parser.feed(data)
                except stomp.ProtocolError as exc:
                    events, error = exc.events, exc
                for event in events:
                    if isinstance(event, stomp.Frame):
                        await self._handle(event)
                        if self.state is State.CLOSING:
                            return
                if error is not None:
                    metrics.FRAMES_IN.labels("invalid").inc()
                    await self._fail_in_order(error.message, f"{error.reason}: {error.message}")
                    return

    async def _handle(self, frame: stomp.Frame) -> None:
        metrics.frames_in(frame.command).inc()
        receipt = frame.get("receipt")
        try:
            if self.state is State.NEW:
                if frame.command not in ("CONNECT", "STOMP"):
                    raise BrokerError(
                        f"expected CONNECT, got {frame.command}",
                        "the first frame on a connection must be CONNECT or STOMP",
                    )
                await self._on_connect(frame)
                return
            handler = _HANDLERS.get(frame.command)
            if handler is None:  # the parser validates commands; CONNECT lands here
                raise BrokerError(
                    "already connected", f"{frame.command} is only allowed as the first frame"
                )
            if self._pipe and frame.command != "SEND" and not _ack_alone(frame, receipt):
                await self._drain()  # replies in frame order: after the SENDs before it
            accepted = await handler(self, frame)
            if receipt is not None and accepted and self.state is State.CONNECTED:
                self._receipt(receipt)
        except BrokerError as exc:
            await self._fail_in_order(exc.message, exc.detail, receipt)
        await self.broker.flush()  # e.g. NACKed or unsubscribed private messages

    def _receipt(self, receipt: str) -> None:
        """Queue RECEIPT `receipt` (the caller checked the state)."""
        if _NOT_PLAIN.search(receipt) is None:  # written as is by every version
            data = b"RECEIPT\nreceipt-id:%s\n\n\x00" % receipt.encode()
            self._push(Outbound(data, not self.config.ws_always_binary, "RECEIPT"))
        else:
            self.push_frame(stomp.Frame("RECEIPT", (("receipt-id", receipt),)))

    # ------------------------------------------------------------------ CONNECT
    async def _on_connect(self, frame: stomp.Frame) -> None:
        cfg = self.config
        try:
            version = stomp.negotiate_version(frame.get("accept-version"))
            client_hb = stomp.parse_heartbeat(frame.get("heart-beat"))
        except stomp.ProtocolError as exc:
            self.fail(
                exc.message,
                f"{exc.reason}: {exc.message}",
                frame.get("receipt"),
                (("version", ",".join(stomp.VERSIONS)),) if exc.reason == "bad-version" else (),
            )
            return
        self.version = version
        self.parser.version = version
        device = frame.get("device-id")
        if device is not None and not (0 < len(device) <= DEVICE_ID_MAX):
            raise BrokerError(
                "invalid device-id", f"device-id must be 1..{DEVICE_ID_MAX} characters"
            )
        identity = await self.broker.authenticate(
            Credentials(
                login=frame.get("login") or None,
                passcode=frame.get("passcode") or None,
                bearer=self.conn.bearer,
                host=frame.get("host"),
                peer=self.conn.peer,
            )
        )
        self.send_ms, self.expect_ms = stomp.negotiate_heartbeat(
            client_hb, (cfg.heartbeat_send_ms, cfg.heartbeat_recv_ms)
        )
        self.session_key = identity.session_key
        self.info = SessionInfo(
            session_id=self.id,
            user_id=identity.user_id,
            roles=identity.roles,
            device_id=device or identity.device_id or "web",
            transport=self.conn.transport,
            peer=self.conn.peer,
        )
        self.state = State.CONNECTED
        self.push_frame(
            stomp.Frame(
                "CONNECTED",
                (
                    ("version", version),
                    ("heart-beat", f"{self.send_ms},{self.expect_ms}"),
                    ("server", cfg.server_name),
                    ("session", self.id),
                    ("user-name", identity.user_id),
                ),
            )
        )
        self.last_recv = trio.current_time()
        self._timer_wake.set()
        await self.broker.attach(self)

    # ------------------------------------------------------------------ SEND
    async def _on_send(self, frame: stomp.Frame) -> bool:
        """False: no RECEIPT now (dropped by the rate limit, or pipelined: the
        completer sends it)."""
        target = self.broker.authorize_send(self, frame.get("destination", ""))
        tx = frame.get("transaction")
        pipelined = tx is None and self.config.pipeline_depth > 1 and self.broker.pipelined(target)
        if pipelined:
            while len(self._pipe) >= self.config.pipeline_depth:
                await self._pipe_wait()  # room first: once submitted, it must be queued
        elif self._pipe:
            await self._drain()
        if self.state is not State.CONNECTED:
            return False
        if not await self.broker.allow_send(self, target):
            return False  # dropped by the rate limit: no receipt
        if tx is not None:
            self._tx_buffer(tx, frame)
            return True
        done = await self.broker.send(self, target, frame)
        if done is None:
            if not (pipelined and self._pipe):
                return True
            done = _nothing  # its RECEIPT follows those of the SENDs before it
        if pipelined:
            # no checkpoint since the handler queued its write: queued here for sure
            self._pipe.append((done, frame.get("receipt"), target.name))
            idle = self._pipe_idle
            if idle is not None:
                self._pipe_idle = None
                trio.lowlevel.reschedule(idle)
            return False
        await self.broker.complete_app(target.name, done)
        return True

    # ------------------------------------------------------------------ pipelined SENDs
    async def _pipe_wait(self) -> None:
        """Until the completer finished one more pipelined SEND."""
        moved = self._pipe_moved
        if moved is None:
            moved = self._pipe_moved = trio.Event()
        await moved.wait()

    async def _drain(self) -> None:
        """Until every pipelined SEND read so far is complete."""
        while self._pipe:
            await self._pipe_wait()

    async def _fail_in_order(self, message: str, detail: str, receipt: str | None = None) -> None:
        """`fail`, once the pipelined SENDs before the failing frame got their RECEIPTs."""
        await self._drain()
        self.fail(message, detail, receipt)

    async def _complete_loop(self) -> None:
        """The completer (see the module docstring)."""
        pipe = self._pipe
        while True:
            if not pipe:
                self._pipe_idle = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_idle)
                continue
            done, receipt, name = pipe[0]
            try:
                # cancelled in here, the completion settles its own work first
                await self.broker.complete_app(name, done)
            except BrokerError as exc:
                self.fail(exc.message, exc.detail, receipt)
            else:
                if receipt is not None and self.state is State.CONNECTED:
                    self._receipt(receipt)
            finally:
                pipe.popleft()  # even cancelled: a completion settles itself (not again)
                moved = self._pipe_moved
                if moved is not None:
                    self._pipe_moved = None
                    moved.set()
            await self.broker.flush()
        # Cancelled: the completions still queued are settled by `run` once every task
        # of the session ended (`_settle_left`), which also catches one the reader
        # queued after this task ended.

    def _abort_idle(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._pipe_idle = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _settle_left(self) -> None:
        """The session ended with pipelined SENDs not completed: their writes are queued
        in the store. Each completion, called in a cancelled scope, settles its write
        shielded (delivered if stored), in frame order; no RECEIPTs any more. Run after
        every task of the session ended: a reader cancelled while its handler yielded
        after queueing a write (PostgreSQL's channel send) still queues the completion.
        All of them together get one `settle.SETTLE_S` (`settle.settling`)."""
        with settling():  # one bound for all of them
            while self._pipe:
                done, _receipt, name = self._pipe.popleft()
                with trio.CancelScope() as cancelled:
                    cancelled.cancel()
                    try:
                        await done()
                    except Exception:
                        log.exception("settling a pipelined SEND to %s failed", name)

    def _tx_buffer(self, tx: str, frame: stomp.Frame) -> None:
        frames = self.transactions.get(tx)
        if frames is None:
            raise BrokerError(
                f"unknown transaction {tx}",
                f"{frame.command} names a transaction that was not begun",
            )
        if len(frames) >= MAX_TX_FRAMES:
            raise BrokerError(
                f"transaction {tx} is too large", f"at most {MAX_TX_FRAMES} frames per transaction"
            )
        frames.append(frame)

    # ------------------------------------------------------------------ SUBSCRIBE
    async def _on_subscribe(self, frame: stomp.Frame) -> bool:
        destination = frame.get("destination", "")
        sub_id = frame.get("id") or destination  # STOMP 1.0 allows no id
        if sub_id in self.subscriptions:
            raise BrokerError(f"subscription id {sub_id} is already in use")
        ack = frame.get("ack", "auto")
        await self.broker.subscribe(self, sub_id, destination, ack)
        return True

    async def _on_unsubscribe(self, frame: stomp.Frame) -> bool:
        sub_id = frame.get("id")
        if sub_id is None:  # STOMP 1.0: by destination
            dest = frame.get("destination")
            sub_id = next(
                (s.id for s in self.subscriptions.values() if s.destination == dest), None
            )
        sub = self.subscriptions.get(sub_id or "")
        if sub is None:
            raise BrokerError(f"no subscription with id {sub_id}")
        self.broker.unsubscribe(sub)
        return True

    # ------------------------------------------------------------------ ACK / NACK
    def _resolve_ack(self, frame: stomp.Frame) -> tuple[Subscription, Pending]:
        if self.version == "1.2":
            ack_id = frame.get("id", "")
            found = self.acks.get(ack_id)
            if found is None:
                raise BrokerError(
                    f"{frame.command} of unknown id {ack_id}",
                    "the id does not match an unacknowledged message on this connection",
                )
            return found
        message_id = frame.get("message-id", "")
        sub_ids = (
            [frame.get("subscription", "")] if self.version == "1.1" else list(self.subscriptions)
        )
        for sub_id in sub_ids:
            sub = self.subscriptions.get(sub_id)
            if sub is not None:
                for pending in sub.unacked.values():
                    if pending.message_id == message_id:
                        return sub, pending
        raise BrokerError(
            f"{frame.command} of unknown message-id {message_id}",
            "the message-id does not match an unacknowledged message on this connection",
        )

    async def _on_ack(self, frame: stomp.Frame) -> bool:
        sub, pending = self._resolve_ack(frame)
        tx = frame.get("transaction")
        if tx is not None:
            self._tx_buffer(tx, frame)
            return True
        await self._apply_ack(sub, pending, nack=frame.command == "NACK")
        return True

    async def _apply_ack(self, sub: Subscription, pending: Pending, *, nack: bool) -> None:
        """ACK/NACK one message; in `client` mode every earlier one of the subscription too."""
        if sub.ack == "client":
            entries: list[Pending] = []
            for key in list(sub.unacked):
                entries.append(sub.unacked.pop(key))
                if key == pending.ack_id:
                    break
        else:
            entries = [sub.unacked.pop(pending.ack_id)]
        for entry in entries:
            self.acks.pop(entry.ack_id, None)
        if nack:
            self.broker.requeue(sub, entries)
        else:
            tracked = [e.message_id for e in entries if e.track]
            if tracked:
                await self.broker.delivered([(self.user_id, m) for m in tracked])
            if sub.queue is not None:
                self.broker.dispatch(sub.queue)  # room under the prefetch limit again

    # ------------------------------------------------------------------ transactions
    async def _on_begin(self, frame: stomp.Frame) -> bool:
        tx = frame.get("transaction", "")
        if tx in self.transactions:
            raise BrokerError(f"transaction {tx} already started")
        if len(self.transactions) >= MAX_TRANSACTIONS:
            raise BrokerError(
                "too many open transactions", f"at most {MAX_TRANSACTIONS} per connection"
            )
        self.transactions[tx] = []
        return True

    async def _on_commit(self, frame: stomp.Frame) -> bool:
        tx = frame.get("transaction", "")
        frames = self.transactions.pop(tx, None)
        if frames is None:
            raise BrokerError(f"COMMIT of unknown transaction {tx}")
        for buffered in frames:
            if buffered.command == "SEND":
                target = self.broker.authorize_send(self, buffered.get("destination", ""))
                done = await self.broker.send(self, target, buffered)
                if done is not None:
                    await self.broker.complete_app(target.name, done)
            else:
                sub, pending = self._resolve_ack(buffered)
                await self._apply_ack(sub, pending, nack=buffered.command == "NACK")
            if self.state is not State.CONNECTED:
                break
        return True

    async def _on_abort(self, frame: stomp.Frame) -> bool:
        tx = frame.get("transaction", "")
        if self.transactions.pop(tx, None) is None:
            raise BrokerError(f"ABORT of unknown transaction {tx}")
        return True

    async def _on_disconnect(self, frame: stomp.Frame) -> bool:
        receipt = frame.get("receipt")
        final = None if receipt is None else stomp.Frame("RECEIPT", (("receipt-id", receipt),))
        self._begin_close(final)
        return False  # the receipt (if any) is already queued

    # ------------------------------------------------------------------ outbound
    def _outbound(
        self, frame: stomp.Frame, delivered: tuple[str, str] | None = None
    ) -> Outbound | None:
        """Encode for this session's version; None if the frame cannot be sent at all."""
        data = _plain_encode(frame)
        if data is None:
            try:
                data = stomp.encode(frame, self.version)
            except ValueError:
                # A sender on a newer version may relay headers this version cannot carry
                # (1.0 escapes nothing: no CR/LF in values, no ":" in names; 1.1 has no CR).
                # Per recipient: CR/LF in values become spaces, names that cannot be
                # written are dropped; the other subscribers get the headers as sent.
                try:
                    data = stomp.encode(_representable(frame, self.version), self.version)
                except ValueError as exc:  # not from a relayed header: a bug, never a crash
                    log.error("cannot encode %s for STOMP %s: %s", frame.command, self.version, exc)
                    metrics.DROPS.labels("unencodable").inc()
                    return None
        return Outbound(data, self._is_text(frame.body), frame.command, delivered)

    def _is_text(self, body: bytes) -> bool:
        """May a WebSocket adapter send this body in a text message (valid UTF-8)?"""
        if self.config.ws_always_binary:
            return False
        if body.isascii():
            return True
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def push_frame(self, frame: stomp.Frame, delivered: tuple[str, str] | None = None) -> bool:
        """Queue a frame for the writer; False when it was not queued (closing or slow)."""
        if self.state is State.CLOSING:
            metrics.DROPS.labels("closing").inc()
            return False
        item = self._outbound(frame, delivered)
        if item is None:
            return False
        return self._push(item)

    def _push(self, item: Outbound) -> bool:
        """Queue an encoded frame (the caller checked the state); False if too slow."""
        cfg = self.config
        if (
            self._out
            and (
                len(self._out) >= cfg.outbound_queue_frames
                or self._out_bytes + len(item.data) > cfg.outbound_queue_bytes
            )
            and not self._room_after_write(item)
        ):
            self.slow_consumer()
            return False
        if self._writer_idle and self._send_nowait is not None and not self._inflight:
            if self.broker.coalescing:
                # the broker's write pass sends it, with whatever else this connection
                # gets in this scheduler pass, in one send()
                self._out.append(item)
                self._out_bytes += len(item.data)
                if not self._write_pending:
                    self._write_pending = True
                    self.broker.write_soon(self)
                return True
            if not self._out:
                # nothing is queued or being written: write from this task, in order
                if self._send_nowait((item,)):
                    self._written((item,))
                else:
                    self._inflight = [item]  # the rest is in the adapter's buffer
                    self._wake.set()
                return True
        self._out.append(item)
        self._out_bytes += len(item.data)
        self._wake.set()
        return True

    def _room_after_write(self, item: Outbound) -> bool:
        """The queue is full; if what it holds only waits for the write pass, write it now
        and say whether `item` fits then. A burst in one scheduler pass (a queue's backlog
        for a new consumer, a reconnect's offline messages) must not make a client that
        reads a slow consumer: the kernel takes what it can, as a direct write does."""
        if not self._write_pending:
            return False
        self.write_queued()  # still in the broker's write queue: the pass finds this sent
        cfg = self.config
        return not self._out or (
            len(self._out) < cfg.outbound_queue_frames
            and self._out_bytes + len(item.data) <= cfg.outbound_queue_bytes
        )

    def write_queued(self) -> None:
        """The broker's write pass: send everything queued in one `send_nowait` if the
        writer task is idle (else the writer has it); only what the kernel did not take
        wakes the writer."""
        self._write_pending = False
        if not self._out or not self._writer_idle or self._inflight or self._wake.is_set():
            return
        assert self._send_nowait is not None
        batch = list(self._out)
        self._out.clear()
        self._out_bytes = 0
        if self._send_nowait(batch):
            self._written(batch)
        else:
            self._inflight = batch  # the rest is in the adapter's buffer
            self._wake.set()

    def _written(self, items: Sequence[Outbound]) -> None:
        """Bookkeeping for frames the adapter wrote to the kernel."""
        self.last_send = trio.current_time()
        metrics.WRITES.inc()
        delivered: list[tuple[str, str]] = []
        for item in items:
            metrics.frames_out(item.command).inc()
            if item.delivered is not None:
                delivered.append(item.delivered)
        if delivered:
            report = self.broker.to_report(delivered)
            if report:
                for user_id, ids in report.items():
                    self._to_report.setdefault(user_id, []).extend(ids)
                self._wake.set()

    def slow_consumer(self) -> None:
        """The outbound queue is full: drop it, send ERROR "slow consumer", close."""
        if self.state is State.CLOSING:
            return
        cfg = self.config
        for user_id, message_id in self._unwritten(self._out):
            self.broker.hand_back(user_id, [message_id])
        metrics.SLOW_CONSUMER_DISCONNECTS.inc()
        metrics.DROPS.labels("slow_consumer").inc(len(self._out) + 1)
        metrics.ERRORS.inc()
        self._begin_close(
            self._error_frame(
                "slow consumer",
                f"more than {cfg.outbound_queue_frames} frames or {cfg.outbound_queue_bytes}"
                " bytes were waiting for this connection",
                None,
            ),
            discard_queued=True,
            code=1008,
        )

    def deliver(
        self,
        sub: Subscription,
        message_id: str,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        redelivered: bool = False,
        queue_msg: QueueMessage | None = None,
        shared: dict[tuple[str, str, str], Outbound | None] | None = None,
    ) -> bool:
        """Queue one MESSAGE for `sub`; track it for ACK unless ack:auto. False if not queued.

        `shared`: one fan-out's encoded frames, keyed by (version, subscription id,
        destination). Untracked ack:auto deliveries with equal keys are byte-identical,
        so a fan-out to N subscribers encodes once per key, not N times.
        """
        track = sub.target.name == PRIVATE_QUEUE and sub.target.kind is Kind.USER
        if shared is not None and sub.ack == "auto" and not (track or redelivered):
            if self.state is State.CLOSING:
                metrics.DROPS.labels("closing").inc()
                return False
            key = (self.version, sub.id, sub.destination)
            if key in shared:
                item = shared[key]
            else:
                item = shared[key] = self._outbound(
                    stomp.Frame("MESSAGE", _message_headers(sub, message_id, body, headers), body)
                )
            if item is None or not self._push(item):
                return False
            metrics.deliveries(sub.target.kind.value).inc()
            return True
        if sub.ack == "auto" and not redelivered:
            data = _auto_message(sub, message_id, body, headers)
            if data is not None:  # else: the general encoder below
                if self.state is State.CLOSING:
                    metrics.DROPS.labels("closing").inc()
                    return False
                delivered = (self.user_id, message_id) if track else None
                if not self._push(Outbound(data, self._is_text(body), "MESSAGE", delivered)):
                    return False
                metrics.deliveries(sub.target.kind.value).inc()
                return True
        out: list[tuple[str, str]] = [
            ("subscription", sub.id),
            ("message-id", message_id),
            ("destination", sub.destination),
        ]
        pending: Pending | None = None
        if sub.ack != "auto":
            self._ack_seq += 1
            pending = Pending(f"{self.id[:8]}-{self._ack_seq}", message_id, queue_msg, track)
            if self.version == "1.2":
                out.append(("ack", pending.ack_id))
        if redelivered:
            out.append(("redelivered", "true"))
        out.extend(h for h in headers if h[0] not in RESERVED_HEADERS)
        out.append(("content-length", str(len(body))))
        frame = stomp.Frame("MESSAGE", tuple(out), body)
        delivered = (self.user_id, message_id) if track and pending is None else None
        if not self.push_frame(frame, delivered):
            return False
        metrics.deliveries(sub.target.kind.value).inc()
        if pending is not None:
            sub.unacked[pending.ack_id] = pending
            self.acks[pending.ack_id] = (sub, pending)
        return True

    @staticmethod
    def _unwritten(items: Sequence[Outbound]) -> list[tuple[str, str]]:
        return [item.delivered for item in items if item.delivered is not None]

    def take_unwritten(self) -> list[tuple[str, str]]:
        """(user_id, message_id) of ack:auto private messages queued or being sent but not
        known to be written; clears them. Called once the connection has ended."""
        lost = self._unwritten(self._inflight) + self._unwritten(self._out)
        self._inflight = []
        self._out.clear()
        self._out_bytes = 0
        return lost

    async def _write_loop(self) -> None:
        while True:
            while not (self._out or self._inflight or self._to_report):
                if self.state is State.CLOSING:
                    self._abort()
                    return
                self._writer_idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._writer_idle = False
                self._wake = trio.Event()
            if self._to_report:
                report, self._to_report = self._to_report, {}
                await self.broker.report_delivered(report)  # filtered in `_written`
                continue
            batch = list(self._out)
            self._out.clear()
            self._out_bytes = 0
            # a direct write's unwritten rest goes first (the adapter buffered it);
            # cut off mid-send: `take_unwritten` counts all of it as unsent
            sending = self._inflight + batch if self._inflight else batch
            self._inflight = sending
            try:
                await self.conn.send(batch)
            except TransportClosed:
                self._abort()
                return
            self._inflight = []
            self._written(sending)

    # ------------------------------------------------------------------ timers
    async def _timer_loop(self) -> None:
        connect_deadline = trio.current_time() + self.config.connect_timeout_s
        while True:
            now = trio.current_time()
            wake = math.inf
            if self.state is State.CLOSING:
                return
            if self.state is State.NEW:
                if now >= connect_deadline:
                    self.fail(
                        "no CONNECT frame received",
                        f"connections must send CONNECT within {self.config.connect_timeout_s:g} s",
                    )
                    return
                wake = connect_deadline
            else:
                if self.send_ms:
                    due = self.last_send + self.send_ms / 1000
                    if now >= due:
                        if not self._out:
                            self._out.append(HEARTBEAT)
                            self._out_bytes += 1
                            self._wake.set()
                        due = now + self.send_ms / 1000
                    wake = min(wake, due)
                if self.expect_ms:
                    limit = self.last_recv + 2 * self.expect_ms / 1000
                    if now >= limit:
                        self.fail(
                            "heart-beat timeout",
                            f"nothing received for {2 * self.expect_ms} ms"
                            f" (negotiated interval {self.expect_ms} ms)",
                        )
                        return
                    wake = min(wake, limit)
            with trio.move_on_at(wake):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()


def _message_headers(
    sub: Subscription, message_id: str, body: bytes, headers: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """MESSAGE headers of an untracked ack:auto delivery (as `Session.deliver` builds them)."""
    return (
        ("subscription", sub.id),
        ("message-id", message_id),
        ("destination", sub.destination),
        *(h for h in headers if h[0] not in RESERVED_HEADERS),
        ("content-length", str(len(body))),
    )


# What some STOMP version escapes (1.1/1.2) or cannot carry (1.0) in a header name or value.
_NOT_PLAIN = re.compile(r"[\\\r\n:\x00]")


def _plain_encode(frame: stomp.Frame) -> bytes | None:
    """`stomp.encode(frame, version)`, the same bytes for every version, when no header name
    or value holds a character that some version escapes or refuses (every frame the
    server writes on the hot path: MESSAGE, RECEIPT); None otherwise, for the caller to
    encode the usual way. ~1 us less per frame than the general encoder.
    """
    body = frame.body
    search = _NOT_PLAIN.search
    parts = [frame.command]
    has_length = False
    for name, value in frame.headers:
        if not name or search(name) is not None or search(value) is not None:
            return None
        if name == "content-length" and not has_length:
            if value != str(len(body)):
                return None  # the general encoder checks (or refuses) it
            has_length = True
        parts.append(f"{name}:{value}")
    if body and not has_length:
        parts.append(f"content-length:{len(body)}")
    parts.append("")
    parts.append("")
    return "\n".join(parts).encode() + body + b"\x00"


_EXTRA_MAX = 256  # distinct delivery header tuples remembered by `_plain_extra`
_extra_cache: dict[tuple[tuple[str, str], ...], str | None] = {}


def _plain_extra(headers: tuple[tuple[str, str], ...]) -> str | None:
    """The lines a MESSAGE carries for a delivery's own headers (reserved ones dropped),
    or None when one needs escaping. Deliveries reuse a few header tuples: cached."""
    try:
        return _extra_cache[headers]
    except KeyError:
        pass
    search = _NOT_PLAIN.search
    lines: list[str] = []
    text: str | None = None
    for name, value in headers:
        if name in RESERVED_HEADERS:
            continue
        if not name or search(name) is not None or search(value) is not None:
            break
        lines.append(f"{name}:{value}\n")
    else:
        text = "".join(lines)
    if len(_extra_cache) < _EXTRA_MAX:
        _extra_cache[headers] = text
    return text


def _auto_message(
    sub: Subscription, message_id: str, body: bytes, headers: tuple[tuple[str, str], ...]
) -> bytes | None:
    """The ack:auto, not redelivered MESSAGE of `Session.deliver` (same headers, same order,
    same bytes as `stomp.encode` in every version), written from the subscription's cached
    parts; None when something needs escaping (then the general path encodes it)."""
    head = sub.plain_head
    if head is None or _NOT_PLAIN.search(message_id) is not None:
        return None
    extra = _plain_extra(headers)
    if extra is None:
        return None
    text = f"{head[0]}{message_id}{head[1]}{extra}content-length:{len(body)}\n\n"
    return text.encode() + body + b"\x00"


def _representable(frame: stomp.Frame, version: str) -> stomp.Frame:
    """`frame` with the headers `version` cannot carry made representable (see `_outbound`)."""
    bad_value = "\r\n\x00" if version == "1.0" else "\r\x00"
    bad_name = "\r\n\x00:" if version == "1.0" else "\r\x00"
    headers: list[tuple[str, str]] = []
    for name, value in frame.headers:
        if not name or any(c in name for c in bad_name):
            metrics.DROPS.labels("unrepresentable_header").inc()
            continue
        if any(c in value for c in bad_value):
            value = value.replace("\x00", "").replace("\r\n", " ").replace("\r", " ")
            if version == "1.0":
                value = value.replace("\n", " ")
        headers.append((name, value))
    return stomp.Frame(frame.command, tuple(headers), frame.body)


_HANDLERS = {
    "SEND": Session._on_send,
    "SUBSCRIBE": Session._on_subscribe,
    "UNSUBSCRIBE": Session._on_unsubscribe,
    "ACK": Session._on_ack,
    "NACK": Session._on_ack,
    "BEGIN": Session._on_begin,
    "COMMIT": Session._on_commit,
    "ABORT": Session._on_abort,
    "DISCONNECT": Session._on_disconnect,
}


async def _nothing() -> None:
    """The completion of a pipelined SEND whose handler returned none."""


def _ack_alone(frame: stomp.Frame, receipt: str | None) -> bool:
    """An ACK/NACK that asks for no RECEIPT: its effect (a message of this connection's
    subscriptions settled) does not depend on the SENDs before it, and it has no reply to
    keep in order, so it need not wait for pipelined SENDs (clients ACK every message
    they receive while they send: `securecollab.client`). A refused one still waits (its
    ERROR comes after the RECEIPTs before it)."""
    return receipt is None and frame.command in ("ACK", "NACK")
