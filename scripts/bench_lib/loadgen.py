#!/usr/bin/env python3
"""Load-generator worker for scripts/bench.py: one process, asyncio + `websockets`.

    python scripts/bench_lib/loadgen.py SPEC.json

Not meant to be run by hand: bench.py writes SPEC.json, starts several of these,
and talks to them over stdin/stdout (one JSON object per line):

    worker -> {"event": "ready", ...}      connections open (and subscribed)
    bench  -> "go <t0>\\n"                  start the load at wall-clock time t0
    worker -> {"event": "done"}            results written to spec["out"]

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
import json
import random
import resource
import struct
import sys
import time
from typing import Any

import websockets

STAMP = struct.Struct(">dI")
REST_SEQ = 0xFFFFFFFF  # marks a message sent over REST (workload 4): counted apart
CONTENT_KEY = b'"encryptedContent":"'


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Envelopes:
    """Realistic E2EE envelopes: 200-500 B ciphertext, 12 B iv, wrapped keys for 2 devices."""

    def __init__(self, rng: random.Random) -> None:
        # Pre-encoded ciphertext tails (a multiple of 3 bytes, so that base64(stamp + tail)
        # == base64(stamp) + base64(tail)): the per-message cost is one 12-byte encode.
        self.tails = [b64(rng.randbytes(3 * rng.randint(63, 163))) for _ in range(64)]
        self.ivs = [b64(rng.randbytes(12)) for _ in range(64)]
        self.rng = rng

    def body(self, to_field: str, to: str, sender: str, seq: int, cmid: str) -> bytes:
        """Compact JSON envelope whose ciphertext starts with (time.time(), seq)."""
        i = seq % 64
        content = b64(STAMP.pack(time.time(), seq)) + self.tails[i]
        wrap1 = self.tails[(i + 7) % 64][:124]  # ~92-byte X25519+HKDF+AES-GCM wrap each
        wrap2 = self.tails[(i + 13) % 64][:124]
        return (
            f'{{"{to_field}":"{to}","encryptedContent":"{content}","iv":"{self.ivs[i]}",'
            f'"keys":{{"{to}/phone":"{wrap1}","{sender}/laptop":"{wrap2}"}},'
            f'"clientMessageId":"{cmid}"}}'
        ).encode()


def stamp_of(body: bytes) -> tuple[float, int] | None:
    """(send time, seq) from a delivered body, or None when it carries no stamp."""
    at = body.find(CONTENT_KEY)
    if at < 0:
        return None
    start = at + len(CONTENT_KEY)
    try:
        sent, seq = STAMP.unpack(base64.b64decode(body[start : start + 16]))
    except (ValueError, struct.error):
        return None
    return sent, seq


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


class Stomp:
    """One STOMP-over-WebSocket connection (text frames, no compression)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.closed_by_server: str | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        login: str,
        passcode: str,
        vhost: str,
        heartbeat: str = "0,0",
        wait_s: float = 30,
    ) -> Stomp:
        ws = await websockets.connect(
            url,
            subprotocols=["v12.stomp"],  # type: ignore[list-item]
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=wait_s,
            close_timeout=2,
        )
        conn = cls(ws)
        headers = {"accept-version": "1.2", "host": vhost, "heart-beat": heartbeat}
        if login:
            headers["login"] = login
        headers["passcode"] = passcode
        await ws.send(frame("CONNECT", headers).decode())
        while True:
            for cmd, h, body in parse(await asyncio.wait_for(ws.recv(decode=False), wait_s)):
                if cmd == "CONNECTED":
                    return conn
                if cmd == "ERROR":
                    await ws.close()
                    raise ConnectionError(f"CONNECT refused: {h.get('message')} {body[:200]!r}")

    async def send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        await self.ws.send(frame(command, headers, body).decode())

    async def request(self, command: str, headers: dict[str, str]) -> None:
        """Send a frame with a receipt and wait for that RECEIPT (setup only)."""
        headers = {**headers, "receipt": "setup"}
        await self.send(command, headers)
        while True:
            for cmd, h, body in parse(await asyncio.wait_for(self.ws.recv(decode=False), 30)):
                if cmd == "RECEIPT" and h.get("receipt-id") == "setup":
                    return
                if cmd == "ERROR":
                    raise ConnectionError(f"{command} refused: {h.get('message')} {body[:200]!r}")


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


# --------------------------------------------------------------------------- direct (1, 4)


