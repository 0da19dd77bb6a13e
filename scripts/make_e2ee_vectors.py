"""Write tests/vectors/e2ee.json: deterministic test vectors for the securecollab-e2ee-v1 envelope.

Every secret is derived from a label with SHA-256, so the file is reproducible:

    .venv/bin/python scripts/make_e2ee_vectors.py            # rewrite the file
    .venv/bin/python scripts/make_e2ee_vectors.py --check    # exit 1 if it differs

The file lists each input (device private keys, message key, iv, per-wrap ephemeral
keys and nonces), the intermediate values an implementer needs when debugging
(associated data, ECDH shared secrets, key-encryption keys) and the expected envelope.
`tests/client/test_vectors.py` recomputes all of it. These are test keys: never use them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securecollab.client import e2ee

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "e2ee.json"


def _secret(label: str, n: int) -> bytes:
    return hashlib.sha256(f"securecollab-e2ee-v1 test vector: {label}".encode()).digest()[:n]


def _device(user_id: str, device_id: str) -> e2ee.DeviceKey:
    raw = _secret(f"device {user_id}/{device_id}", 32)
    return e2ee.DeviceKey(user_id, device_id, X25519PrivateKey.from_private_bytes(raw))


def _vector(
    name: str,
    sender: str,
    plaintext: str,
    devices: list[e2ee.DeviceKey],
    *,
    to: str | None = None,
    channel_id: str | None = None,
) -> dict[str, Any]:
    cmid = str(hashlib.sha256(f"cmid {name}".encode()).hexdigest()[:32])
    cmid = f"{cmid[:8]}-{cmid[8:12]}-{cmid[12:16]}-{cmid[16:20]}-{cmid[20:]}"
    message_key = _secret(f"{name} message key", 32)
    iv = _secret(f"{name} iv", 12)
    key_ids = sorted(d.key_id for d in devices)
    wraps_in = {
        k: (_secret(f"{name} ephemeral {k}", 32), _secret(f"{name} nonce {k}", 12)) for k in key_ids
    }
    # The documented draw order: message key, iv, then (ephemeral, nonce) per key id ascending.
    draws = [message_key, iv] + [b for k in key_ids for b in wraps_in[k]]

    def rng(n: int) -> bytes:
        out = draws.pop(0)
        assert len(out) == n
        return out

    envelope = e2ee.encrypt_message(
        plaintext,
        sender=sender,
        to=to,
        channel_id=channel_id,
        devices=[d.recipient() for d in devices],
        client_message_id=cmid,
        rng=rng,
    )
    assert not draws
    ad = e2ee.associated_data(sender, to=to, channel_id=channel_id, client_message_id=cmid)
    by_id = {d.key_id: d for d in devices}
    wraps = []
    for k in key_ids:
        eph_raw, nonce = wraps_in[k]
        eph = X25519PrivateKey.from_private_bytes(eph_raw)
        rcpt_pub = by_id[k].public_key.public_bytes_raw()
        shared = eph.exchange(by_id[k].public_key)
        info = e2ee.HKDF_INFO_LABEL + e2ee._lp(k) + eph.public_key().public_bytes_raw() + rcpt_pub
        kek = HKDF(hashes.SHA256(), 32, e2ee.HKDF_SALT, info).derive(shared)
        wraps.append(
            {
                "keyId": k,
                "ephemeralPrivateKey": eph_raw.hex(),
                "ephemeralPublicKey": eph.public_key().public_bytes_raw().hex(),
                "nonce": nonce.hex(),
                "sharedSecret": shared.hex(),
                "hkdfInfo": info.hex(),
                "kek": kek.hex(),
                "wrappedKey": envelope["keys"][k],
            }
        )
    return {
        "name": name,
        "sender": sender,
        **({"to": to} if to is not None else {"channelId": channel_id}),
        "clientMessageId": cmid,
        "plaintext": plaintext,
        "plaintextHex": plaintext.encode("utf-8").hex(),
        "messageKey": message_key.hex(),
        "iv": iv.hex(),
        "associatedData": ad.hex(),
        "devices": [
            {
                "userId": d.user_id,
                "deviceId": d.device_id,
                "keyId": d.key_id,
                "privateKey": d.private_bytes().hex(),
                "publicKey": d.public_key.public_bytes_raw().hex(),
                "publicKeyPem": d.public_pem(),
            }
            for d in sorted(devices, key=lambda d: d.key_id)
        ],
        "wraps": wraps,
        "envelope": envelope,
    }


def build() -> dict[str, Any]:
    """The whole vector document (deterministic)."""
    alice_laptop = _device("alice@example.com", "laptop")
    alice_phone = _device("alice@example.com", "phone")
    bob_laptop = _device("bob@example.com", "laptop")
    bob_phone = _device("bob@example.com", "phone")
    carol_web = _device("carol@example.com", "web-browser")
    return {
        "description": (
            "securecollab-e2ee-v1 test vectors; see securecollab/client/ENVELOPE.md. "
            "Byte values are hex except the envelope (JSON as sent, standard base64 with "
            "padding). Test keys only."
        ),
        "format": "securecollab-e2ee-v1",
        "generator": "scripts/make_e2ee_vectors.py",
        "vectors": [
            _vector(
                "direct, two recipient devices and the sender's devices",
                "alice@example.com",
                "Hi Bob, the deploy is at 15:00.",
                [alice_laptop, alice_phone, bob_laptop, bob_phone],
                to="bob@example.com",
            ),
            _vector(
                "channel, three members, non-ASCII text",
                "bob@example.com",
                "Grüße aus Zürich — 東京 🚀",
                [alice_laptop, alice_phone, bob_laptop, bob_phone, carol_web],
                channel_id="0190f5a2-7c3e-7d41-9a6b-2f1e4c8d9b00",
            ),
            _vector(
                "direct, empty message, one device",
                "carol@example.com",
                "",
                [alice_laptop],
                to="alice@example.com",
            ),
        ],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date; run {sys.argv[0]}", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
