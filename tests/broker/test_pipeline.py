"""Pipelined SENDs: a connection's SENDs to a `pipelined=True` /app handler.

The handler runs in the reader, in frame order; the completion it returns runs in the
session's completer, one at a time and in frame order, while the reader reads on (at
most `BrokerConfig.pipeline_depth` in flight). Replies keep frame order: a SEND's
RECEIPT follows its completion, and any other frame (or error) waits until the SENDs
before it are complete. These tests drive a handler whose completions wait on events
the test sets, so each step of that ordering can be observed from outside: what the
handler and its completions did (`Pipe.log`) and what the client received.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

import stomp
from securecollab.backplane import Delivery
from securecollab.broker.config import AclRule
from securecollab.broker.core import Completion
from securecollab.broker.errors import AppError
from securecollab.broker.hooks import BrokerHooks, SessionInfo

from .clients import Client, eventually, tcp_client
from .harness import BrokerServer, broker_server

OPEN = (AclRule("/topic/*", ("*",), ("*",)), AclRule("/queue/*", ("*",), ("*",)))
PIPE = "/app/pipe"
PLAIN = "/app/plain"
QUIET_S = 0.2  # how long "nothing arrives" is watched (a blocked reply would show by then)


class Pipe:
    """A pipelined /app handler. Each SEND's body names it ("1", "2", ...); the handler
    logs `handle N` and returns a completion that logs `start N`, waits for `release(N)`
    and logs `done N`. `refuse` (handler) and `fail` (completion) raise AppError for
    those names; for `instant` ones the handler returns no completion (nothing to
    wait for: allowed by `AppHandler`). A completion cancelled while waiting, or called
    in an already cancelled scope (the connection closed before its turn), settles: it
    logs `settled N`, shielded, and lets the cancellation go on, as the contract asks."""

    def __init__(
        self,
        *,
        refuse: Sequence[str] = (),
        fail: Sequence[str] = (),
        instant: Sequence[str] = (),
    ) -> None:
        self.log: list[str] = []
        self.gates: dict[str, trio.Event] = {}
        self.refuse = set(refuse)
        self.fail = set(fail)
        self.instant = set(instant)
        self.running = 0
        self.max_running = 0
        self.called_cancelled: list[str] = []  # completions called in a cancelled scope

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    def release(self, *names: str) -> None:
        for name in names:
            self.gate(name).set()

    async def handler(self, _info: SessionInfo, frame: stomp.Frame) -> Completion | None:
        name = frame.body.decode()
        self.log.append(f"handle {name}")
        if name in self.refuse:
            raise AppError(f"refused {name}", "the handler refused it")
        if name in self.instant:
            return None
        gate = self.gate(name)

        async def completion() -> None:
            self.log.append(f"start {name}")
            if trio.current_effective_deadline() == -math.inf:
                self.called_cancelled.append(name)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                await gate.wait()
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.checkpoint()  # the settling work: shielded, it runs
                    self.log.append(f"settled {name}")
                raise
            finally:
                self.running -= 1
            if name in self.fail:
                self.log.append(f"failed {name}")
                raise AppError(f"failed {name}", "the completion failed")
            self.log.append(f"done {name}")

        return completion

    async def handled(self, *names: str) -> None:
        """Until the handler was called for each of `names`."""
        await eventually(lambda: all(f"handle {n}" in self.log for n in names), f"handled {names}")


@asynccontextmanager
async def pipe_server(pipe: Pipe, **config: Any) -> AsyncIterator[BrokerServer]:
    """A broker with `pipe` on /app/pipe (pipelined) and an open ACL for /topic, /queue."""
    async with broker_server(acl=OPEN, send_limit=1_000, **config) as srv:
        srv.broker.register_app_handler(PIPE, pipe.handler, pipelined=True)
        yield srv


async def send(client: Client, name: str, destination: str = PIPE) -> None:
    """SEND body `name` with receipt `r<name>`, without waiting for anything."""
    await client.frame("SEND", {"destination": destination, "receipt": f"r{name}"}, name)


async def receipt_ids(client: Client, count: int) -> list[str]:
    """The receipt-ids of the next `count` frames, which must all be RECEIPTs."""
    return [(await client.next("RECEIPT")).get("receipt-id", "") for _ in range(count)]


def steps(log: list[str]) -> list[str]:
    """The completions' entries of `log` (the handler's run in the reader, interleaved)."""
    return [e for e in log if not e.startswith("handle")]


def index(log: list[str], entry: str) -> int:
    assert entry in log, f"{entry!r} not in {log}"
    return log.index(entry)


async def test_completions_run_in_frame_order_while_the_reader_reads_on() -> None:
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        for n in ("1", "2", "3"):
            await send(a, n)
        # the reader read on: the handler ran for all three before any completion ended
        await pipe.handled("1", "2", "3")
        assert await a.quiet(QUIET_S) == []  # no RECEIPT before its completion ran
        assert [e for e in pipe.log if e.startswith(("done", "failed"))] == []
        assert [e for e in pipe.log if e.startswith("handle")] == [
            "handle 1",
            "handle 2",
            "handle 3",
        ]
        assert steps(pipe.log) == ["start 1"]  # one completion at a time

        pipe.release("1")
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        assert "done 1" in pipe.log  # the RECEIPT followed its completion
        await eventually(lambda: "start 2" in pipe.log)
        pipe.release("3")  # out of order: 3 waits for 2, whose completion still runs
        assert await a.quiet(QUIET_S) == []
        assert "start 3" not in pipe.log

        pipe.release("2")
        assert await receipt_ids(a, 2) == ["r2", "r3"]
        assert steps(pipe.log) == ["start 1", "done 1", "start 2", "done 2", "start 3", "done 3"]
        assert pipe.max_running == 1
        assert not a.closed.is_set()


async def test_depth_one_handles_each_send_to_its_end_before_reading_on() -> None:
    pipe = Pipe()
    async with pipe_server(pipe, pipeline_depth=1) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        for n in ("1", "2", "3"):
            await send(a, n)
        await eventually(lambda: "start 1" in pipe.log)
        assert await a.quiet(QUIET_S) == []
        assert pipe.log == ["handle 1", "start 1"]  # frame 2 is not read yet

        pipe.release("1")
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        await eventually(lambda: "start 2" in pipe.log)
        assert pipe.log == ["handle 1", "start 1", "done 1", "handle 2", "start 2"]

        pipe.release("2", "3")
        assert await receipt_ids(a, 2) == ["r2", "r3"]
        assert pipe.log[-3:] == ["handle 3", "start 3", "done 3"]


async def test_depth_bounds_the_sends_in_flight() -> None:
    pipe = Pipe()
    async with pipe_server(pipe, pipeline_depth=2) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        for n in ("1", "2", "3", "4"):
            await send(a, n)
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        assert "handle 3" not in pipe.log  # two in flight: the third waits for room

        pipe.release("1")
        await pipe.handled("3")
        assert index(pipe.log, "done 1") < index(pipe.log, "handle 3")
        assert "handle 4" not in pipe.log  # 2 and 3 in flight again

        pipe.release("2", "3", "4")
        assert await receipt_ids(a, 4) == ["r1", "r2", "r3", "r4"]
        assert index(pipe.log, "done 2") < index(pipe.log, "handle 4")


async def test_a_subscribe_waits_for_the_sends_before_it() -> None:
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await send(a, "2")
        await a.frame("SUBSCRIBE", {"destination": "/topic/t", "id": "0", "receipt": "rs"})
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        [session] = srv.broker.sessions.values()
        assert session.subscriptions == {}  # not handled before the SENDs completed

        pipe.release("1", "2")
        assert await receipt_ids(a, 3) == ["r1", "r2", "rs"]
        assert list(session.subscriptions) == ["0"]


async def test_a_disconnect_receipt_follows_the_sends_before_it() -> None:
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await send(a, "2")
        await a.frame("DISCONNECT", {"receipt": "bye"})
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        assert not a.closed.is_set()

        pipe.release("1", "2")
        assert await receipt_ids(a, 3) == ["r1", "r2", "bye"]
        await a.wait_closed()
        assert pipe.log[-2:] == ["start 2", "done 2"]


async def test_a_topic_send_waits_for_the_pipelined_sends_before_it() -> None:
    pipe = Pipe()
    async with (
        pipe_server(pipe) as srv,
        tcp_client(srv.tcp_port) as a,
        tcp_client(srv.tcp_port) as b,
    ):
        await a.connect(passcode="token-alice")
        await b.connect(passcode="token-bob")
        await b.subscribe("/topic/t")
        await send(a, "1")
        await send(a, "2")
        await send(a, "t", "/topic/t")
        await pipe.handled("1", "2")
        assert await b.quiet(QUIET_S) == []  # not published before the SENDs completed
        assert await a.quiet(0) == []

        pipe.release("1", "2")
        assert await receipt_ids(a, 3) == ["r1", "r2", "rt"]
        assert (await b.next("MESSAGE")).body == b"t"


async def test_a_send_to_a_plain_app_handler_waits_for_the_pipelined_sends() -> None:
    pipe = Pipe()

    async def plain(_info: SessionInfo, frame: stomp.Frame) -> None:
        pipe.log.append(f"plain {frame.body.decode()}")

    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        srv.broker.register_app_handler(PLAIN, plain)
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await send(a, "2")
        await send(a, "p", PLAIN)
        await send(a, "3")
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        assert "plain p" not in pipe.log

        pipe.release("1", "2", "3")
        assert await receipt_ids(a, 4) == ["r1", "r2", "rp", "r3"]
        assert index(pipe.log, "done 2") < index(pipe.log, "plain p") < index(pipe.log, "handle 3")


async def test_a_refused_send_errors_after_the_receipts_of_those_before_it() -> None:
    pipe = Pipe(refuse=["3"])
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        for n in ("1", "2", "3", "4"):
            await send(a, n)
        await pipe.handled("1", "2", "3")
        assert await a.quiet(QUIET_S) == []  # the ERROR waits for the SENDs before it
        assert not a.closed.is_set()

        pipe.release("1", "2")
        assert await receipt_ids(a, 2) == ["r1", "r2"]
        error = await a.expect_error("refused 3")
        assert error.get("receipt-id") == "r3"
        assert a.frames == []
        assert "handle 4" not in pipe.log  # nothing after the failing frame is handled
        assert pipe.log[-1] == "done 2"


async def test_a_failed_completion_errors_and_the_later_ones_still_settle() -> None:
    pipe = Pipe(fail=["2"])
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        for n in ("1", "2", "3", "4"):
            await send(a, n)
        await pipe.handled("1", "2", "3", "4")
        assert await a.quiet(QUIET_S) == []

        pipe.release("1", "2")  # 3 and 4 are never released: only cancellation ends them
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        error = await a.expect_error("failed 2")
        assert error.get("receipt-id") == "r2"
        assert a.frames == []  # no RECEIPT for 3 or 4
        # the completions queued after the failure are still called, and settle
        await eventually(lambda: not srv.broker.sessions, "session cleaned up")
        assert "settled 3" in pipe.log and "settled 4" in pipe.log
        assert index(pipe.log, "failed 2") < index(pipe.log, "start 3")
        assert index(pipe.log, "start 3") < index(pipe.log, "start 4")


async def test_a_closed_socket_still_settles_every_queued_completion() -> None:
    pipe = Pipe()
    async with pipe_server(pipe) as srv:
        async with tcp_client(srv.tcp_port) as a:
            await a.connect(passcode="token-alice")
            for n in ("1", "2", "3"):
                await send(a, n)
            await pipe.handled("1", "2", "3")
            await eventually(lambda: "start 1" in pipe.log)
        # the client is gone with three completions in flight; none was released
        await eventually(lambda: not srv.broker.sessions, "session cleaned up")
        assert steps(pipe.log) == [
            "start 1",
            "settled 1",  # cancelled while waiting
            "start 2",
            "settled 2",  # called after the close: in a cancelled scope
            "start 3",
            "settled 3",
        ]
        assert pipe.called_cancelled == ["2", "3"]
        assert pipe.running == 0


# ---------------------------------------------------------------- found in review


async def test_a_send_without_completion_is_receipted_after_the_sends_before_it() -> None:
    pipe = Pipe(instant=["2"])
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await send(a, "2")
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []  # r2 must wait for r1
        pipe.release("1")
        assert await receipt_ids(a, 2) == ["r1", "r2"]


async def test_a_completion_queued_as_the_session_is_cancelled_is_still_called() -> None:
    """PostgresStore.submit_message queues its write with `MemorySendChannel.send`,
    which takes the item and then yields (`cancel_shielded_checkpoint`). When the
    session is cancelled in that scheduler pass (the writer's TransportClosed, a
    heart-beat timeout, shutdown), the idle completer may run its `finally` before the
    reader resumes and queues the completion: nobody calls it, and the message that
    committed is never delivered. The handler below queues like that store and cancels
    the session at that point; trio runs the two woken tasks in either order, so each
    attempt hits the race about half of the time."""
    attempts = 20
    queued: Counter[str] = Counter()
    called: Counter[str] = Counter()
    writes, _write_queue = trio.open_memory_channel[str](attempts)

    async with broker_server(acl=OPEN) as srv:

        async def handler(_info: SessionInfo, frame: stomp.Frame) -> Completion:
            name = frame.body.decode()
            writes.send_nowait(name)  # what MemorySendChannel.send does first, then:
            queued[name] += 1
            [session] = srv.broker.sessions.values()
            session._abort()  # the session is cancelled in this scheduler pass ...
            await trio.lowlevel.cancel_shielded_checkpoint()  # ... as send() yields

            async def completion() -> None:
                called[name] += 1  # a real one settles its write here, shielded

            return completion

        srv.broker.register_app_handler(PIPE, handler, pipelined=True)
        for n in range(attempts):
            async with tcp_client(srv.tcp_port) as a:
                await a.connect(passcode="token-alice")
                await send(a, str(n))
                await a.wait_closed()
            await eventually(lambda: not srv.broker.sessions, "session cleaned up")
    assert sum(queued.values()) == attempts
    assert called == queued


async def test_an_unparsable_frame_errors_after_the_receipts_of_the_sends_before_it() -> None:
    """A frame the STOMP parser refuses (here an unknown command) after a pipelined SEND:
    its ERROR closes the connection, so it must wait for the SEND's RECEIPT, as a
    SEND handled to its end before the next frame was read (pipeline_depth=1) had it."""
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await pipe.handled("1")
        await a.send_raw(b"BOGUS\n\n\x00")
        assert await a.quiet(QUIET_S) == []  # the ERROR waits for the SEND before it
        assert not a.closed.is_set()

        pipe.release("1")
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        error = await a.next("ERROR")
        assert "BOGUS" in error.get("message", ""), error
        await a.wait_closed()
        assert steps(pipe.log) == ["start 1", "done 1"]


async def test_an_unparsable_frame_read_with_a_send_errors_after_its_receipt() -> None:
    """The same, with the SEND and the refused frame arriving in one read: the parser
    returns the SEND and then its error from one `feed`."""
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        sending = stomp.Frame.make("SEND", {"destination": PIPE, "receipt": "r1"}, "1")
        await a.send_raw(stomp.encode(sending, a.version) + b"BOGUS\n\n\x00")
        await pipe.handled("1")
        assert await a.quiet(QUIET_S) == []
        assert not a.closed.is_set()

        pipe.release("1")
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        error = await a.next("ERROR")
        assert "BOGUS" in error.get("message", ""), error
        await a.wait_closed()
        assert steps(pipe.log) == ["start 1", "done 1"]


# ------------------------------------------------------- ACK / NACK among pipelined SENDs

PRIVATE = "/user/queue/private"


def reporting_hooks(log: list[str]) -> BrokerHooks:
    """Hooks that log what the broker reports of /user/queue/private into `log` (the
    `Pipe.log` of the test), so an ACK's effect is ordered against the completions:
    `delivered <id>` (ACKed: `on_delivered`) and `undelivered <id>` (NACKed:
    `on_undelivered`)."""

    async def on_delivered(_user_id: str, ids: list[str]) -> None:
        log.extend(f"delivered {i}" for i in ids)

    async def on_undelivered(_user_id: str, ids: list[str]) -> None:
        log.extend(f"undelivered {i}" for i in ids)

    return BrokerHooks(on_delivered=on_delivered, on_undelivered=on_undelivered)


async def private_messages(srv: BrokerServer, client: Client, *ids: str) -> dict[str, str]:
    """Subscribe `client` (alice) to /user/queue/private in client-individual mode and
    deliver it messages `ids`: their ack headers, by message-id."""
    await client.subscribe(PRIVATE, "p", ack="client-individual")
    for mid in ids:
        await srv.backplane.publish(Delivery("user", PRIVATE, b"{}", (), "alice", mid))
    acks: dict[str, str] = {}
    for _ in ids:
        message = await client.next("MESSAGE")
        acks[message.get("message-id", "")] = message.get("ack", "")
    assert sorted(acks) == sorted(ids) and all(acks.values()), acks
    return acks


async def test_an_ack_without_receipt_takes_effect_while_the_sends_before_it_wait() -> None:
    """What a client does all the time (`securecollab.client` ACKs every private message
    it receives while it sends): an ACK/NACK that asks for no RECEIPT has no reply to
    keep in order and settles a message of its own subscription, so it is handled at
    once, not after the pipelined SENDs before it."""
    pipe = Pipe()
    hooks = reporting_hooks(pipe.log)
    async with pipe_server(pipe, hooks=hooks) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        acks = await private_messages(srv, a, "m1", "m2")
        await send(a, "1")
        await send(a, "2")
        await pipe.handled("1", "2")
        await a.frame("ACK", {"id": acks["m1"]})
        await eventually(lambda: "delivered m1" in pipe.log, "ACK handled")
        await a.frame("NACK", {"id": acks["m2"]})
        await eventually(lambda: "undelivered m2" in pipe.log, "NACK handled")
        # both took effect while the first completion still waits, and replied nothing
        assert steps(pipe.log) == ["start 1", "delivered m1", "undelivered m2"]
        [session] = srv.broker.sessions.values()
        assert session.acks == {}
        assert await a.quiet(QUIET_S) == []

        pipe.release("1", "2")
        assert await receipt_ids(a, 2) == ["r1", "r2"]
        assert await a.quiet(QUIET_S) == []
        assert not a.closed.is_set()


async def test_an_ack_with_a_receipt_waits_for_the_sends_before_it() -> None:
    """Its RECEIPT is a reply: it comes after the RECEIPTs of the SENDs before it, and
    the ACK is handled then (as any frame but a SEND)."""
    pipe = Pipe()
    hooks = reporting_hooks(pipe.log)
    async with pipe_server(pipe, hooks=hooks) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        acks = await private_messages(srv, a, "m1")
        await send(a, "1")
        await send(a, "2")
        await a.frame("ACK", {"id": acks["m1"], "receipt": "ra"})
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        assert "delivered m1" not in pipe.log  # not handled before the SENDs completed

        pipe.release("1")
        assert (await a.next("RECEIPT")).get("receipt-id") == "r1"
        assert await a.quiet(QUIET_S) == []  # still behind SEND 2
        assert "delivered m1" not in pipe.log

        pipe.release("2")
        assert await receipt_ids(a, 2) == ["r2", "ra"]
        assert steps(pipe.log) == ["start 1", "done 1", "start 2", "done 2", "delivered m1"]


async def test_a_refused_ack_without_receipt_errors_after_the_sends_before_it() -> None:
    """An ACK of an unknown id is refused with an ERROR, which closes the connection:
    the ERROR still waits for the RECEIPTs of the SENDs before it."""
    pipe = Pipe()
    async with pipe_server(pipe) as srv, tcp_client(srv.tcp_port) as a:
        await a.connect(passcode="token-alice")
        await send(a, "1")
        await send(a, "2")
        await a.frame("ACK", {"id": "no-such-id"})
        await pipe.handled("1", "2")
        assert await a.quiet(QUIET_S) == []
        assert not a.closed.is_set()

        pipe.release("1", "2")
        assert await receipt_ids(a, 2) == ["r1", "r2"]
        await a.expect_error("ACK of unknown id no-such-id")
        assert steps(pipe.log) == ["start 1", "done 1", "start 2", "done 2"]


async def test_pipelined_is_a_property_of_the_registration_not_of_the_handler() -> None:
    """One handler object on two destinations, registered pipelined on one of them only
    (and under a prefix): only SENDs to that registration are pipelined."""
    from securecollab.broker.destinations import parse

    async def handler(*_args: Any) -> None:
        return None

    async with broker_server() as srv:
        broker = srv.broker
        broker.register_app_handler("/app/fast", handler, pipelined=True)
        broker.register_app_handler("/app/slow", handler)
        broker.register_app_handler("/app/many/", handler, pipelined=True)
        broker.register_app_handler("/app/many/exact", handler)
        assert broker.pipelined(parse("/app/fast", "u@example.com"))
        assert not broker.pipelined(parse("/app/slow", "u@example.com"))
        assert broker.pipelined(parse("/app/many/x", "u@example.com"))
        assert not broker.pipelined(parse("/app/many/exact", "u@example.com"))
        assert not broker.pipelined(parse("/app/unknown", "u@example.com"))
        assert not broker.pipelined(parse("/topic/fast", "u@example.com"))
