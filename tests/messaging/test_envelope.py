"""Envelope validation: what a client may send, and the reason it is told when it may not."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securecollab.client import e2ee
from securecollab.services.envelope import MAX_KEYS, _checked, parse_envelope
from securecollab.services.errors import InvalidInput

MAX = 65536


def b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def good(**over: object) -> dict[str, object]:
    env: dict[str, object] = {"to": "bob@example.com", "encryptedContent": b64(40), "iv": b64(12)}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def reason(obj: object, max_bytes: int = MAX) -> str:
    with pytest.raises(InvalidInput) as exc:
        parse_envelope(obj, max_content_bytes=max_bytes)
    return str(exc.value)


def test_an_sdk_envelope_is_accepted_unchanged() -> None:
    alice = e2ee.DeviceKey.generate("alice@example.com", "laptop")
    bob = e2ee.DeviceKey.generate("bob@example.com", "phone")
    env = e2ee.encrypt_message(
        "hello",
        sender="alice@example.com",
        devices=[alice.recipient(), bob.recipient()],
        to="bob@example.com",
    )
    parsed = parse_envelope(env, max_content_bytes=MAX)
    assert parsed.to == "bob@example.com"
    assert parsed.encrypted_content == env["encryptedContent"]
    assert parsed.keys == env["keys"]
    assert parsed.client_message_id == env["clientMessageId"]


@pytest.mark.parametrize("field", ["content", "plaintext", "text"])
def test_plaintext_fields_are_refused(field: str) -> None:
    assert reason(good(**{field: "hi bob"})).startswith("plaintext is not accepted")


def test_both_or_neither_destination_is_refused() -> None:
    assert "exactly one of to or channelId" in reason(good(channelId="c1"))
    assert "exactly one of to or channelId" in reason(good(to=None))


def test_bad_base64_and_sizes() -> None:
    assert "encryptedContent is not valid base64" in reason(good(encryptedContent="%%%not base64"))
    assert "encryptedContent is larger than 100 bytes" in reason(
        good(encryptedContent=b64(101)), 100
    )
    parse_envelope(
        good(encryptedContent=b64(100)), max_content_bytes=100
    )  # the limit itself is fine
    assert "encryptedContent is empty" in reason(good(encryptedContent=""))
    assert "iv must be 12 or 16 bytes" in reason(good(iv=b64(8)))
    assert "iv is larger" in reason(good(iv=b64(64)))
    parse_envelope(good(iv=b64(16)), max_content_bytes=MAX)
    assert "iv must be a base64 string" in reason(good(iv=12))
    assert "encryptedContent is required" in reason({"to": "b@x", "iv": b64(12)})


def test_only_canonical_standard_base64_is_accepted() -> None:
    # what `base64.b64decode(validate=True)` refused is still refused
    for bad in ("QUJD\nREVG", "QUJD REVG", "QUJD-_VG", "QUJDé", "QUI", "QUI==", "QQ===", "=QUJD",
                "QQ==QUJD", "QU=JD"):  # fmt: skip
        assert "encryptedContent is not valid base64" in reason(good(encryptedContent=bad)), bad
    for ok in ("QQ==", "QUI=", "QUJD", "QUJDREVG"):
        env = parse_envelope(good(encryptedContent=ok), max_content_bytes=MAX)
        assert env.encrypted_content == ok  # kept exactly as sent
    assert "encryptedContent is larger than 2 bytes" in reason(good(encryptedContent="QUJD"), 2)


def test_keys_shape_count_and_size() -> None:
    assert "keys must be an object" in reason(good(keys=["a"]))
    assert "keys[d1] is not valid base64" in reason(good(keys={"d1": "***"}))
    assert "keys[d1] is larger than 1024 bytes" in reason(good(keys={"d1": b64(2000)}))
    too_many = {f"u/d{i}": b64(93) for i in range(MAX_KEYS + 1)}
    assert f"more than {MAX_KEYS}" in reason(good(keys=too_many))
    assert "key id must be" in reason(good(keys={"x" * 500: b64(93)}))


def test_unknown_fields_and_non_objects_are_refused() -> None:
    assert "unknown field(s): attachment" in reason(good(attachment="x"))
    assert "must be a JSON object" in reason(["to", "bob"])
    assert "clientMessageId must be a non-empty string" in reason(good(clientMessageId=7))
    assert "clientMessageId is longer" in reason(good(clientMessageId="x" * 200))


def _b64_of(n: int) -> str:
    return base64.b64encode(bytes(range(n % 256)) * (n // 256) + bytes(n % 256)).decode()


FIELD_VALUES = {
    "to": ["bob@example.com", "", "  ", 7, None, "x" * 320, "x" * 321],
    "channelId": [None, None, "c1", "", " ", "c" * 64, "c" * 65, ["c1"]],
    "encryptedContent": [_b64_of(40), _b64_of(1), "", "QUJD", "QUJ", "QUJD\n", "QU=D", 5, None,
                         "é", _b64_of(100), _b64_of(101)],
    "iv": [_b64_of(12), _b64_of(16), _b64_of(11), _b64_of(13), _b64_of(17), "", 12, None],
    "keys": [None, {}, {"bob/phone": _b64_of(93)}, {"": _b64_of(9)}, {"k" * 451: _b64_of(9)},
             {"bob/phone": ""}, {"bob/phone": "%%"}, {"bob/phone": _b64_of(1024)},
             {"bob/phone": _b64_of(1025)}, {"a": 1}, ["bob/phone"],
             {f"d{i}": "QQ==" for i in range(257)}],
    "clientMessageId": [None, "m-1", "", " ", "m" * 128, "m" * 129, 3],
    "text": [None, None, None, None, "hi"],
    "extra": [None, None, None, None, 1],
}  # fmt: skip


# each field keeps its first (acceptable) value 3 times in 4, so many envelopes pass
ENVELOPES = st.fixed_dictionaries(
    {f: st.sampled_from(v[:1] * 3 * len(v) + v) for f, v in FIELD_VALUES.items()}
)


@settings(max_examples=1500, deadline=None)
@given(ENVELOPES)
def test_the_fast_check_decides_as_the_field_by_field_one(fields: dict[str, object]) -> None:
    obj = {k: v for k, v in fields.items() if v is not None or k == "channelId"}
    if fields["channelId"] is None and fields["to"] is not None:
        del obj["channelId"]  # absent, the common case (present as null is tried too)
    for max_bytes in (MAX, 100):
        try:
            fast: object = parse_envelope(obj, max_content_bytes=max_bytes)
        except InvalidInput as exc:
            fast = ("refused", str(exc), exc.code)
        try:
            slow: object = _checked(obj, max_bytes)
        except InvalidInput as exc:
            slow = ("refused", str(exc), exc.code)
        assert fast == slow
