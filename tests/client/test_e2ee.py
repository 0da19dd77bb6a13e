"""The securecollab-e2ee-v1 envelope: who can read a message, and that any alteration is caught."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securecollab.client.e2ee import (
    WRAPPED_KEY_LEN,
    DecryptionError,
    DeviceKey,
    RecipientDevice,
    decrypt_message,
    decrypt_text,
    device_key_id,
    encrypt_message,
    public_key_from_pem,
)

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"

alice_laptop = DeviceKey.generate(ALICE, "laptop")
alice_phone = DeviceKey.generate(ALICE, "phone")
bob_laptop = DeviceKey.generate(BOB, "laptop")
bob_phone = DeviceKey.generate(BOB, "phone")
carol_laptop = DeviceKey.generate(CAROL, "laptop")


def received(envelope: dict[str, Any], sender: str) -> dict[str, Any]:
    """The envelope as the server delivers it: JSON round trip, `from` added, other side null."""
    out: dict[str, Any] = json.loads(json.dumps(envelope))
    out["from"] = sender
    out.setdefault("to", None)
    out.setdefault("channelId", None)
    out["id"] = "0190f5a2-0000-7000-8000-000000000001"
    out["createdAt"] = 1_700_000_000_000
    return out


def direct_from_alice(text: str = "the launch code is 0000") -> dict[str, Any]:
    env = encrypt_message(
        text,
        sender=ALICE,
        to=BOB,
        devices=[d.recipient() for d in (alice_laptop, alice_phone, bob_laptop, bob_phone)],
    )
    return received(env, ALICE)


def flip_b64(value: str, index: int = 0) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_direct_message_reaches_every_recipient_and_sender_device() -> None:
    env = direct_from_alice("hello Bob 👋")
    for device in (bob_laptop, bob_phone, alice_phone, alice_laptop):
        assert decrypt_text(env, device) == "hello Bob 👋"
    assert set(env["keys"]) == {
        "alice@example.com/laptop",
        "alice@example.com/phone",
        "bob@example.com/laptop",
        "bob@example.com/phone",
    }


def test_envelope_has_the_server_shape_and_no_plaintext() -> None:
    env = encrypt_message(
        "top secret words", sender=ALICE, to=BOB, devices=[bob_laptop.recipient()]
    )
    assert set(env) == {"to", "encryptedContent", "iv", "keys", "clientMessageId"}
    assert len(base64.b64decode(env["iv"], validate=True)) == 12
    assert len(base64.b64decode(env["keys"][bob_laptop.key_id], validate=True)) == WRAPPED_KEY_LEN
    assert b"secret" not in json.dumps(env).encode()


def test_same_device_name_for_two_users_gets_two_keys() -> None:
    env = received(
        encrypt_message(
            "x", sender=ALICE, to=BOB, devices=[alice_laptop.recipient(), bob_laptop.recipient()]
        ),
        ALICE,
    )
    assert len(env["keys"]) == 2
    assert decrypt_text(env, bob_laptop) == "x"
    assert decrypt_text(env, alice_laptop) == "x"


def test_channel_message_readable_by_every_member_device() -> None:
    members = [alice_laptop, alice_phone, bob_laptop, bob_phone, carol_laptop]
    env = encrypt_message(
        b"\x00binary\xff payload",
        sender=BOB,
        channel_id="0190f5a2-7c3e-7d41-9a6b-2f1e4c8d9b00",
        devices=[d.recipient() for d in members],
    )
    assert "to" not in env and env["channelId"] == "0190f5a2-7c3e-7d41-9a6b-2f1e4c8d9b00"
    got = received(env, BOB)
    for device in members:
        assert decrypt_message(got, device) == b"\x00binary\xff payload"


def test_sender_can_decrypt_own_envelope_before_sending() -> None:
    env = encrypt_message("draft", sender=ALICE, to=BOB, devices=[alice_laptop.recipient()])
    assert decrypt_text(env, alice_laptop, sender=ALICE) == "draft"


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("encryptedContent", "content-auth-failed"),
        ("iv", "content-auth-failed"),
        ("wrapped", "key-unwrap-failed"),
        ("from", "key-unwrap-failed"),
        ("to", "key-unwrap-failed"),
        ("clientMessageId", "key-unwrap-failed"),
    ],
)
def test_any_tampering_fails_authentication(field: str, reason: str) -> None:
    env = direct_from_alice()
    if field in ("encryptedContent", "iv"):
        env[field] = flip_b64(env[field])
    elif field == "wrapped":
        key_id = bob_laptop.key_id
        env["keys"][key_id] = flip_b64(env["keys"][key_id], 60)  # inside the ciphertext
    elif field == "from":
        env["from"] = CAROL  # the server lies about the sender
    elif field == "to":
        env["to"] = CAROL
    else:
        env["clientMessageId"] = "another-id"
    with pytest.raises(DecryptionError) as info:
        decrypt_message(env, bob_laptop)
    assert info.value.reason == reason


@pytest.mark.parametrize("offset", [1, 33, 45, 92])  # ephemeral key, nonce, ciphertext, tag
def test_every_part_of_a_wrapped_key_is_authenticated(offset: int) -> None:
    env = direct_from_alice()
    env["keys"][bob_phone.key_id] = flip_b64(env["keys"][bob_phone.key_id], offset)
    with pytest.raises(DecryptionError, match="failed authentication") as info:
        decrypt_message(env, bob_phone)
    assert info.value.reason == "key-unwrap-failed"
    assert decrypt_text(env, bob_laptop)  # other devices unaffected


def test_tag_tampering_of_the_body_fails() -> None:
    env = direct_from_alice()
    body = base64.b64decode(env["encryptedContent"])
    env["encryptedContent"] = base64.b64encode(body[:-1] + bytes([body[-1] ^ 0x80])).decode()
    with pytest.raises(DecryptionError, match="content failed authentication"):
        decrypt_message(env, bob_laptop)


def test_wrapped_key_moved_to_another_device_fails() -> None:
    env = direct_from_alice()
    env["keys"][bob_phone.key_id] = env["keys"][bob_laptop.key_id]
    with pytest.raises(DecryptionError) as info:
        decrypt_message(env, bob_phone)
    assert info.value.reason == "key-unwrap-failed"


def test_missing_key_for_this_device() -> None:
    env = direct_from_alice()
    with pytest.raises(DecryptionError, match="not encrypted for device carol") as info:
        decrypt_message(env, carol_laptop)
    assert info.value.reason == "no-key-for-device"


def test_wrong_private_key_for_the_device_id() -> None:
    """A device that regenerated its key under the same id cannot read old messages."""
    env = direct_from_alice()
    replaced = DeviceKey.generate(BOB, "laptop")
    with pytest.raises(DecryptionError) as info:
        decrypt_message(env, replaced)
    assert info.value.reason == "key-unwrap-failed"


def test_device_added_later_cannot_read_earlier_messages() -> None:
    earlier = direct_from_alice("sent before the tablet existed")
    bob_tablet = DeviceKey.generate(BOB, "tablet")
    later = received(
        encrypt_message(
            "sent after",
            sender=ALICE,
            to=BOB,
            devices=[d.recipient() for d in (alice_laptop, bob_laptop, bob_tablet)],
        ),
        ALICE,
    )
    assert decrypt_text(later, bob_tablet) == "sent after"
    with pytest.raises(DecryptionError) as info:
        decrypt_message(earlier, bob_tablet)
    assert info.value.reason == "no-key-for-device"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(iv="not base64!"),
        lambda e: e.update(iv=base64.b64encode(b"x" * 16).decode()),
        lambda e: e.update(encryptedContent="AAAA"),
        lambda e: e.update(clientMessageId=None),
        lambda e: e.update(channelId="c1"),  # both to and channelId
        lambda e: e.update(**{"from": None}),
        lambda e: e["keys"].update({"bob@example.com/laptop": "AAAA"}),
    ],
)
def test_malformed_envelopes_are_rejected_clearly(mutate: Any) -> None:
    env = direct_from_alice()
    mutate(env)
    with pytest.raises(DecryptionError) as info:
        decrypt_message(env, bob_laptop)
    assert info.value.reason == "malformed"


def test_non_utf8_plaintext_is_not_shown_as_text() -> None:
    env = received(
        encrypt_message(b"\xff\xfe", sender=ALICE, to=BOB, devices=[bob_laptop.recipient()]),
        ALICE,
    )
    assert decrypt_message(env, bob_laptop) == b"\xff\xfe"
    with pytest.raises(DecryptionError) as info:
        decrypt_text(env, bob_laptop)
    assert info.value.reason == "not-utf8"


def test_encrypt_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        encrypt_message("x", sender=ALICE, devices=[bob_laptop.recipient()])
    with pytest.raises(ValueError, match="no devices"):
        encrypt_message("x", sender=ALICE, to=BOB, devices=[])
    with pytest.raises(ValueError, match="twice"):
        encrypt_message("x", sender=ALICE, to=BOB, devices=[bob_laptop.recipient()] * 2)
    with pytest.raises(ValueError, match="invalid device id"):
        device_key_id(BOB, "lap/top")


def test_public_key_pem_round_trip_and_non_x25519_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = bob_laptop.public_pem()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    device = RecipientDevice.from_pem(BOB, "laptop", pem)
    assert device.public_key.public_bytes_raw() == bob_laptop.public_key.public_bytes_raw()
    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not X25519"):
        public_key_from_pem(p256)


def test_retry_with_same_client_message_id_is_still_fresh_encryption() -> None:
    a = encrypt_message(
        "x", sender=ALICE, to=BOB, devices=[bob_laptop.recipient()], client_message_id="c1"
    )
    b = encrypt_message(
        "x", sender=ALICE, to=BOB, devices=[bob_laptop.recipient()], client_message_id="c1"
    )
    assert a["clientMessageId"] == b["clientMessageId"] == "c1"
    assert a["iv"] != b["iv"] and a["encryptedContent"] != b["encryptedContent"]


@settings(max_examples=25, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    channel=st.booleans(),
    cmid=st.text(min_size=1, max_size=40),
)
def test_round_trip_any_plaintext(plaintext: bytes, channel: bool, cmid: str) -> None:
    target = {"channel_id": "chan-1"} if channel else {"to": BOB}
    env = encrypt_message(
        plaintext,
        sender=ALICE,
        devices=[bob_phone.recipient(), alice_phone.recipient()],
        client_message_id=cmid,
        **target,
    )
    got = received(env, ALICE)
    assert decrypt_message(got, bob_phone) == plaintext
    assert decrypt_message(got, alice_phone) == plaintext
