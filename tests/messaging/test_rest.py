"""Messaging through the REST door of a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from tests.support.server import PASSWORD

from .conftest import Live, envelope

A, B, C, D = "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"


def x25519_pem() -> str:
    return (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def err(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) >= {"error", "detail"}
    return body


async def test_send_history_idempotency_and_refusals(live: Live) -> None:
    sent = envelope(to=B, clientMessageId="retry-me")
    r = await live.send(A, sent)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["status"] == "SENT" and isinstance(first["createdAt"], int)
    again = await live.send(A, sent)
    assert again.status_code == 200 and again.json()["id"] == first["id"]

    ids = [first["id"]]
    for i in range(4):
        r = await live.send(B if i % 2 else A, envelope(to=A if i % 2 else B))
        ids.append(r.json()["id"])
    r = await live.http.get("/api/chat/messages", params={"with": A}, headers=live.h(B))
    rows = r.json()
    assert [m["id"] for m in rows] == ids[::-1]  # newest first, the retry stored once
    assert rows[-1]["encryptedContent"] == sent["encryptedContent"]
    assert rows[-1]["from"] == A and rows[-1]["to"] == B and rows[-1]["keys"] == sent["keys"]
    page = await live.http.get(
        "/api/chat/messages", params={"with": A, "limit": 2, "offset": 2}, headers=live.h(B)
    )
    assert [m["id"] for m in page.json()] == ids[::-1][2:4]
    cursor = await live.http.get(
        "/api/chat/messages", params={"with": B, "limit": 2, "before": ids[2]}, headers=live.h(A)
    )
    assert [m["id"] for m in cursor.json()] == [ids[1], ids[0]]

    # Refusals are JSON, never 5xx.
    assert err(await live.send(A, envelope(to=B, content="hi bob")), 422)["detail"].startswith(
        "plaintext is not accepted"
    )
    assert (
        "does not exist" in err(await live.send(A, envelope(to="ghost@example.com")), 404)["detail"]
    )
    assert (
        "iv must be 12 or 16" in err(await live.send(A, envelope(to=B, iv="AAAA")), 422)["detail"]
    )
    bad = await live.http.post(
        "/api/chat/send-message",
        content=b"{not json",
        headers=live.h(A, **{"Content-Type": "application/json"}),
    )
    err(bad, 400)
    for params, why in [
        ({"with": A, "limit": "201"}, "limit must be between 1 and 200"),
        ({"with": A, "limit": "x"}, "limit must be an integer"),
        ({"with": A, "fromDate": "9", "toDate": "1"}, "fromDate must not be after toDate"),
        ({}, "with is required"),
    ]:
        r = await live.http.get("/api/chat/messages", params=params, headers=live.h(B))
        assert why in err(r, 422)["detail"]
    unauth = await live.http.get("/api/chat/messages", params={"with": A})
    err(unauth, 401)


async def test_a_user_never_reads_another_pairs_messages(live: Live) -> None:
    await live.send(B, envelope(to=C))
    # Carol's conversation with bob is not alice's to read: alice only ever sees her own.
    r = await live.http.get("/api/chat/messages", params={"with": C}, headers=live.h(A))
    assert r.status_code == 200 and r.json() == []
    r = await live.http.get("/api/chat/messages", params={"with": B}, headers=live.h(A))
    assert r.json() == []


async def test_offline_queue_read_does_not_delete_ack_does_and_only_own(live: Live) -> None:
    m1 = (await live.send(A, envelope(to=B))).json()["id"]
    m2 = (await live.send(C, envelope(to=B))).json()["id"]
    for _ in range(2):  # reading twice returns the same: delete on ack, not on read
        r = await live.http.get("/api/chat/offline-messages", headers=live.h(B))
        assert [m["id"] for m in r.json()] == [m1, m2]
    entry = r.json()[0]
    assert entry["from"] == A and entry["expiresAt"] - entry["queuedAt"] == 7 * 86_400_000
    # Alice cannot see or ack bob's queue.
    r = await live.http.get("/api/chat/offline-messages", headers=live.h(A))
    assert r.json() == []
    r = await live.http.post(
        "/api/chat/offline-messages/ack", json={"ids": [m1, m2]}, headers=live.h(A)
    )
    assert r.json() == {"acked": 0}
    r = await live.http.post(
        "/api/chat/offline-messages/ack", json={"ids": [m1]}, headers=live.h(B)
    )
    assert r.status_code == 200 and r.json() == {"acked": 1}
    r = await live.http.get("/api/chat/offline-messages", headers=live.h(B))
    assert [m["id"] for m in r.json()] == [m2]
    r = await live.http.post(
        "/api/chat/offline-messages/ack", json={"ids": "all"}, headers=live.h(B)
    )
    err(r, 422)


async def test_device_key_directory(live: Live) -> None:
    pem = x25519_pem()
    r = await live.http.post(
        "/api/keys/register", json={"deviceId": "laptop", "publicKey": pem}, headers=live.h(A)
    )
    assert r.status_code == 201, r.text
    reg = r.json()
    assert reg["deviceId"] == "laptop" and set(reg) == {"bundleId", "deviceId", "registeredAt"}
    r = await live.http.get(f"/api/keys/{A}/laptop", headers=live.h(B))
    assert r.json()["publicKey"] == pem and r.json()["registeredAt"] == reg["registeredAt"]
    assert r.json()["lastUsedAt"] is None

    pem2 = x25519_pem()
    r = await live.http.post(
        "/api/keys/register", json={"deviceId": "laptop", "publicKey": pem2}, headers=live.h(A)
    )
    assert r.status_code == 201
    await live.http.post(
        "/api/keys/register", json={"deviceId": "phone", "publicKey": pem}, headers=live.h(A)
    )
    r = await live.http.get(f"/api/keys/{A}", headers=live.h(C))
    assert {k["deviceId"]: k["publicKey"] for k in r.json()} == {"laptop": pem2, "phone": pem}
    audit = await live.srv.ctx.audit.list(actor=A, action_prefix="keys.")
    assert [a.action for a in audit].count("keys.replace") == 1

    # Fetching messages touches the device named by the token (login deviceId "laptop").
    await live.http.get("/api/chat/offline-messages", headers=live.h(A))
    r = await live.http.get(f"/api/keys/{A}/laptop", headers=live.h(A))
    assert isinstance(r.json()["lastUsedAt"], int)

    rsa_pem = (
        rsa.generate_private_key(65537, 1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for bad in ["-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", rsa_pem]:
        r = await live.http.post(
            "/api/keys/register", json={"deviceId": "x", "publicKey": bad}, headers=live.h(A)
        )
        err(r, 422)
    err(await live.http.get(f"/api/keys/{A}/tablet", headers=live.h(B)), 404)
    err(await live.http.get("/api/keys/ghost@example.com", headers=live.h(B)), 404)

    # Bob can never delete alice's device: the route only names the caller's own.
    err(await live.http.delete("/api/keys/laptop", headers=live.h(B)), 404)
    assert (await live.http.get(f"/api/keys/{A}/laptop", headers=live.h(B))).status_code == 200
    r = await live.http.delete("/api/keys/laptop", headers=live.h(A))
    assert r.json() == {"success": True}
    err(await live.http.get(f"/api/keys/{A}/laptop", headers=live.h(B)), 404)


async def test_channels_membership_and_authorization(live: Live) -> None:
    r = await live.http.post(
        "/api/channels/create", json={"name": "ops", "description": "on call"}, headers=live.h(A)
    )
    assert r.status_code == 201, r.text
    ch = r.json()
    cid = ch["id"]
    assert ch["ownerId"] == A and ch["members"] == [A] and ch["settings"] == {"encryption": "E2EE"}

    r = await live.http.post(
        f"/api/channels/{cid}/invite", json={"userIds": [B, "ghost@example.com"]}, headers=live.h(A)
    )
    assert "ghost@example.com" in err(r, 422)["detail"]
    r = await live.http.post(
        f"/api/channels/{cid}/invite", json={"userIds": [B, C]}, headers=live.h(A)
    )
    assert r.json() == {"success": True, "invitedCount": 2}
    r = await live.http.post(
        f"/api/channels/{cid}/invite", json={"userIds": [B]}, headers=live.h(A)
    )
    assert r.json()["invitedCount"] == 0

    # A plain member cannot invite; a non-member cannot read, page, send or invite.
    err(
        await live.http.post(
            f"/api/channels/{cid}/invite", json={"userIds": [D]}, headers=live.h(B)
        ),
        403,
    )
    err(await live.http.get(f"/api/channels/{cid}", headers=live.h(D)), 404)
    err(await live.http.get(f"/api/channels/{cid}/messages", headers=live.h(D)), 404)
    err(await live.send(D, envelope(channelId=cid)), 404)
    err(
        await live.http.post(
            f"/api/channels/{cid}/invite", json={"userIds": [D]}, headers=live.h(D)
        ),
        404,
    )

    sent = (await live.send(B, envelope(channelId=cid))).json()["id"]
    r = await live.http.get(
        f"/api/channels/{cid}/messages", params={"limit": 10}, headers=live.h(C)
    )
    assert [m["id"] for m in r.json()] == [sent] and r.json()[0]["channelId"] == cid
    err(
        await live.http.get(
            f"/api/channels/{cid}/messages", params={"limit": 0}, headers=live.h(C)
        ),
        422,
    )

    r = await live.http.get("/api/channels", headers=live.h(C))
    assert [c["id"] for c in r.json()] == [cid] and sorted(r.json()[0]["members"]) == [A, B, C]
    r = await live.http.get(f"/api/channels/{cid}", headers=live.h(B))
    assert r.json()["memberRoles"] == {A: "owner", B: "member", C: "member"}

    err(await live.http.delete(f"/api/channels/{cid}/members/{C}", headers=live.h(B)), 403)
    r = await live.http.delete(f"/api/channels/{cid}/members/{C}", headers=live.h(A))
    assert r.json() == {"success": True}
    err(await live.http.get(f"/api/channels/{cid}/messages", headers=live.h(C)), 404)
    assert (await live.http.post(f"/api/channels/{cid}/leave", headers=live.h(B))).json() == {
        "success": True
    }
    err(await live.http.post(f"/api/channels/{cid}/leave", headers=live.h(A)), 409)
    r = await live.http.get(f"/api/channels/{cid}", headers=live.h(A))
    assert r.json()["members"] == [A]

    audit = [(a.action, a.target) for a in await live.srv.ctx.audit.list(action_prefix="channel.")]
    for action in ("channel.create", "channel.invite", "channel.remove", "channel.leave"):
        assert (action, cid) in audit


async def test_device_header_when_the_token_names_no_device_and_openapi(live: Live) -> None:
    # A login without deviceId: the X-Device-Id header says which device is fetching.
    r = await live.http.post("/api/auth/login", json={"username": C, "password": PASSWORD})
    token = r.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    r = await live.http.post(
        "/api/keys/register", json={"deviceId": "desk", "publicKey": x25519_pem()}, headers=auth
    )
    assert r.status_code == 201
    await live.http.get("/api/chat/offline-messages", headers={**auth, "X-Device-Id": "desk"})
    r = await live.http.get(f"/api/keys/{C}/desk", headers=auth)
    assert isinstance(r.json()["lastUsedAt"], int)

    doc = (await live.http.get("/openapi.json")).json()
    for path in (
        "/api/chat/send-message",
        "/api/chat/messages",
        "/api/chat/offline-messages/ack",
        "/api/channels/{channel_id}/invite",
        "/api/keys/{user_id}/{device_id}",
    ):
        assert path in doc["paths"], path


async def test_pruned_offline_entries_are_counted_in_metrics(live: Live) -> None:
    offline = live.srv.ctx.offline
    messages = live.srv.ctx.messages
    assert offline is not None and messages is not None
    messages.offline_ttl_ms = -1  # queued already expired
    await live.send(A, envelope(to=B))
    messages.offline_ttl_ms = 7 * 86_400_000

    def pruned_total(text: str) -> float:
        [line] = [
            ln for ln in text.splitlines() if ln.startswith("securecollab_offline_pruned_total")
        ]
        return float(line.split()[-1])

    before = pruned_total((await live.http.get("/metrics")).text)
    assert await offline.prune_expired() == 1
    assert pruned_total((await live.http.get("/metrics")).text) == before + 1