async def direct(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """Each local user sends to its peer at spec rate with receipts; receivers time arrivals."""
    users = spec["users"]
    per_user = spec["rate_per_user"]
    count = spec["count_per_user"]
    expected = spec["expected_per_user"]
    env = Envelopes(random.Random(spec["seed"]))
    conns: list[Stomp] = []
    sem = asyncio.Semaphore(50)

    async def setup(u: dict[str, Any]) -> Stomp:
        async with sem:
            c = await Stomp.open(spec["url"], u["login"], u["passcode"], spec["vhost"])
            sub = {"destination": u["subscribe"], "id": "0", "ack": "auto"}
            sub.update(u.get("subscribe_headers", {}))
            await c.request("SUBSCRIBE", sub)
            return c

    conns = list(await asyncio.gather(*(setup(u) for u in users)))
    ready(len(conns))
    t0 = await go
    send_end = t0 + spec["duration"] + spec["send_grace"]
    drain_end = t0 + spec["duration"] + spec["drain"]
    received = [0] * len(users)
    outstanding: list[dict[str, float]] = [{} for _ in users]
    all_done = asyncio.Event()
    total_expected = expected * len(users)

    async def reader(i: int, c: Stomp) -> None:
        pending = outstanding[i]
        try:
            while True:
                data = await c.ws.recv(decode=False)
                now = time.time()
                for cmd, h, body in parse(data):
                    if cmd == "MESSAGE":
                        st = stamp_of(body)
                        if st is None:
                            stats.error("unstamped MESSAGE")
                            continue
                        if st[1] == REST_SEQ:
                            stats.rest_delivered += 1
                            continue
                        stats.lat_ms.append((now - st[0]) * 1000)
                        stats.delivered += 1
                        stats.last_deliver = now
                        received[i] += 1
                        if stats.delivered >= total_expected and stats.receipts >= count * len(
                            users
                        ):
                            all_done.set()
                    elif cmd == "RECEIPT":
                        sent_at = pending.pop(h.get("receipt-id", ""), None)
                        if sent_at is not None:
                            stats.receipt_ms.append((now - sent_at) * 1000)
                            stats.receipts += 1
                            stats.last_receipt = now
                            if stats.delivered >= total_expected and stats.receipts >= count * len(
                                users
                            ):
                                all_done.set()
                    elif cmd == "ERROR":
                        stats.error(f"ERROR {h.get('message')}")
                        c.closed_by_server = h.get("message", "")
                        return
        except websockets.ConnectionClosed as exc:
            if c.closed_by_server is None:
                c.closed_by_server = f"closed {exc}"
                stats.error("connection closed")

    async def sender(i: int, c: Stomp, u: dict[str, Any]) -> None:
        # Evenly spaced per user, users phase-shifted so the worker's aggregate is smooth.
        interval = 1.0 / per_user
        start = t0 + interval * (i / len(users))
        pending = outstanding[i]
        base_seq = spec["seq_base"] + i * count
        for k in range(count):
            due = start + k * interval
            now = time.time()
            if now > send_end:
                stats.error("not sent (generator too slow)")
                return
            if due > now:
                await asyncio.sleep(due - now)
            elif k % 16 == 0:
                await asyncio.sleep(0)
            rid = f"r{k}"
            seq = base_seq + k
            body = env.body(u["to_field"], u["to"], u["user_id"], seq, f"{spec['run']}-{seq}")
            sent_at = time.time()
            stats.lag_ms.append(max(0.0, (sent_at - due) * 1000))
            pending[rid] = sent_at
            if not stats.first_send:
                stats.first_send = sent_at
            headers = dict(u["send_headers"])
            headers["receipt"] = rid
            headers["content-length"] = str(len(body))
            try:
                await c.send("SEND", headers, body)
            except websockets.ConnectionClosed:
                stats.error("send on closed connection")
                return
            stats.sent += 1

    tasks = [asyncio.create_task(reader(i, c)) for i, c in enumerate(conns)]
    senders = [
        asyncio.create_task(sender(i, c, u))
        for i, (c, u) in enumerate(zip(conns, users, strict=True))
    ]
    await asyncio.wait(senders, timeout=max(0.1, send_end - time.time() + 1))
    try:
        await asyncio.wait_for(all_done.wait(), max(0.1, drain_end - time.time()))
    except TimeoutError:
        pass
    for t in tasks + senders:
        t.cancel()
    await close_all(conns)
    return {
        "received_per_user": received,
        "missing_receipts": sum(len(p) for p in outstanding),
    }


# --------------------------------------------------------------------------- fan-out (2)


async def fanout(spec: dict[str, Any], stats: Stats, go: asyncio.Future[float]) -> dict[str, Any]:
    """Subscribers on a topic time each message; worker 0 also runs the one sender."""
    subs = spec["subscribers"]
    sem = asyncio.Semaphore(50)
    count = spec["count"]

    async def setup(u: dict[str, Any]) -> Stomp:
        async with sem:
            c = await Stomp.open(spec["url"], u["login"], u["passcode"], spec["vhost"])
            await c.request("SUBSCRIBE", {"destination": spec["topic"], "id": "0", "ack": "auto"})
            return c

    conns = list(await asyncio.gather(*(setup(u) for u in subs)))
    sender_conn: Stomp | None = None
    snd = spec.get("sender")
    if snd:
        sender_conn = await Stomp.open(spec["url"], snd["login"], snd["passcode"], spec["vhost"])
    ready(len(conns))
    t0 = await go
    drain_end = t0 + spec["duration"] + spec["drain"]
    # seq -> latest arrival latency among this worker's subscribers; plus per-sub counts
    last_ms: dict[int, float] = {}
    got = [0] * len(conns)
    done = asyncio.Event()
    remaining = [len(conns) * count]

    async def reader(i: int, c: Stomp) -> None:
        try:
            while True:
                data = await c.ws.recv(decode=False)
                now = time.time()
                for cmd, h, body in parse(data):
                    if cmd == "MESSAGE":
                        st = stamp_of(body)
                        if st is None:
                            stats.error("unstamped MESSAGE")
                            continue
                        ms = (now - st[0]) * 1000
                        stats.lat_ms.append(ms)
                        stats.delivered += 1
                        stats.last_deliver = now
                        if ms > last_ms.get(st[1], -1.0):
                            last_ms[st[1]] = ms
                        got[i] += 1
                        remaining[0] -= 1
                        if remaining[0] <= 0:
                            done.set()
                    elif cmd == "ERROR":
                        stats.error(f"ERROR {h.get('message')}")
                        return
        except websockets.ConnectionClosed:
            stats.error("connection closed")

    async def sender(c: Stomp) -> None:
        assert snd is not None
        env = Envelopes(random.Random(spec["seed"]))
        interval = 1.0 / spec["rate"]
        pending: dict[str, float] = {}

        async def receipts() -> None:
            while True:
                for cmd, h, _ in parse(await c.ws.recv(decode=False)):
                    if cmd == "RECEIPT":
                        at = pending.pop(h.get("receipt-id", ""), None)
                        if at is not None:
                            stats.receipts += 1
                            stats.receipt_ms.append((time.time() - at) * 1000)
                    elif cmd == "ERROR":
                        stats.error(f"sender ERROR {h.get('message')}")
                        return

        rt = asyncio.create_task(receipts())
        for k in range(count):
            due = t0 + k * interval
            now = time.time()
            if now > t0 + spec["duration"] + spec["send_grace"]:
                stats.error("not sent (generator too slow)")
                break
            if due > now:
                await asyncio.sleep(due - now)
            body = env.body(snd["to_field"], snd["to"], snd["user_id"], k, f"{spec['run']}-f{k}")
            headers = dict(snd["send_headers"])
            headers["receipt"] = f"r{k}"
            headers["content-length"] = str(len(body))
            at = time.time()
            stats.lag_ms.append(max(0.0, (at - due) * 1000))
            pending[f"r{k}"] = at
            if not stats.first_send:
                stats.first_send = at
            await c.send("SEND", headers, body)
            stats.sent += 1
        with_deadline = drain_end - time.time()
        try:
            await asyncio.wait_for(_until(lambda: not pending), max(0.1, with_deadline))
        except TimeoutError:
            stats.error("missing receipts")
        rt.cancel()

    tasks = [asyncio.create_task(reader(i, c)) for i, c in enumerate(conns)]
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
    for t in tasks:
        t.cancel()
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
    hb = spec["heartbeat_ms"]
    ready(0)
    t0 = await go
    sem = asyncio.Semaphore(spec["concurrency"])
    conns: list[Stomp] = []
    connect_ms: list[float] = []
    failures: dict[str, int] = {}
    hold_end_box = [0.0]
    dropped = [0]
    keepers: list[asyncio.Task[None]] = []

    async def keep(i: int, c: Stomp) -> None:
        # Client heart-beat every hb ms (staggered); drain whatever the server sends.
        async def beat() -> None:
            await asyncio.sleep((i % 100) / 100 * hb / 1000)
            while True:
                await c.ws.send("\n")
                await asyncio.sleep(hb / 1000)

        b = asyncio.create_task(beat())
        try:
            while True:
                for cmd, h, _ in parse(await c.ws.recv(decode=False)):
                    if cmd == "ERROR":
                        c.closed_by_server = h.get("message", "")
        except websockets.ConnectionClosed:
            dropped[0] += 1
        finally:
            b.cancel()

    async def one(i: int) -> None:
        u = users[i % len(users)]
        async with sem:
            t = time.time()
            try:
                c = await Stomp.open(
                    spec["url"], u["login"], u["passcode"], spec["vhost"], f"{hb},{hb}", 10
                )
            except Exception as exc:  # refused, reset, timed out: count it, keep going
                key = f"{type(exc).__name__}: {str(exc)[:80]}"
                failures[key] = failures.get(key, 0) + 1
                return
            connect_ms.append((time.time() - t) * 1000)
            # beat from the start: the server drops a session after 2 silent intervals,
            # and the connect phase of 10,000 sessions takes longer than that
            keepers.append(asyncio.create_task(keep(len(conns), c)))
            conns.append(c)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), spec["connect_timeout"])
    except TimeoutError:
        failures["connect phase timed out"] = n - len(conns) - sum(failures.values())
    connected_at = time.time()
    emit({"event": "connected", "n": len(conns), "at": connected_at})
    hold_end_box[0] = connected_at + spec["hold"]

    await asyncio.sleep(max(0.0, hold_end_box[0] - time.time()))
    alive = sum(1 for k in keepers if not k.done())
    for k in keepers:
        k.cancel()
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


async def close_all(conns: list[Stomp]) -> None:
    async def one(c: Stomp) -> None:
        try:
            await asyncio.wait_for(c.ws.close(), 2)
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
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
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
