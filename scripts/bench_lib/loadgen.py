#!/usr/bin/env python3
"""Load-generator worker for scripts/bench.py: one process, asyncio Protocols.

    python scripts/bench_lib/loadgen.py SPEC.json

Not meant to be run by hand: bench.py writes SPEC.json, starts several of these,
and talks to them over stdin/stdout (one JSON object per line):

    worker -> {"event": "ready", ...}      connections open (and subscribed)
    bench  -> "go <t0>\\n"                  start the load at wall-clock time t0
    worker -> {"event": "done"}            results written to spec["out"]

The WebSocket client is a minimal RFC 6455 client on an asyncio Protocol (`StompWs`),
the same for both servers: HTTP/1.1 upgrade with a Sec-WebSocket-Key/Accept check and
the v12.stomp subprotocol, no extensions, masked client frames (a fresh random mask per
frame), one STOMP frame per text message. Incoming frames are parsed from the receive
buffer inside data_received and handed to a per-connection callback together with the
arrival time, without a coroutine hop per message; a sender writes all the frames it
has for one connection in one transport.write. The send schedule runs as one timer per
worker that sends, every tick, whatever became due (a burst), not one sleep per message.

Every loop is bounded in count and in time (spec["duration"], spec["drain"],
spec["timeout"]). Only 127.0.0.1 is dialled. Latencies come from a wall-clock stamp
(time.time(), one clock for every process on this machine) inside the payload: the
first 12 bytes of the base64 "ciphertext" are struct ">dI" (send time, sequence), so
the payload stays a realistic, opaque E2EE envelope for both servers.

Workloads: "direct" (1 and 4: each user sends to its peer with receipts),
"fanout" (2: one sender, many topic subscribers), "idle" (3: idle connections
with heart-beats), "rest" (4: history paging + send-message over HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import os
import random
import resource
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

MaskFn = Callable[[bytes, bytes], bytes]
_c_apply_mask: MaskFn | None
try:  # websockets' C helper (the bench extra installs websockets): ~20x the pure XOR
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    _c_apply_mask = None

STAMP = struct.Struct(">dI")
REST_SEQ = 0xFFFFFFFF  # marks a message sent over REST (workload 4): counted apart
CONTENT_KEY = b'"encryptedContent":"'
TICK = 0.002  # sender timer: every tick sends all that became due since the last one

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
SUBPROTOCOL = "v12.stomp"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 1 << 20  # the servers' frames here are < 2 KiB; anything near 1 MiB is a bug
MAX_HANDSHAKE = 16 << 10
HEAD16 = struct.Struct("!BBH")
HEAD64 = struct.Struct("!BBQ")

# (payload, arrival wall-clock time) -> None; called from data_received
Handler = Callable[[bytes, float], None]


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- WebSocket


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 5.3 masking: payload XOR the 4-byte mask repeated."""
    if _c_apply_mask is not None:
        return _c_apply_mask(payload, mask)
    n = len(payload)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Masks:
    """Fresh random 4-byte masks, drawn from os.urandom 4 KiB at a time."""

    __slots__ = ("pool", "pos")

    def __init__(self) -> None:
        self.pool = b""
        self.pos = 0

    def take(self) -> bytes:
        pos = self.pos
        if pos + 4 > len(self.pool):
            self.pool = os.urandom(4096)
            pos = 0
        self.pos = pos + 4
        return self.pool[pos : pos + 4]


MASKS = Masks()


