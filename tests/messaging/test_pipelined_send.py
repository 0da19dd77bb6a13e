"""Pipelined chat SENDs end to end: the real server, the real MessageService and store.

`SEND /app/chat/send` is a pipelined /app handler: the broker reads a connection's next
SENDs while the earlier ones commit (`BrokerConfig.pipeline_depth`). A client that
sends a burst without waiting for receipts must still see what one-at-a-time sending
gave: every message stored once, delivered in send order, receipted in send order.
Run on both store adapters (their write paths queue differently: SQLite queues without
a checkpoint, PostgreSQL through a channel).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.server import PASSWORD, ServerHandle, bearer, free_port, running_server

from .conftest import envelope
from .stomp_client import stomp_connect

A, B = "alice@example.com", "bob@example.com"
PRIVATE = "/user/queue/private"
SEND = "/app/chat/send"
COUNT = 50
WAIT_S = 20.0  # a hang guard for the whole burst, not a speed assertion


@pytest.fixture
async def server(store_url: str, tmp_path: Path) -> AsyncIterator[ServerHandle]:
    """A real server on the parametrized store, with a SEND limit above the burst (the
    default, 20 per 10 s, would drop most of it)."""
    async with running_server(
        tmp_path, stomp__port=free_port(), store__url=store_url, stomp__send_limit=1_000
    ) as srv:
        yield srv


async def login(http: httpx.AsyncClient, user: str, device: str) -> str:
    r = await http.post("/api/auth/register", json={"userId": user, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await http.post(
        "/api/auth/login", json={"username": user, "password": PASSWORD, "deviceId": device}
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


async def test_a_burst_of_sends_is_stored_delivered_and_receipted_in_send_order(
    server: ServerHandle,
) -> None:
    assert server.settings.stomp.pipeline_depth > 1  # the burst is pipelined
    port = server.ports["stomp"]
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        alice = await login(http, A, "laptop")
        bob = await login(http, B, "phone")
        async with (
            stomp_connect(port, bob, device="phone") as receiver,
            stomp_connect(port, alice, device="laptop") as sender,
        ):
            await receiver.subscribe(PRIVATE)
            cmids = [f"burst-{i:02d}" for i in range(COUNT)]
            for i, cmid in enumerate(cmids):  # back to back: no wait for any receipt
                await sender.write(
                    "SEND",
                    {"destination": SEND, "content-type": "application/json", "receipt": f"s{i}"},
                    json.dumps(envelope(to=B, clientMessageId=cmid)).encode(),
                )
            with trio.fail_after(WAIT_S):
                replies = [await sender.expect("RECEIPT", "ERROR") for _ in range(COUNT)]
                received = [(await receiver.message(PRIVATE))[1] for _ in range(COUNT)]
            assert [f.command for f in replies] == ["RECEIPT"] * COUNT, replies[-1]
            assert [f.get("receipt-id") for f in replies] == [f"s{i}" for i in range(COUNT)]
            assert [m["clientMessageId"] for m in received] == cmids
            assert {m["from"] for m in received} == {A}
            assert sender.pending() == [] and receiver.pending() == []

        r = await http.get(
            "/api/chat/messages", params={"with": A, "limit": "200"}, headers=bearer(bob)
        )
        assert r.status_code == 200, r.text
        history = r.json()  # newest first
        assert len(history) == COUNT
        assert [m["id"] for m in reversed(history)] == [m["id"] for m in received]
        assert [m["clientMessageId"] for m in reversed(history)] == cmids
