"""A hostile STOMP client, over raw TCP and /ws, against a live server.

After every case: the server answered with ERROR frames that carry a `message` header
(when the connection got far enough to be answered), the connection is closed, a
separate healthy pair of sessions still sends and receives, and the server log holds
no ERROR record (an unhandled exception in a task logs one). Bounded: a few hundred
cases plus ~500 random-frame connections, in parallel batches.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import stomp
from tests.broker.clients import Client, tcp_client, ws_client
from tests.hardening.shared import SharedServer, server_errors
from tests.support.server import free_port, running_server

IV = "AAAAAAAAAAAAAAAA"
SETTLE_S = 0.5  # how long a case waits for the server to answer or close (a bound, not a goal)
BATCH = 25  # cases in flight at once


@pytest.fixture(scope="module")
def server_overrides() -> dict[str, Any]:
    # a connection that never completes CONNECT is closed after 1 s (the cases rely on it)
    return {"stomp__connect_timeout_s": 1.0, "http__max_body_bytes": 1 << 20}


def _frame(command: str, headers: dict[str, str], body: bytes | str = b"") -> bytes:
    return stomp.encode(stomp.Frame.make(command, headers, body), "1.2")


def _connect(token: str, **extra: str) -> bytes:
    return _frame("CONNECT", {"accept-version": "1.2", "host": "x", "passcode": token, **extra})


def _send_chat(body: bytes | str, receipt: str = "r") -> bytes:
    return _frame("SEND", {"destination": "/app/chat/send", "receipt": receipt}, body)


async def _settle(client: Client) -> None:
    """Wait until the server closes the connection, or SETTLE_S passed."""
    with trio.move_on_after(SETTLE_S):
        await client.closed.wait()


def _check_answers(client: Client, case: str, expect: str | None, *, must_close: bool) -> None:
    errors = [f for f in client.frames if f.command == "ERROR"]
    for f in errors:
        assert f.get("message"), (case, f)
    if expect is not None:
        said = [f.get("message", "") + " " + f.body.decode("utf-8", "replace") for f in errors]
        assert any(expect in text for text in said), (case, client.frames)
    if must_close:
        assert client.closed.is_set(), (case, "server did not close", client.frames)
    if errors:  # an ERROR is always the last thing a connection hears
        assert client.frames[-1].command == "ERROR", (case, client.frames)


async def _tcp_case(
    port: int,
    token: str | None,
    payload: bytes | list[bytes],
    case: str,
    expect: str | None = None,
    *,
    must_close: bool = True,
) -> None:
    async with tcp_client(port) as client:
        if token is not None:
            await client.send_raw(_connect(token))
            assert (await client.next()).command == "CONNECTED"
        chunks = payload if isinstance(payload, list) else [payload]
        try:
            for chunk in chunks:
                await client.send_raw(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server already hung up: what it said is checked below
        await _settle(client)
        _check_answers(client, case, expect, must_close=must_close)


async def _in_batches(calls: list[Callable[[], Awaitable[None]]]) -> None:
    for start in range(0, len(calls), BATCH):
        async with trio.open_nursery() as nursery:
            for call in calls[start : start + BATCH]:
                nursery.start_soon(call)


async def _healthy(srv: SharedServer, tag: str) -> None:
    """A separate sender and receiver still work: SEND with RECEIPT, MESSAGE arrives."""
    async with tcp_client(srv.stomp_port) as bob, tcp_client(srv.stomp_port) as alice:
        await bob.send_raw(_connect(srv.tokens["bob@example.com"]))
        assert (await bob.next()).command == "CONNECTED"
        await bob.subscribe("/user/queue/private")
        await alice.send_raw(_connect(srv.tokens["alice@example.com"]))
        assert (await alice.next()).command == "CONNECTED"
        body = {
            "to": "bob@example.com",
            "encryptedContent": "QUJD",
            "iv": IV,
            "clientMessageId": tag,
        }
        await alice.receipt("SEND", {"destination": "/app/chat/send"}, json.dumps(body), rid=tag)
        while True:  # earlier cases may have left messages queued for bob: skip those
            frame = await bob.next("MESSAGE")
            if json.loads(frame.body).get("clientMessageId") == tag:
                break


# ---------------------------------------------------------------- the cases

WEIRD_DESTINATIONS = [
    ("/user/../queue/private", "destination /user/../queue/private"),
    ("/user/queue/../private", "invalid"),
    ("/topic/messages/../../x", "invalid"),
    ("/topic/messages/", "invalid"),
    ("", "unknown destination"),
    ("/", "unknown destination"),
    ("/queue/ümlaut/\u202e", "not allowed"),
    ("/topic/" + "x" * 10_000, "Header line exceeds"),
    ("/topic/" + "x" * 8_000, "not allowed"),
    ("/user/bob@example.com/queue/private", "belongs to another user"),
    ("/user/BOB@EXAMPLE.COM/queue/private", "belongs to another user"),
    ("/user/queue/private\x01", "invalid"),
    ("/topic/messages/not-my-channel", "not allowed"),
    ("/app/chat/send", "cannot subscribe"),
    ("/topic/*", "invalid"),
]

CHAT_BODIES = [
    (b"hello", "invalid JSON body"),
    (b"", "invalid JSON body"),
    (b"[1, 2]", "JSON object"),
    (b"42", "JSON object"),
    (b"\xff\xfe\xfd", "UTF-8"),
    (b'{"content": "plaintext"}', "plaintext is not accepted"),
    (b'{"to": "bob@example.com", "encryptedContent": "QUJD", "iv": "x"}', "iv"),
    (
        b'{"to": "nobody@example.com", "encryptedContent": "QUJD", "iv": "' + IV.encode() + b'"}',
        "does not exist",
    ),
    (b'{"to": "bob@example.com", "to": "carol@example.com"}', "duplicate"),
    (b'{"to": "\\ud800"}', "surrogate"),
    (b'{"to": "a\\u0000b"}', "U+0000"),
    (b"[" * 60_000 + b"]" * 60_000, "exceeds the limit"),  # over max_frame_bytes: parser refuses
    (b"[" * 40 + b"]" * 40, "nested deeper"),
    (b'{"encryptedContent": "' + b"A" * 90_000 + b'"}', None),
]


def _protocol_cases(token: str) -> list[tuple[str, str | None, bytes | list[bytes], str | None]]:
    """(case, token or None for 'before CONNECT', payload, expected ERROR message part)."""
    cases: list[tuple[str, str | None, bytes | list[bytes], str | None]] = [
        (
            "SEND before CONNECT",
            None,
            _frame("SEND", {"destination": "/app/chat/send"}, "{}"),
            "expected CONNECT",
        ),
        ("garbage before CONNECT", None, b"\x00\x01\x02garbage\x00", None),
        ("NULs before CONNECT", None, b"\x00" * 100, None),
        ("CONNECT, bad passcode", None, _connect("not-a-token"), "authentication failed"),
        (
            "CONNECT, NUL-ish login",
            None,
            _frame(
                "CONNECT",
                {"accept-version": "1.2", "host": "x", "login": "a\x01b", "passcode": "pw"},
            ),
            "authentication failed",
        ),
        (
            "CONNECT, huge header count",
            None,
            b"CONNECT\n" + b"".join(b"h%d:v\n" % i for i in range(10_000)) + b"\n\x00",
            None,
        ),
        ("CONNECT, huge header line", None, b"CONNECT\nx:" + b"a" * 100_000 + b"\n\n\x00", None),
        (
            "CONNECT, invalid UTF-8 header",
            None,
            b"CONNECT\nlogin:\xff\xfe\npasscode:x\n\n\x00",
            None,
        ),
        ("valid then garbage", token, b"\xde\xad\xbe\xef" * 100 + b"\x00", None),
        ("unknown command", token, b"FLY\nreceipt:r\n\n\x00", "Unknown command"),
        ("second CONNECT", token, _connect(token), "already connected"),
        (
            "ACK random id",
            token,
            _frame("ACK", {"id": "no-such-ack", "receipt": "r1"}),
            "ACK of unknown id",
        ),
        ("NACK random id", token, _frame("NACK", {"id": "\u00e9" * 500}), "NACK of unknown id"),
        (
            "nested BEGIN, same id",
            token,
            _frame("BEGIN", {"transaction": "t"})
            + _frame("BEGIN", {"transaction": "t", "receipt": "r"}),
            "already started",
        ),
        (
            "COMMIT without BEGIN",
            token,
            _frame("COMMIT", {"transaction": "t", "receipt": "r"}),
            "unknown transaction",
        ),
        (
            "ABORT without BEGIN",
            token,
            _frame("ABORT", {"transaction": "zz"}),
            "unknown transaction",
        ),
        (
            "too many transactions",
            token,
            b"".join(_frame("BEGIN", {"transaction": f"t{i}"}) for i in range(100)),
            "too many open transactions",
        ),
        (
            "SEND to server-only",
            token,
            _frame("SEND", {"destination": "/user/queue/private"}),
            "clients cannot send",
        ),
        (
            "SEND to channel topic",
            token,
            _frame("SEND", {"destination": "/topic/messages/x"}),
            "clients cannot send",
        ),
        (
            "SEND to presence topic",
            token,
            _frame("SEND", {"destination": "/topic/presence"}),
            "clients cannot send",
        ),
        ("SEND to unknown app", token, _frame("SEND", {"destination": "/app/nope"}), "no handler"),
        (
            "content-length lies (short)",
            token,
            b"SEND\ndestination:/app/chat/send\ncontent-length:2\n\n{}xx\x00",
            None,
        ),
        (
            "content-length not a number",
            token,
            b"SEND\ndestination:/app/chat/send\ncontent-length:-5\n\n{}\x00",
            None,
        ),
        ("huge frame", token, _send_chat(b"x" * 300_000), None),
        (
            "bad presence",
            token,
            _frame("SEND", {"destination": "/app/presence", "receipt": "r"}, '{"status": 5}'),
            "invalid presence",
        ),
        (
            "bad typing",
            token,
            _frame("SEND", {"destination": "/app/typing", "receipt": "r"}, '{"to": 5}'),
            "invalid typing",
        ),
        (
            "typing to a channel I am not in",
            token,
            _frame("SEND", {"destination": "/app/typing"}, '{"channelId": "nope"}'),
            "not a member",
        ),
        ("bad heart-beat header", None, _connect(token, **{"heart-beat": "x,y"}), None),
        ("bad accept-version", None, _connect(token, **{"accept-version": "9.9"}), None),
        (
            "device-id too long",
            None,
            _connect(token, **{"device-id": "d" * 500}),
            "invalid device-id",
        ),
    ]
    for dest, expect in WEIRD_DESTINATIONS:
        cases.append(
            (
                f"SUBSCRIBE {dest[:40]!r}",
                token,
                _frame("SUBSCRIBE", {"destination": dest, "id": "s", "receipt": "r"}),
                expect,
            )
        )
    for body, expect in CHAT_BODIES:
        cases.append((f"chat body {body[:30]!r}", token, _send_chat(body), expect))
    return cases


async def test_protocol_abuse_over_tcp_gets_error_then_close(
    shared_server: SharedServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = shared_server.tokens["alice@example.com"]
    port = shared_server.stomp_port
    calls = [
        (lambda c=c, t=t, p=p, e=e: _tcp_case(port, t, p, c, e))
        for c, t, p, e in _protocol_cases(token)
    ]
    await _in_batches(calls)
    await _healthy(shared_server, "after-protocol-abuse")
    assert server_errors(caplog) == []


async def test_receipt_requests_on_refused_frames_come_back_in_the_error(
    shared_server: SharedServer,
) -> None:
    token = shared_server.tokens["alice@example.com"]
    for command, headers in [
        ("ACK", {"id": "x"}),
        ("COMMIT", {"transaction": "none"}),
        ("SUBSCRIBE", {"destination": "/user/bob@example.com/queue/private", "id": "1"}),
        ("SEND", {"destination": "/app/chat/send"}),
    ]:
        async with tcp_client(shared_server.stomp_port) as client:
            await client.send_raw(_connect(token))
            await client.next("CONNECTED")
            body = "nope" if command == "SEND" else ""
            await client.frame(command, {**headers, "receipt": f"rcpt-{command}"}, body)
            error = await client.next("ERROR")
            assert error.get("message") and error.get("receipt-id") == f"rcpt-{command}"
            await client.wait_closed()


async def test_partial_frames_then_close_and_thousands_of_tiny_frames(
    shared_server: SharedServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = shared_server.tokens["alice@example.com"]
    port = shared_server.stomp_port
    partials = [
        b"CONN",
        _connect(token)[:-1],
        _connect(token) + b"SEND\ndestination:/app/chat/send\ncontent-length:500\n\n{",
        _connect(token) + b"SUBSCRIBE\ndestination:/user/queue/private\nid:1\n",
    ]
    for partial in partials:
        async with tcp_client(port) as client:
            await client.send_raw(partial)
        # the client hung up mid-frame: nothing to assert on it, only on the server below
    async with tcp_client(port) as client:
        await client.send_raw(_connect(token))
        await client.next("CONNECTED")
        tiny = b"".join(
            _frame("BEGIN", {"transaction": f"t{i}"}) + _frame("ABORT", {"transaction": f"t{i}"})
            for i in range(3_000)
        )
        await client.send_raw(tiny + b"\n" * 10_000)  # and a flood of heart-beats
        await client.receipt("BEGIN", {"transaction": "last"}, rid="after-6000-frames")
        assert [f for f in client.frames if f.command == "ERROR"] == []
    await _healthy(shared_server, "after-partials")
    assert server_errors(caplog) == []


def _random_frame(rng: random.Random, token: str) -> bytes:
    """A frame that is plausible, broken, or noise."""
    roll = rng.random()
    if roll < 0.15:
        return rng.randbytes(rng.randint(1, 300))
    command = rng.choice(
        [
            "SEND",
            "SUBSCRIBE",
            "UNSUBSCRIBE",
            "ACK",
            "NACK",
            "BEGIN",
            "COMMIT",
            "ABORT",
            "DISCONNECT",
            "CONNECT",
            "STOMP",
            "MESSAGE",
            "RECEIPT",
            "ERROR",
            "send",
            "X",
        ]
    )
    headers: dict[str, str] = {}
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(
            [
                "destination",
                "id",
                "ack",
                "receipt",
                "transaction",
                "content-type",
                "content-length",
                "subscription",
                "message-id",
                "heart-beat",
                "x-" + str(rng.random()),
            ]
        )
        headers[key] = rng.choice(
            [
                "/app/chat/send",
                "/user/queue/private",
                "/topic/presence",
                "/queue/q",
                "1",
                "-1",
                "client",
                "auto",
                "\u00e9\u202e",
                "a:b",
                "x" * rng.randint(0, 2000),
                "",
            ]
        )
    body = rng.choice([b"", b"{}", b'{"to":"bob@example.com"}', rng.randbytes(50), b"[" * 64])
    try:
        data = _frame(command, headers, body)
    except ValueError:
        data = b"%s\n\n\x00" % command.encode()
    if rng.random() < 0.2:  # truncate, or splice in a NUL
        cut = rng.randint(0, len(data))
        data = data[:cut] + (b"\x00" if rng.random() < 0.5 else b"")
    return data


async def test_random_frames_500_connections(
    shared_server: SharedServer, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(20240607)  # seeded: the same 500 connections on every run
    token = shared_server.tokens["carol@example.com"]
    port = shared_server.stomp_port
    calls = []
    for n in range(500):
        connected = rng.random() < 0.8
        frames = [_random_frame(rng, token) for _ in range(rng.randint(1, 4))]
        calls.append(
            lambda n=n, connected=connected, frames=frames: _tcp_case(
                port, token if connected else None, frames, f"random #{n}", must_close=False
            )
        )
    await _in_batches(calls)
    await _healthy(shared_server, "after-random-frames")
    assert server_errors(caplog) == []


# ---------------------------------------------------------------- WebSocket


async def _ws_case(srv: SharedServer, messages: list[str | bytes], expect: str | None) -> None:
    http_port = int(srv.base_url.rsplit(":", 1)[1])
    async with ws_client(http_port) as client:
        await client.send_message(_connect(srv.tokens["alice@example.com"]).decode())
        await client.next("CONNECTED")
        for message in messages:
            try:
                await client.send_message(message)
            except Exception:  # the server closed mid-way (trio-websocket raises on send)
                break
        with trio.move_on_after(5):
            await client.closed.wait()
        _check_answers(client, f"ws {messages[0][:30]!r}", expect, must_close=True)


async def test_websocket_abuse_gets_error_then_close(
    shared_server: SharedServer, caplog: pytest.LogCaptureFixture
) -> None:
    cases: list[tuple[list[str | bytes], str | None]] = [
        ([b"\xff\xfe\xfd\x00"], None),
        (["SEND\ndestination:/app/chat/send\n\nhello\x00"], "invalid JSON body"),
        (
            ["SUBSCRIBE\ndestination:/user/bob@example.com/queue/private\nid:1\n\n\x00"],
            "belongs to another user",
        ),
        (["SEND\ndestination:/app/chat/", "send\n\n[1]\x00"], "JSON object"),  # split frame
        (["COMMIT\ntransaction:t\nreceipt:r\n\n\x00"], "unknown transaction"),
        ([b"SEND\ndestination:/app/chat/send\n\n" + b"x" * (10 * 1024 * 1024) + b"\x00"], None),
    ]
    for messages, expect in cases:
        await _ws_case(shared_server, messages, expect)
    await _healthy(shared_server, "after-ws-abuse")
    assert server_errors(caplog) == []


# ---------------------------------------------------------------- slow and idle peers


async def test_slowloris_and_500_silent_connections_are_closed_after_the_connect_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(
        tmp_path, stomp__port=free_port(), stomp__connect_timeout_s=1.0
    ) as srv:
        port = srv.ports["stomp"]
        closed = 0
        errors: list[stomp.Frame] = []

        async def silent() -> None:
            nonlocal closed
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            parser = stomp.Parser("1.2", side="client")
            try:
                with trio.fail_after(10):  # a hang guard: the server must close first
                    while data := await stream.receive_some(4096):
                        errors.extend(e for e in parser.feed(data) if isinstance(e, stomp.Frame))
                closed += 1
            finally:
                await trio.aclose_forcefully(stream)

        async def slowloris() -> None:
            nonlocal closed
            async with tcp_client(port) as client:
                with trio.fail_after(10):
                    for byte in b"CONNECT\naccept-version:1.2\nhost:x\n":
                        if client.closed.is_set():
                            break
                        try:
                            await client.send_raw(bytes([byte]))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                        await trio.sleep(0.25)
                    await client.closed.wait()
                errors.extend(client.frames)
                closed += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slowloris)
            for _ in range(500):
                nursery.start_soon(silent)
        assert closed == 501
        assert errors and all(f.command == "ERROR" for f in errors)
        assert all("no CONNECT frame received" in f.get("message", "") for f in errors)
    assert server_errors(caplog) == []
