"""userIds are case-insensitive identities: a different spelling never reaches another user's
data, and the owner's own other spelling names the owner.

The store keys users by the lowercased id (`store/rows.py: user_key`) and every
session/principal carries the stored spelling. Client-typed ids (query and path
parameters, Spring-form destinations) must be compared the same way, or a spelling
either leaks (the dangerous direction, checked first in each test) or refuses the
rightful owner (the direction that was broken).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.broker.clients import tcp_client
from tests.hardening.shared import SharedServer

IV = "AAAAAAAAAAAAAAAA"


def _send(c: httpx.Client, srv: SharedServer, sender: str, to: str) -> str:
    r = c.post(
        "/api/chat/send-message",
        json={"to": to, "encryptedContent": "QUJD", "iv": IV},
        headers=srv.auth(sender),
    )
    assert r.status_code == 201, r.text
    mid: str = r.json()["id"]
    return mid


@pytest.fixture
def client(shared_server: SharedServer) -> httpx.Client:
    return httpx.Client(base_url=shared_server.base_url, timeout=30)


def test_history_spelling_never_reaches_another_pair(
    client: httpx.Client, shared_server: SharedServer
) -> None:
    mid = _send(client, shared_server, "alice@example.com", "bob@example.com")
    for spelling in ("BOB@EXAMPLE.COM", "Alice@Example.com", "bob@example.com"):
        r = client.get(
            "/api/chat/messages",
            params={"with": spelling},
            headers=shared_server.auth("carol@example.com"),
        )
        assert r.status_code == 200
        assert mid not in [m["id"] for m in r.json()]  # carol only ever sees her own
    r = client.get(
        "/api/chat/messages",
        params={"with": "BOB@EXAMPLE.COM"},
        headers=shared_server.auth("alice@example.com"),
    )
    assert mid in [m["id"] for m in r.json()]


def test_registering_another_spelling_of_a_taken_id_is_refused(client: httpx.Client) -> None:
    r = client.post(
        "/api/auth/register", json={"userId": "ALICE@example.com", "password": "x" * 12}
    )
    assert r.status_code == 409


async def test_spring_form_user_destination_is_case_insensitive_for_the_owner_only(
    shared_server: SharedServer,
) -> None:
    port = shared_server.stomp_port
    async with tcp_client(port) as bob:
        await bob.connect(passcode=shared_server.tokens["bob@example.com"])
        await bob.frame(
            "SUBSCRIBE",
            {"destination": "/user/ALICE@EXAMPLE.COM/queue/private", "id": "1", "receipt": "r"},
        )
        error = await bob.next("ERROR")
        assert "belongs to another user" in error.get("message", "")
    async with tcp_client(port) as alice, tcp_client(port) as carol:
        assert (
            await alice.connect(passcode=shared_server.tokens["alice@example.com"])
        ).command == "CONNECTED"
        await alice.subscribe("/user/Alice@Example.COM/queue/private")
        assert (
            await carol.connect(passcode=shared_server.tokens["carol@example.com"])
        ).command == "CONNECTED"
        body = {
            "to": "alice@example.com",
            "encryptedContent": "QUJD",
            "iv": IV,
            "clientMessageId": "spring-form",
        }
        await carol.receipt("SEND", {"destination": "/app/chat/send"}, json.dumps(body))
        while True:  # offline messages from other tests may come first
            frame = await alice.next("MESSAGE")
            assert frame.get("destination") == "/user/Alice@Example.COM/queue/private"
            if json.loads(frame.body).get("clientMessageId") == "spring-form":
                break


def test_presence_by_another_spelling(client: httpx.Client, shared_server: SharedServer) -> None:
    _send(client, shared_server, "alice@example.com", "bob@example.com")  # now peers
    password = "a stranger's password"
    client.post("/api/auth/register", json={"userId": "dave@example.com", "password": password})
    login = client.post(
        "/api/auth/login", json={"username": "dave@example.com", "password": password}
    )
    dave = {"Authorization": f"Bearer {login.json()['token']}"}
    for spelling in ("ALICE@EXAMPLE.COM", "alice@example.com", "Alice@Example.Com"):
        r = client.get("/api/presence", params={"userIds": spelling}, headers=dave)
        assert r.json() == {"users": [], "hidden": [spelling]}  # a stranger sees nothing
    r = client.get(
        "/api/presence",
        params={"userIds": "BOB@EXAMPLE.COM,Alice@example.com"},
        headers=shared_server.auth("alice@example.com"),
    )
    body = r.json()
    assert body["hidden"] == []
    assert sorted(u["userId"] for u in body["users"]) == ["alice@example.com", "bob@example.com"]


def test_owner_removes_a_member_named_in_another_spelling(
    client: httpx.Client, shared_server: SharedServer
) -> None:
    auth = shared_server.auth("alice@example.com")
    cid = client.post("/api/channels/create", json={"name": "case"}, headers=auth).json()["id"]
    r = client.post(
        f"/api/channels/{cid}/invite", json={"userIds": ["BOB@example.com"]}, headers=auth
    )
    assert r.json()["invitedCount"] == 1
    # a non-owner cannot, whatever the spelling
    r = client.delete(
        f"/api/channels/{cid}/members/ALICE@EXAMPLE.COM",
        headers=shared_server.auth("bob@example.com"),
    )
    assert r.status_code == 403
    r = client.delete(f"/api/channels/{cid}/members/Bob@Example.com", headers=auth)
    assert r.status_code == 200, r.text
    members = client.get(f"/api/channels/{cid}", headers=auth).json()["members"]
    assert members == ["alice@example.com"]


async def test_typing_to_another_spelling_reaches_the_user(shared_server: SharedServer) -> None:
    port = shared_server.stomp_port
    async with tcp_client(port) as alice, tcp_client(port) as bob:
        await alice.connect(passcode=shared_server.tokens["alice@example.com"])
        await bob.connect(passcode=shared_server.tokens["bob@example.com"])
        await bob.subscribe("/user/queue/typing")
        await alice.receipt(
            "SEND", {"destination": "/app/typing"}, json.dumps({"to": "BOB@EXAMPLE.COM"})
        )
        event = json.loads((await bob.next("MESSAGE")).body)
        assert event["from"] == "alice@example.com" and event["typing"] is True
        # and one's own id in another spelling is refused, not relayed to oneself
        await alice.frame(
            "SEND", {"destination": "/app/typing"}, json.dumps({"to": "Alice@Example.com"})
        )
        assert "invalid typing notice" in (await alice.next("ERROR")).get("message", "")