def ws_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame (RFC 6455 5.2)."""
    n = len(payload)
    mask = MASKS.take()
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = HEAD16.pack(0x80 | opcode, 0xFE, n)
    else:
        head = HEAD64.pack(0x80 | opcode, 0xFF, n)
    return head + mask + xor_mask(payload, mask)


def accept_for(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()


# One receive buffer for every connection of the process: asyncio's BufferedProtocol
# path recv_into()s it and calls buffer_updated at once, before any other read. The
# plain Protocol path would recv(256 KiB) into a fresh bytes object per read, which
# costs ~20 us instead of ~3 us for a 1 KiB read here (allocation + page faults).
RECV_BUF = bytearray(1 << 16)
RECV_VIEW = memoryview(RECV_BUF)


class StompWs(asyncio.BufferedProtocol):
    """One STOMP-over-WebSocket client connection (text frames, no extensions).

    Until `handler` is set, complete messages queue in `inbox` for `recv()` (setup:
    CONNECT, SUBSCRIBE receipts); with a handler, each message is passed to it from
    data_received with the time the bytes arrived.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.request_target = (host, port, path)
        self.key = base64.b64encode(os.urandom(16))
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        # a failed handshake nobody awaits any more (timed out) is not worth a warning
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.lost: asyncio.Future[None] = loop.create_future()
        self.handshake: bytearray | None = bytearray()  # None once the 101 was checked
        self.buf = b""  # an incomplete frame carried to the next data_received
        self.frag: list[bytes] | None = None  # fragments of a message in progress
        self.handler: Handler | None = None
        self.on_lost: Callable[[StompWs], None] | None = None
        self.inbox: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False  # transport buffer above its high-water mark
        self.closing = False  # we sent a close frame
        self.is_lost = False
        self.failure: str | None = None  # why it ended when not by our close()
        self.closed_by_server: str | None = None  # STOMP ERROR message, if any

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port, path = self.request_target
        transport.write(
            (
                f"GET {path} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self.key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
                "\r\n"
            ).encode()
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECV_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(RECV_VIEW[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.handshake is not None:
            self.handshake += data
            end = self.handshake.find(b"\r\n\r\n")
            if end < 0:
                if len(self.handshake) > MAX_HANDSHAKE:
                    self.fail("handshake response too long")
                return
            head, data = bytes(self.handshake[:end]), bytes(self.handshake[end + 4 :])
            self.handshake = None
            problem = self.check_handshake(head)
            if problem:
                self.fail(problem)
                return
            if not self.opened.done():
                self.opened.set_result(None)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:
                self.fail("masked frame from the server")
                return
            if b0 & 0x70:
                self.fail("RSV bits set (no extension was negotiated)")
                return
            if length > MAX_MESSAGE:
                self.fail(f"frame of {length} bytes")
                return
            end = start + length
            if end > n:
                break
            payload = buf[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode & 0x8:
                if not self.control(opcode, payload):
                    return
                continue
            if opcode == OP_CONT:
                if self.frag is None:
                    self.fail("continuation without a started message")
                    return
                self.frag.append(payload)
                if not b0 & 0x80:
                    continue
                payload = b"".join(self.frag)
                self.frag = None
            elif opcode not in (OP_TEXT, OP_BINARY) or self.frag is not None:
                self.fail(f"unexpected opcode {opcode}")
                return
            elif not b0 & 0x80:
                self.frag = [payload]
                continue
            handler = self.handler
            if handler is not None:
                handler(payload, now)
            else:
                self.inbox.append(payload)
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)
        self.buf = buf[pos:] if pos < n else b""

    def control(self, opcode: int, payload: bytes) -> bool:
        """Handle a control frame; False when the connection is finished."""
        if opcode == OP_PING:
            self.write(ws_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            if not self.closing:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.failure = f"closed by server {code} {payload[2:].decode('utf-8', 'replace')}"
                self.closing = True
                self.write(ws_frame(payload[:2], OP_CLOSE))  # echo the code (RFC 6455 5.5.1)
            if self.transport is not None:
                self.transport.close()
            return False
        elif opcode != OP_PONG:
            self.fail(f"unknown control opcode {opcode}")
            return False
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        self.transport = None
        if self.failure is None and not self.closing:
            self.failure = f"connection lost: {exc}" if exc else "connection closed by server"
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(self.failure or "closed"))
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- helpers

    def check_handshake(self, head: bytes) -> str | None:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            return f"handshake refused: {lines[0][:200]}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = (
                f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
            )
        if headers.get("upgrade", "").lower() != "websocket":
            return f"handshake: Upgrade {headers.get('upgrade')!r}"
        if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
            return f"handshake: Connection {headers.get('connection')!r}"
        if headers.get("sec-websocket-accept") != accept_for(self.key):
            return "handshake: wrong Sec-WebSocket-Accept"
        if headers.get("sec-websocket-protocol", SUBPROTOCOL) != SUBPROTOCOL:
            return f"handshake: subprotocol {headers['sec-websocket-protocol']!r}"
        if headers.get("sec-websocket-extensions"):
            return f"handshake: extension {headers['sec-websocket-extensions']!r} not offered"
        return None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionError(self.failure or "connection closed")
        self.transport.write(data)

    def send(self, payload: bytes) -> None:
        """One STOMP frame (or a heart-beat) as one text message."""
        self.write(ws_frame(payload))

    async def recv(self, wait_s: float) -> bytes:
        """Next queued message (setup only: no handler set)."""
        deadline = time.monotonic() + wait_s
        while not self.inbox:
            if self.is_lost:
                raise ConnectionError(self.failure or "connection closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, left)
            finally:
                self.waiter = None
        return self.inbox.popleft()

    async def close(self, wait_s: float = 2) -> None:
        """Close handshake (1000), then the TCP connection; abort after `wait_s`."""
        if self.transport is None:
            return
        if not self.closing:
            self.closing = True
            self.write(ws_frame(b"\x03\xe8", OP_CLOSE))
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), wait_s)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


async def ws_connect(url: str, wait_s: float) -> StompWs:
    """Open a WebSocket to ws://127.0.0.1:PORT/PATH (the only host this tool dials)."""
    u = urlsplit(url)
    if u.scheme != "ws" or u.hostname != "127.0.0.1" or u.port is None:
        raise ValueError(f"only ws://127.0.0.1:PORT/... is dialled, not {url!r}")
    host, port = u.hostname, u.port
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    loop = asyncio.get_running_loop()
    conn: StompWs | None = None

    async def dial() -> StompWs:
        nonlocal conn
        _, proto = await loop.create_connection(lambda: StompWs(host, port, path), host, port)
        conn = proto
        await proto.opened
        return proto

    try:
        return await asyncio.wait_for(dial(), wait_s)
    except BaseException:
        if conn is not None and conn.transport is not None:
            conn.transport.abort()
        raise


# --------------------------------------------------------------------------- STOMP


def frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{k}:{v}\n" for k, v in headers.items())
    return f"{command}\n{head}\n".encode() + body + b"\x00"


def parse(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Frames in one WebSocket message (heart-beat newlines skipped). Bodies have no NUL."""
    out = []
    for part in data.split(b"\x00"):
        part = part.lstrip(b"\r\n")
        if not part:
            continue
        head, _, body = part.partition(b"\n\n")
        lines = head.decode("utf-8", "replace").split("\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k, v)
        out.append((lines[0].strip(), headers, body))
    return out


def frames_of(data: bytes) -> list[bytes]:
    """The non-empty STOMP frames of one message (heart-beat EOLs stripped): hot path."""
    end = data.find(b"\x00")
    if end >= 0 and data.find(b"\x00", end + 1) < 0:  # the usual: one frame (+ EOLs)
        part = data[:end]
        if part[:1] in (b"\n", b"\r"):
            part = part.lstrip(b"\r\n")
        return [part] if part else []
    return [p for p in (x.lstrip(b"\r\n") for x in data.split(b"\x00")) if p]


def command_of(part: bytes) -> bytes:
    nl = part.find(b"\n")
    return (part if nl < 0 else part[:nl]).rstrip(b"\r")


def stamp_at(part: bytes) -> tuple[float, int] | None:
    """(send time, seq) from a delivered MESSAGE frame's body, or None without a stamp."""
    at = part.find(b"\n\n")
    if at < 0:
        return None
    at = part.find(CONTENT_KEY, at)
    if at < 0:
        return None
    start = at + len(CONTENT_KEY)
    try:
        sent, seq = STAMP.unpack(binascii.a2b_base64(part[start : start + 16]))
    except (binascii.Error, struct.error):
        return None
    return sent, seq


def stamp_of(body: bytes) -> tuple[float, int] | None:
    """(send time, seq) from a delivered body, or None when it carries no stamp."""
    return stamp_at(b"\n\n" + body)


def header_of(part: bytes, name: bytes) -> bytes | None:
    """First value of header `name` (STOMP 1.2: the first occurrence wins)."""
    end = part.find(b"\n\n")
    key = b"\n" + name + b":"
    at = part.find(key, 0, end if end >= 0 else len(part))
    if at < 0:
        return None
    at += len(key)
    nl = part.find(b"\n", at)
    return part[at : nl if nl >= 0 else len(part)].rstrip(b"\r")


async def stomp_open(
    url: str,
    login: str,
    passcode: str,
    vhost: str,
    heartbeat: str = "0,0",
    wait_s: float = 30,
) -> StompWs:
    """WebSocket + STOMP CONNECT; returns once CONNECTED arrived."""
    conn = await ws_connect(url, wait_s)
    try:
        headers = {"accept-version": "1.2", "host": vhost, "heart-beat": heartbeat}
        if login:
            headers["login"] = login
        headers["passcode"] = passcode
        conn.send(frame("CONNECT", headers))
        for _ in range(1000):
            for cmd, h, body in parse(await conn.recv(wait_s)):
                if cmd == "CONNECTED":
                    return conn
                if cmd == "ERROR":
                    raise ConnectionError(f"CONNECT refused: {h.get('message')} {body[:200]!r}")
        raise ConnectionError("no CONNECTED in 1000 messages")
    except BaseException:
        if conn.transport is not None:
            conn.transport.abort()
        raise


async def stomp_request(conn: StompWs, command: str, headers: dict[str, str]) -> None:
    """Send a frame with a receipt and wait for that RECEIPT (setup only)."""
    conn.send(frame(command, {**headers, "receipt": "setup"}))
    for _ in range(1000):
        for cmd, h, body in parse(await conn.recv(30)):
            if cmd == "RECEIPT" and h.get("receipt-id") == "setup":
                return
            if cmd == "ERROR":
                raise ConnectionError(f"{command} refused: {h.get('message')} {body[:200]!r}")
    raise ConnectionError(f"no RECEIPT for {command} in 1000 messages")


class Envelopes:
    """Realistic E2EE envelopes: 200-500 B ciphertext, 12 B iv, wrapped keys for 2 devices."""

    def __init__(self, rng: random.Random) -> None:
        # Pre-encoded ciphertext tails (a multiple of 3 bytes, so that base64(stamp + tail)
        # == base64(stamp) + base64(tail)): the per-message cost is one 12-byte encode.
        self.tails = [b64(rng.randbytes(3 * rng.randint(63, 163))) for _ in range(64)]
        self.ivs = [b64(rng.randbytes(12)) for _ in range(64)]
        self.rng = rng

    def body(
        self, to_field: str, to: str, sender: str, seq: int, cmid: str, at: float | None = None
    ) -> bytes:
        """Compact JSON envelope whose ciphertext starts with (at or time.time(), seq)."""
        i = seq % 64
        stamp = binascii.b2a_base64(
            STAMP.pack(time.time() if at is None else at, seq), newline=False
        ).decode()
        wrap1 = self.tails[(i + 7) % 64][:124]  # ~92-byte X25519+HKDF+AES-GCM wrap each
        wrap2 = self.tails[(i + 13) % 64][:124]
        return (
            f'{{"{to_field}":"{to}","encryptedContent":"{stamp}{self.tails[i]}",'
            f'"iv":"{self.ivs[i]}","keys":{{"{to}/phone":"{wrap1}","{sender}/laptop":"{wrap2}"}},'
            f'"clientMessageId":"{cmid}"}}'
        ).encode()


class Stats:
    def __init__(self) -> None:
        self.lat_ms: list[float] = []  # send -> deliver, ms
        self.receipt_ms: list[float] = []  # send -> RECEIPT, ms
        self.lag_ms: list[float] = []  # how late the generator sent vs its schedule
        self.sent = 0
        self.receipts = 0
        self.delivered = 0
        self.rest_delivered = 0
        self.errors: dict[str, int] = {}
        self.first_send = 0.0
        self.last_deliver = 0.0
        self.last_receipt = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def error_message(part: bytes) -> str:
    msg = header_of(part, b"message")
    return msg.decode("utf-8", "replace") if msg is not None else ""


# --------------------------------------------------------------------------- direct (1, 4)


async def direct(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """Each local user sends to its peer at spec rate with receipts; receivers time arrivals."""
    users = spec["users"]
    n = len(users)
    per_user = spec["rate_per_user"]
    count = spec["count_per_user"]
    expected = spec["expected_per_user"]
    env = Envelopes(random.Random(spec["seed"]))
    sem = asyncio.Semaphore(50)

    async def setup(u: dict[str, Any]) -> StompWs:
        async with sem:
            c = await stomp_open(spec["url"], u["login"], u["passcode"], spec["vhost"])
            sub = {"destination": u["subscribe"], "id": "0", "ack": "auto"}
            sub.update(u.get("subscribe_headers", {}))
            await stomp_request(c, "SUBSCRIBE", sub)
            return c

    conns = list(await asyncio.gather(*(setup(u) for u in users)))
    received = [0] * n
    # sent_at[i][k]: wall-clock send time of user i's k-th SEND while its RECEIPT is
    # outstanding, 0.0 otherwise (the receipt id is "r<k>")
    sent_at = [[0.0] * count for _ in users]
    # the crash check (bench.py): which SENDs got their RECEIPT, per user (k's)
    receipted: list[list[int]] | None = [[] for _ in users] if spec.get("report") else None
    all_done = asyncio.Event()
    total_expected = expected * n
    total_receipts = count * n
    lat = stats.lat_ms
    rcpt = stats.receipt_ms

    def on_lost(c: StompWs) -> None:
        if not c.closing and c.closed_by_server is None:
            c.closed_by_server = c.failure or "closed"
            stats.error("connection closed")

    def ignore(data: bytes, now: float) -> None:
        return None

    def reader(i: int, c: StompWs) -> Handler:
        pending = sent_at[i]
        got = receipted[i] if receipted is not None else None

        def on_message(data: bytes, now: float) -> None:
            for part in frames_of(data):
                if part.startswith(b"MESSAGE\n"):
                    st = stamp_at(part)
                    if st is None:
                        stats.error("unstamped MESSAGE")
                        continue
                    if st[1] == REST_SEQ:
                        stats.rest_delivered += 1
                        continue
                    lat.append((now - st[0]) * 1000)
                    stats.delivered += 1
                    stats.last_deliver = now
                    received[i] += 1
                elif part.startswith(b"RECEIPT\n"):
                    rid = header_of(part, b"receipt-id")
                    if not rid or rid[:1] != b"r" or not rid[1:].isdigit():
                        continue
                    k = int(rid[1:])
                    at = pending[k] if k < count else 0.0
                    if at:
                        pending[k] = 0.0
                        rcpt.append((now - at) * 1000)
                        stats.receipts += 1
                        stats.last_receipt = now
                        if got is not None:
                            got.append(k)
                elif command_of(part) == b"ERROR":
                    stats.error(f"ERROR {error_message(part)}")
                    c.closed_by_server = error_message(part)
                    c.handler = ignore  # as before: this connection's reader stops
                    return
                else:
                    continue
                if stats.delivered >= total_expected and stats.receipts >= total_receipts:
                    all_done.set()

        return on_message

    def all_gone() -> bool:
        """Every connection closed by the server (the crash check killed it)."""
        return all(c.transport is None or c.closed_by_server is not None for c in conns)

    for i, c in enumerate(conns):
        c.on_lost = on_lost
        c.handler = reader(i, c)
    ready(n)
    t0 = await go
    send_end = t0 + spec["duration"] + spec["send_grace"]
    drain_end = t0 + spec["duration"] + spec["drain"]

    # Evenly spaced per user, users phase-shifted so the worker's aggregate is smooth:
    # user i's k-th message is due at t0 + (k * n + i) * spacing.
    interval = 1.0 / per_user
    spacing = interval / n
    total = count * n
    base_seq = spec["seq_base"]
    run = spec["run"]
    heads = [
        "".join(["SEND\n", *(f"{k}:{v}\n" for k, v in u["send_headers"].items())]).encode()
        for u in users
    ]
    due_k = [0] * n  # messages of user i due so far
    done_k = [0] * n  # messages of user i sent so far
    stopped = [False] * n  # connection gone: user i sends no more
    behind: set[int] = set()  # users with due messages held back (write buffer full)
    lag = stats.lag_ms
    now_ = time.time

    def send_due(i: int) -> None:
        """Send all of user i's due messages in one write (usually exactly one)."""
        c = conns[i]
        if stopped[i]:
            return
        if c.transport is None or c.closed_by_server is not None:
            stats.error("send on closed connection")
            stopped[i] = True
            return
        if c.paused:  # like an awaited drain: the messages wait, their lag grows
            behind.add(i)
            return
        u = users[i]
        pending = sent_at[i]
        out = []
        k = done_k[i]
        last = due_k[i]
        while k < last:
            seq = base_seq + i * count + k  # the crash check's report rebuilds it so
            at = now_()
            body = env.body(u["to_field"], u["to"], u["user_id"], seq, f"{run}-{seq}", at)
            out.append(
                ws_frame(
                    b"".join(
                        (
                            heads[i],
                            b"receipt:r%d\ncontent-length:%d\n\n" % (k, len(body)),
                            body,
                            b"\x00",
                        )
                    )
                )
            )
            pending[k] = at
            lag.append(max(0.0, (at - (t0 + (k * n + i) * spacing)) * 1000))
            k += 1
        if not stats.first_send:
            stats.first_send = pending[done_k[i]]
        c.write(out[0] if len(out) == 1 else b"".join(out))
        stats.sent += k - done_k[i]
        done_k[i] = k

    j = 0  # next message in the worker's schedule
    for _tick in range(int((send_end - t0) / TICK) + 1000):
        now = now_()
        if now > send_end:
            break
        for i in list(behind):
            if not conns[i].paused:
                behind.discard(i)
                send_due(i)
        due = min(total, int((now - t0) / spacing) + 1) if now >= t0 else 0
        while j < due:
            i = j % n
            j += 1
            due_k[i] += 1
            if i not in behind:
                send_due(i)
        if j >= total and not behind:
            break
        await asyncio.sleep(TICK if behind else max(TICK, t0 + j * spacing - now_()))
    for i in range(n):
        if done_k[i] < count and not stopped[i]:
            stats.error("not sent (generator too slow)")
    while not all_done.is_set() and not all_gone() and time.time() < drain_end:
        try:  # bounded: at most until drain_end, polled so a dead server ends it early
            await asyncio.wait_for(all_done.wait(), min(0.25, max(0.01, drain_end - time.time())))
        except TimeoutError:
            pass
    for c in conns:
        c.handler = ignore
    await close_all(conns)
    out: dict[str, Any] = {
        "received_per_user": received,
        "missing_receipts": sum(1 for row in sent_at for at in row if at),
    }
    if receipted is not None:  # clientMessageIds of the receipted SENDs, as send_due made them
        out["receipted"] = [
            f"{run}-{base_seq + i * count + k}" for i, ks in enumerate(receipted) for k in ks
        ]
    return out


# --------------------------------------------------------------------------- fan-out (2)


async def fanout(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """Subscribers on a topic time each message; worker 0 also runs the one sender."""
    subs = spec["subscribers"]
    sem = asyncio.Semaphore(50)
    count = spec["count"]

    async def setup(u: dict[str, Any]) -> StompWs:
        async with sem:
            c = await stomp_open(spec["url"], u["login"], u["passcode"], spec["vhost"])
            await stomp_request(
                c, "SUBSCRIBE", {"destination": spec["topic"], "id": "0", "ack": "auto"}
            )
            return c

    conns = list(await asyncio.gather(*(setup(u) for u in subs)))
    sender_conn: StompWs | None = None
    snd = spec.get("sender")
    if snd:
        sender_conn = await stomp_open(spec["url"], snd["login"], snd["passcode"], spec["vhost"])
    # seq -> latest arrival latency among this worker's subscribers; plus per-sub counts
    last_ms: dict[int, float] = {}
    got = [0] * len(conns)
    done = asyncio.Event()
    remaining = [len(conns) * count]
    lat = stats.lat_ms

    def ignore(data: bytes, now: float) -> None:
        return None

    def on_lost(c: StompWs) -> None:
        if not c.closing and c.closed_by_server is None:
            stats.error("connection closed")

    def reader(i: int, c: StompWs) -> Handler:
        def on_message(data: bytes, now: float) -> None:
            for part in frames_of(data):
                if part.startswith(b"MESSAGE\n"):
                    st = stamp_at(part)
                    if st is None:
                        stats.error("unstamped MESSAGE")
                        continue
                    ms = (now - st[0]) * 1000
                    lat.append(ms)
                    stats.delivered += 1
                    stats.last_deliver = now
                    if ms > last_ms.get(st[1], -1.0):
                        last_ms[st[1]] = ms
                    got[i] += 1
                    remaining[0] -= 1
                    if remaining[0] <= 0:
                        done.set()
                elif command_of(part) == b"ERROR":
                    stats.error(f"ERROR {error_message(part)}")
                    c.closed_by_server = error_message(part)
                    c.handler = ignore
                    return

        return on_message

    for i, c in enumerate(conns):
        c.on_lost = on_lost
        c.handler = reader(i, c)
    ready(len(conns))
    t0 = await go
    drain_end = t0 + spec["duration"] + spec["drain"]

    async def sender(c: StompWs) -> None:
        assert snd is not None
        env = Envelopes(random.Random(spec["seed"]))
        interval = 1.0 / spec["rate"]
        pending: dict[bytes, float] = {}

        def on_receipt(data: bytes, now: float) -> None:
            for part in frames_of(data):
                if part.startswith(b"RECEIPT\n"):
                    at = pending.pop(header_of(part, b"receipt-id") or b"", None)
                    if at is not None:
                        stats.receipts += 1
                        stats.receipt_ms.append((now - at) * 1000)
                elif command_of(part) == b"ERROR":
                    stats.error(f"sender ERROR {error_message(part)}")
                    c.handler = ignore

        c.handler = on_receipt
        for k in range(count):
            due = t0 + k * interval
            now = time.time()
            if now > t0 + spec["duration"] + spec["send_grace"]:
                stats.error("not sent (generator too slow)")
                break
            if due > now:
                await asyncio.sleep(due - now)
            at = time.time()
            body = env.body(
                snd["to_field"], snd["to"], snd["user_id"], k, f"{spec['run']}-f{k}", at
            )
            headers = dict(snd["send_headers"])
            headers["receipt"] = f"r{k}"
            headers["content-length"] = str(len(body))
            stats.lag_ms.append(max(0.0, (at - due) * 1000))
            pending[b"r%d" % k] = at
            if not stats.first_send:
                stats.first_send = at
            try:
                c.send(frame("SEND", headers, body))
            except ConnectionError:
                stats.error("send on closed connection")
                break
            stats.sent += 1
        try:
            await asyncio.wait_for(_until(lambda: not pending), max(0.1, drain_end - time.time()))
        except TimeoutError:
            stats.error("missing receipts")

    st = asyncio.create_task(sender(sender_conn)) if sender_conn is not None else None
    try:
        await asyncio.wait_for(done.wait(), max(0.1, drain_end - time.time()))
    except TimeoutError:
        pass
    if st is not None:
        try:
            await asyncio.wait_for(st, max(0.1, drain_end - time.time()))
        except TimeoutError:
            pass
    for c in conns:
        c.handler = ignore
    await close_all(conns + ([sender_conn] if sender_conn else []))
    return {"last_ms": {str(k): v for k, v in last_ms.items()}, "got_per_sub": got}


async def _until(pred: Any) -> None:
    for _ in range(100_000):
        if pred():
            return
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- idle (3)


async def idle(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """Open spec["connections"] STOMP sessions with heart-beats, hold them, close them."""
    users = spec["users"]
    n = spec["connections"]
    hb_ms = spec["heartbeat_ms"]
    hb = hb_ms / 1000
    ready(0)
    t0 = await go
    sem = asyncio.Semaphore(spec["concurrency"])
    conns: list[StompWs] = []
    connect_ms: list[float] = []
    failures: dict[str, int] = {}
    dropped = [0]
    slots = 100  # heart-beats are staggered over 100 slots of hb/100 each
    heartbeat = ws_frame(b"\n")  # a client heart-beat is an EOL, sent as a text message
    hold_end = [t0 + spec["connect_timeout"] + spec["hold"]]  # set for real once connected

    def on_lost(c: StompWs) -> None:
        if not c.closing:
            dropped[0] += 1

    def on_message(c: StompWs) -> Handler:
        def drain(data: bytes, now: float) -> None:
            # drain whatever the server sends (its heart-beats); note an ERROR
            for part in frames_of(data):
                if command_of(part) == b"ERROR":
                    c.closed_by_server = error_message(part)

        return drain

    async def beats() -> None:
        # Client heart-beat every hb for each connection, connection i in slot i % 100;
        # from the start: the server drops a session after 2 silent intervals, and the
        # connect phase of 10,000 sessions takes longer than that.
        for tick in range(int((hold_end[0] - t0) / hb * slots) + 2 * slots):
            if time.time() >= hold_end[0]:
                return
            for c in conns[tick % slots :: slots]:
                if c.transport is not None and not c.closing:
                    c.transport.write(heartbeat)
            await asyncio.sleep(max(0.0, t0 + (tick + 1) * hb / slots - time.time()))

    async def one(i: int) -> None:
        u = users[i % len(users)]
        async with sem:
            t = time.time()
            try:
                c = await stomp_open(
                    spec["url"], u["login"], u["passcode"], spec["vhost"], f"{hb_ms},{hb_ms}", 10
                )
            except Exception as exc:  # refused, reset, timed out: count it, keep going
                key = f"{type(exc).__name__}: {str(exc)[:80]}"
                failures[key] = failures.get(key, 0) + 1
                return
            connect_ms.append((time.time() - t) * 1000)
            c.handler = on_message(c)
            c.on_lost = on_lost
            if c.transport is None:
                on_lost(c)
            conns.append(c)

    beater = asyncio.create_task(beats())
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), spec["connect_timeout"])
    except TimeoutError:
        failures["connect phase timed out"] = n - len(conns) - sum(failures.values())
    connected_at = time.time()
    emit({"event": "connected", "n": len(conns), "at": connected_at})
    hold_end[0] = connected_at + spec["hold"]

    await asyncio.sleep(max(0.0, hold_end[0] - time.time()))
    beater.cancel()
    alive = sum(1 for c in conns if c.transport is not None)
    await close_all(conns)
    return {
        "connected": len(conns),
        "connect_ms": connect_ms,
        "connect_seconds": connected_at - t0,
        "failures": failures,
        "dropped_during_hold": dropped[0],
        "alive_at_end": alive,
    }


# --------------------------------------------------------------------------- REST (4)


async def rest(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """History paging (GET with `before` cursor) and POST send-message, concurrently."""
    import httpx

    users = spec["users"]
    env = Envelopes(random.Random(spec["seed"]))
    lat: dict[str, list[float]] = {"history": [], "send": []}
    codes: dict[str, int] = {}
    ready(0)
    t0 = await go
    end = t0 + spec["duration"]
    seq = [0]

    async def client(i: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=spec["base"], limits=limits, timeout=30) as h:
            for n in range(1_000_000):
                if time.time() >= end:
                    return
                u = users[(i + n * spec["concurrency"]) % len(users)]
                auth = {"Authorization": f"Bearer {u['token']}"}
                t = time.time()
                if n % 2 == 0:
                    kind = "history"
                    before = None
                    for _page in range(3):  # newest page, then two older ones by cursor
                        params = {"with": u["to"], "limit": "50"}
                        if before:
                            params["before"] = before
                        r = await h.get("/api/chat/messages", params=params, headers=auth)
                        if r.status_code != 200 or not r.json():
                            break
                        before = r.json()[-1]["id"]
                else:
                    kind = "send"
                    seq[0] += 1
                    body = env.body(
                        "to", u["to"], u["user_id"], REST_SEQ, f"{spec['run']}-h{i}-{n}"
                    )
                    r = await h.post(
                        "/api/chat/send-message",
                        content=body,
                        headers={**auth, "content-type": "application/json"},
                    )
                key = f"{kind} {r.status_code}"
                codes[key] = codes.get(key, 0) + 1
                if r.status_code < 300:
                    lat[kind].append((time.time() - t) * 1000)

    await asyncio.wait_for(
        asyncio.gather(*(client(i) for i in range(spec["concurrency"]))), spec["duration"] + 60
    )
    return {"rest_lat_ms": lat, "codes": codes, "elapsed": time.time() - t0}


# --------------------------------------------------------------------------- plumbing


async def close_all(conns: list[StompWs]) -> None:
    async def one(c: StompWs) -> None:
        try:
            await c.close(2)
        except Exception:  # already gone: nothing to close
            pass

    for i in range(0, len(conns), 500):
        await asyncio.gather(*(one(c) for c in conns[i : i + 500]))


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ready(n: int) -> None:
    emit({"event": "ready", "connections": n})


async def wait_go(fut: asyncio.Future[float]) -> None:
    # A daemon thread, not the default executor: when the setup fails (a refused or
    # hung connection), asyncio.run must not wait for a "go" line that never comes.
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    def deliver(line: str) -> None:
        if not got.done():
            got.set_result(line)

    def read() -> None:
        loop.call_soon_threadsafe(deliver, sys.stdin.readline())

    threading.Thread(target=read, daemon=True).start()
    line = await got
    t0 = float(line.split()[1]) if line.startswith("go ") else time.time()
    await asyncio.sleep(max(0.0, t0 - time.time()))  # every worker starts at the same t0
    fut.set_result(t0)


async def amain(spec: dict[str, Any]) -> dict[str, Any]:
    stats = Stats()
    go: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    go_task = asyncio.create_task(wait_go(go))
    fn = {"direct": direct, "fanout": fanout, "idle": idle, "rest": rest}[spec["kind"]]
    # CPU is counted from "go" on: the load phase, not connection setup.
    r0: list[resource.struct_rusage] = [resource.getrusage(resource.RUSAGE_SELF)]
    go.add_done_callback(lambda _f: r0.__setitem__(0, resource.getrusage(resource.RUSAGE_SELF)))
    extra = await asyncio.wait_for(fn(spec, stats, go), spec["timeout"])
    go_task.cancel()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = go.result() if go.done() else time.time()
    wall = max(1e-6, time.time() - t0)
    cpu = (r1.ru_utime - r0[0].ru_utime) + (r1.ru_stime - r0[0].ru_stime)
    result = {
        "lat_ms": [round(x, 3) for x in stats.lat_ms],
        "receipt_ms": [round(x, 3) for x in stats.receipt_ms],
        "lag_ms_p99": sorted(stats.lag_ms)[int(0.99 * (len(stats.lag_ms) - 1))]
        if stats.lag_ms
        else 0.0,
        "sent": stats.sent,
        "receipts": stats.receipts,
        "delivered": stats.delivered,
        "rest_delivered": stats.rest_delivered,
        "errors": stats.errors,
        "first_send": stats.first_send,
        "last_deliver": stats.last_deliver,
        "cpu_s": cpu,
        "cpu_sys_s": r1.ru_stime - r0[0].ru_stime,  # kernel share: TCP loopback, epoll
        "wall_s": wall,
        **extra,
    }
    return result


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    raise_nofile()
    result = asyncio.run(amain(spec))
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    emit({"event": "done"})


if __name__ == "__main__":
    main()
