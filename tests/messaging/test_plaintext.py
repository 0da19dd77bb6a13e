"""The server never stores plaintext: a real E2EE conversation, then a scan of the raw database.

Clients encrypt with the SDK (`securecollab.client.e2ee`: X25519 + HKDF + AES-256-GCM)
for every device of every reader, send over REST and STOMP, and decrypt what they
receive (so the conversation really worked). Then the raw bytes the server wrote are
searched for each plaintext: the SQLite database file plus its -wal/-shm files, or a
`pg_dump --data-only` of the PostgreSQL database (searched both as text and as hex,
because bytea columns dump as hex). None may appear.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import trio

from securecollab.client import e2ee

from .conftest import Live
from .stomp_client import stomp_connect

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
DEVICES = {A: ["laptop", "phone"], B: ["phone"], C: ["laptop", "desktop"]}
PRIVATE = "/user/queue/private"


async def register_devices(live: Live) -> dict[tuple[str, str], e2ee.DeviceKey]:
    keys = {}
    for user, devices in DEVICES.items():
        for device in devices:
            k = e2ee.DeviceKey.generate(user, device)
            r = await live.http.post(
                "/api/keys/register",
                json={"deviceId": device, "publicKey": k.public_pem()},
                headers=live.h(user),
            )
            assert r.status_code == 201, r.text
            keys[(user, device)] = k
    return keys


async def directory(live: Live, asker: str, users: list[str]) -> list[e2ee.RecipientDevice]:
    """Every device of `users`, as the key directory tells `asker`."""
    out = []
    for u in users:
        r = await live.http.get(f"/api/keys/{u}", headers=live.h(asker))
        out += [e2ee.RecipientDevice.from_pem(u, k["deviceId"], k["publicKey"]) for k in r.json()]
    return out


def scan(blobs: dict[str, bytes], plaintexts: list[str]) -> list[str]:
    """'<plaintext> in <where>' for every plaintext found raw or hex-encoded."""
    hits = []
    for text in plaintexts:
        raw = text.encode()
        for where, data in blobs.items():
            if raw in data or raw.hex().encode() in data.lower():
                hits.append(f"{text!r} in {where}")
    return hits


async def test_no_plaintext_reaches_the_database(live: Live, store_url: str) -> None:
    keys = await register_devices(live)
    plaintexts = [f"plaintext-canary-{i}-{secrets.token_hex(8)}" for i in range(6)]

    # 1:1 alice -> bob over REST, bob -> alice over STOMP; bob reads live over STOMP.
    async with (
        stomp_connect(live.stomp_port, live.tokens[B], device="phone") as bob,
        stomp_connect(live.stomp_port, live.tokens[A], device="laptop") as alice,
    ):
        await bob.subscribe(PRIVATE)
        await alice.subscribe(PRIVATE)
        env = e2ee.encrypt_message(
            plaintexts[0], sender=A, devices=await directory(live, A, [A, B]), to=B
        )
        assert (await live.send(A, env)).status_code == 201
        _, got = await bob.message(PRIVATE)
        assert e2ee.decrypt_text(got, keys[(B, "phone")]) == plaintexts[0]
        # A REST send has no sending session: all of alice's sessions get the sync copy.
        _, synced = await alice.message(PRIVATE)
        assert e2ee.decrypt_text(synced, keys[(A, "laptop")]) == plaintexts[0]

        env = e2ee.encrypt_message(
            plaintexts[1], sender=B, devices=await directory(live, B, [A, B]), to=A
        )
        assert (await bob.send_json("/app/chat/send", env)).command == "RECEIPT"
        _, got = await alice.message(PRIVATE)
        assert e2ee.decrypt_text(got, keys[(A, "laptop")]) == plaintexts[1]

    # Alice's phone (never connected) reads both from history.
    r = await live.http.get("/api/chat/messages", params={"with": B}, headers=live.h(A))
    assert [e2ee.decrypt_text(m, keys[(A, "phone")]) for m in r.json()] == plaintexts[1::-1]

    # A channel of three users and five devices; carol is offline (offline queue too).
    r = await live.http.post("/api/channels/create", json={"name": "team"}, headers=live.h(A))
    cid = r.json()["id"]
    await live.http.post(f"/api/channels/{cid}/invite", json={"userIds": [B, C]}, headers=live.h(A))
    members = [A, B, C]
    async with stomp_connect(live.stomp_port, live.tokens[B], device="phone") as bob:
        await bob.subscribe(f"/topic/messages/{cid}")
        for i, text in enumerate(plaintexts[2:]):
            sender = A if i % 2 == 0 else B
            env = e2ee.encrypt_message(
                text, sender=sender, devices=await directory(live, sender, members), channel_id=cid
            )
            if sender == B:
                assert (await bob.send_json("/app/chat/send", env)).command == "RECEIPT"
            else:
                assert (await live.send(A, env)).status_code == 201
                _, got = await bob.message(f"/topic/messages/{cid}")
                assert e2ee.decrypt_text(got, keys[(B, "phone")]) == text
    r = await live.http.get("/api/chat/offline-messages", headers=live.h(C))
    assert [e2ee.decrypt_text(m, keys[(C, "desktop")]) for m in r.json()] == plaintexts[2:]

    # Now read what the server actually wrote.
    if store_url.startswith("sqlite:"):
        db = Path(store_url.removeprefix("sqlite:///"))
        blobs = {p.name: p.read_bytes() for p in db.parent.glob(db.name + "*")}
        assert db.name in blobs and len(blobs[db.name]) > 0
    else:
        dump = await trio.to_thread.run_sync(
            lambda: (
                subprocess.run(
                    ["pg_dump", "--data-only", "--no-owner", store_url],
                    capture_output=True,
                    check=True,
                    timeout=60,
                ).stdout
            )
        )
        blobs = {"pg_dump": dump}
        # The dump really holds the conversation (ciphertext), or the scan proves nothing.
        assert env["encryptedContent"].encode() in dump  # type: ignore[union-attr]
    assert scan(blobs, [A]), "the scan must find what is stored in clear (user ids)"
    assert scan(blobs, plaintexts) == []
    # The ciphertext itself is there (the scan looked at the right bytes).
    if store_url.startswith("sqlite:"):
        assert any(env["iv"].encode() in b for b in blobs.values())  # type: ignore[union-attr]
