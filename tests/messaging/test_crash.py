"""Crash safety: every message the server acknowledged survives a `kill -9`.

The server runs as a real subprocess (`.venv/bin/securecollab serve`). Alice sends to
offline Bob over STOMP (several SENDs in flight on two connections, each with a
receipt) and over REST at the same time; once enough were acknowledged the process is
killed with SIGKILL while sends are still in flight. After a restart on the same data,
every message that got a RECEIPT or a 2xx must be in the history and in Bob's offline
queue, and must reach Bob when he subscribes - exactly once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.server import PASSWORD, bearer, free_port

from .conftest import envelope
from .stomp_client import StompClient, stomp_connect

A, B = "alice@example.com", "bob@example.com"
KILL_AFTER = 60  # acknowledged sends before the kill
MAX_SENDS = 400  # hard bound on the send loops (the kill comes long before)
SERVE = Path(sys.executable).parent / "securecollab"


class Server:
    def __init__(self, tmp_path: Path, store_url: str) -> None:
        self.tmp_path = tmp_path
        self.store_url = store_url
        self.proc: trio.Process | None = None
        self.http_port = 0
        self.stomp_port = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECOLLAB_")}
        env.update(
            SECURECOLLAB_SERVER__DATA_DIR=str(self.tmp_path / "data"),
            SECURECOLLAB_STORE__URL=self.store_url,
            SECURECOLLAB_AUTH__ARGON2_TIME_COST="1",
            SECURECOLLAB_AUTH__ARGON2_MEMORY_KIB="8192",
            SECURECOLLAB_STOMP__PORT=str(self.stomp_port),
            SECURECOLLAB_STOMP__SEND_LIMIT="100000",
            SECURECOLLAB_HTTP__RATE_LIMIT_USER_PER_MIN="100000",
        )
        return env

    async def start(self) -> None:
        self.http_port, self.stomp_port = free_port(), free_port()
        log = (self.tmp_path / "server.log").open("ab")
        self.proc = await trio.lowlevel.open_process(
            [str(SERVE), "serve", "--port", str(self.http_port)],
            env=self.env(),
            cwd=str(self.tmp_path),
            stdout=log,
            stderr=log,
        )
        async with httpx.AsyncClient(base_url=self.base_url) as c:
            for _ in range(300):  # bounded: ~30 s
                assert self.proc.returncode is None, self.log_tail()
                try:
                    if (await c.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
            else:
                raise AssertionError("server did not become ready: " + self.log_tail())
        # /readyz answers before the STOMP listener may be up; wait for it as well
        for _ in range(300):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.stomp_port)
                await stream.aclose()
                return
            except OSError:
                await trio.sleep(0.1)
        raise AssertionError("STOMP port never opened: " + self.log_tail())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self) -> str:
        return (self.tmp_path / "server.log").read_text(errors="replace")[-3000:]

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.proc.wait()
            if self.proc.returncode is None:
                await self.kill9()


async def login(http: httpx.AsyncClient, user: str) -> str:
    r = await http.post("/api/auth/login", json={"username": user, "password": PASSWORD})
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


async def test_receipted_messages_survive_kill_9(tmp_path: Path, store_url: str) -> None:
    server = Server(tmp_path, store_url)
    await server.start()
    acked: list[str] = []  # clientMessageIds acknowledged (RECEIPT or 2xx)
    attempted: list[str] = []
    killed = trio.Event()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            for u in (A, B):
                r = await http.post("/api/auth/register", json={"userId": u, "password": PASSWORD})
                assert r.status_code == 201, r.text
            token = await login(http, A)

            async def acknowledged(cmid: str) -> None:
                acked.append(cmid)
                if len(acked) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    await server.kill9()  # mid-stream: other sends are in flight now

            async def stomp_sender(client: StompClient, prefix: str, lane: int) -> None:
                for i in range(MAX_SENDS):
                    cmid = f"{prefix}-{lane}-{i}"
                    attempted.append(cmid)
                    try:
                        frame = await client.send_json(
                            "/app/chat/send", envelope(to=B, clientMessageId=cmid)
                        )
                    except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    assert frame.command == "RECEIPT", frame
                    await acknowledged(cmid)

            async def rest_sender() -> None:
                for i in range(MAX_SENDS):
                    cmid = f"rest-{i}"
                    attempted.append(cmid)
                    try:
                        r = await http.post(
                            "/api/chat/send-message",
                            json=envelope(to=B, clientMessageId=cmid),
                            headers=bearer(token),
                        )
                    except httpx.TransportError:
                        return
                    assert r.status_code == 201, r.text
                    await acknowledged(cmid)

            async with (
                stomp_connect(server.stomp_port, token) as s1,
                stomp_connect(server.stomp_port, token) as s2,
                trio.open_nursery() as nursery,
            ):
                for lane in range(4):  # four SENDs in flight per connection
                    nursery.start_soon(stomp_sender, s1, "s1", lane)
                    nursery.start_soon(stomp_sender, s2, "s2", lane)
                nursery.start_soon(rest_sender)
        assert killed.is_set(), "the server was never killed"
        assert len(attempted) > len(acked)  # some sends really were cut off
    finally:
        if not killed.is_set():
            await server.stop()

    # Restart on the same data (the JWT secret lives there too).
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            token_b = await login(http, B)
            history: list[dict[str, Any]] = []
            before: str | None = None
            for _ in range(10):  # bounded paging, 200 a page
                params = {"with": A, "limit": "200", **({"before": before} if before else {})}
                r = await http.get("/api/chat/messages", params=params, headers=bearer(token_b))
                page = r.json()
                history += page
                if len(page) < 200:
                    break
                before = page[-1]["id"]
            stored = [m["clientMessageId"] for m in history]
            assert len(stored) == len(set(stored)), "a message was stored twice"
            assert set(acked) <= set(stored), f"lost: {sorted(set(acked) - set(stored))}"

            r = await http.get("/api/chat/offline-messages", headers=bearer(token_b))
            queued = [m["clientMessageId"] for m in r.json()]
            assert set(acked) <= set(queued)

            # Deliverable: bob's subscribe brings every one of them, each once.
            got: list[str] = []
            async with stomp_connect(server.stomp_port, token_b) as bob:
                await bob.subscribe("/user/queue/private", ack="client-individual")
                for _ in queued:
                    _, body = await bob.message("/user/queue/private")
                    got.append(body["clientMessageId"])
            assert got == queued and len(set(got)) == len(got)
            assert set(acked) <= set(got)
    finally:
        await server.stop()
