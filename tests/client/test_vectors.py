"""tests/vectors/e2ee.json: the pinned e2ee-v1 vectors other clients are checked against.

Recomputed here from the inputs in the file (not from the generator), step by step with
plain `cryptography` primitives as ENVELOPE.md describes them, and through the SDK.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securecollab.client.e2ee import DeviceKey, decrypt_text, encrypt_message

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "e2ee.json").read_text(encoding="utf-8")
)["vectors"]


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def devices_of(vector: dict[str, Any]) -> list[DeviceKey]:
    return [
        DeviceKey(
            d["userId"],
            d["deviceId"],
            X25519PrivateKey.from_private_bytes(bytes.fromhex(d["privateKey"])),
        )
        for d in vector["devices"]
    ]


def test_there_are_vectors_for_direct_and_channel() -> None:
    assert {("to" in v, "channelId" in v) for v in VECTORS} == {(True, False), (False, True)}


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_from_the_spec_by_hand(vector: dict[str, Any]) -> None:
    """Follow ENVELOPE.md with raw primitives: AD, body, then each wrap."""
    kind, target = ("direct", vector["to"]) if "to" in vector else ("channel", vector["channelId"])
    ad = b"".join(
        lp(x.encode())
        for x in ("securecollab-e2ee-v1", kind, vector["sender"], target, vector["clientMessageId"])
    )
    assert ad.hex() == vector["associatedData"]
    key, iv = bytes.fromhex(vector["messageKey"]), bytes.fromhex(vector["iv"])
    body = AESGCM(key).encrypt(iv, vector["plaintext"].encode("utf-8"), ad)
    env = vector["envelope"]
    assert env["encryptedContent"] == base64.b64encode(body).decode()
    assert env["iv"] == base64.b64encode(iv).decode()
    pubs = {d["keyId"]: bytes.fromhex(d["publicKey"]) for d in vector["devices"]}
    assert sorted(env["keys"]) == sorted(pubs)
    for w in vector["wraps"]:
        eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(w["ephemeralPrivateKey"]))
        eph_pub = eph.public_key().public_bytes_raw()
        assert eph_pub.hex() == w["ephemeralPublicKey"]
        shared = eph.exchange(X25519PublicKey.from_public_bytes(pubs[w["keyId"]]))
        assert shared.hex() == w["sharedSecret"]
        info = (
            b"securecollab-e2ee-v1/wrap-key" + lp(w["keyId"].encode()) + eph_pub + pubs[w["keyId"]]
        )
        assert info.hex() == w["hkdfInfo"]
        kek = HKDF(hashes.SHA256(), 32, b"securecollab-e2ee-v1/key-wrap", info).derive(shared)
        assert kek.hex() == w["kek"]
        nonce = bytes.fromhex(w["nonce"])
        wrapped = b"\x01" + eph_pub + nonce + AESGCM(kek).encrypt(nonce, key, ad)
        assert base64.b64encode(wrapped).decode() == w["wrappedKey"] == env["keys"][w["keyId"]]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_sdk_reproduces_vector(vector: dict[str, Any]) -> None:
    """encrypt_message with the vector's randomness, in the documented draw order."""
    draws = [bytes.fromhex(vector["messageKey"]), bytes.fromhex(vector["iv"])]
    for w in sorted(vector["wraps"], key=lambda w: w["keyId"]):
        draws += [bytes.fromhex(w["ephemeralPrivateKey"]), bytes.fromhex(w["nonce"])]

    def rng(n: int) -> bytes:
        out = draws.pop(0)
        assert len(out) == n
        return out

    target = {"to": vector["to"]} if "to" in vector else {"channel_id": vector["channelId"]}
    env = encrypt_message(
        vector["plaintext"],
        sender=vector["sender"],
        devices=[d.recipient() for d in devices_of(vector)],
        client_message_id=vector["clientMessageId"],
        rng=rng,
        **target,
    )
    assert env == vector["envelope"]
    assert not draws


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_every_vector_device_decrypts(vector: dict[str, Any]) -> None:
    received = dict(vector["envelope"], **{"from": vector["sender"]})
    for device in devices_of(vector):
        assert device.public_pem() == next(
            d["publicKeyPem"] for d in vector["devices"] if d["keyId"] == device.key_id
        )
        assert decrypt_text(received, device) == vector["plaintext"]
