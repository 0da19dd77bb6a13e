"""The device key file: 0600, atomic, passphrase protection, clear errors."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from securecollab.client.e2ee import DeviceKey, decrypt_text, encrypt_message
from securecollab.client.keystore import (
    KeystoreError,
    PassphraseRequired,
    WrongPassphrase,
    is_encrypted,
    load_device_key,
    save_device_key,
)

ALICE = "alice@example.com"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_plain_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    key = DeviceKey.generate(ALICE, "laptop")
    path = tmp_path / "nested" / "device.json"
    old = os.umask(0)  # even with a permissive umask the file must not be readable by others
    try:
        save_device_key(path, key)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert not is_encrypted(path)
    loaded = load_device_key(path)
    assert (loaded.user_id, loaded.device_id) == (ALICE, "laptop")
    assert loaded.private_bytes() == key.private_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["device.json"]  # no temp file left


def test_loaded_key_decrypts_what_was_sent_to_it(tmp_path: Path) -> None:
    key = DeviceKey.generate(ALICE, "laptop")
    save_device_key(tmp_path / "k.json", key, passphrase="correct horse battery")
    env = encrypt_message(
        "for the laptop", sender="bob@example.com", to=ALICE, devices=[key.recipient()]
    )
    loaded = load_device_key(tmp_path / "k.json", passphrase="correct horse battery")
    assert decrypt_text(env, loaded, sender="bob@example.com") == "for the laptop"


def test_passphrase_file_hides_the_private_key(tmp_path: Path) -> None:
    key = DeviceKey.generate(ALICE, "phone")
    path = tmp_path / "k.json"
    save_device_key(path, key, passphrase="s3cret passphrase")
    assert mode(path) == 0o600
    assert is_encrypted(path)
    doc = json.loads(path.read_text())
    assert "privateKey" not in doc and doc["encryption"]["kdf"] == "argon2id"

    assert base64.b64encode(key.private_bytes()).decode() not in path.read_text()
    assert key.private_bytes() not in path.read_bytes()


def test_wrong_or_missing_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    save_device_key(path, DeviceKey.generate(ALICE, "phone"), passphrase="right one")
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        load_device_key(path, passphrase="wrong one")
    with pytest.raises(PassphraseRequired, match="passphrase is needed"):
        load_device_key(path)


def test_altered_encrypted_file_is_detected(tmp_path: Path) -> None:
    """Swapping the device id (or any header field) breaks the AES-GCM associated data."""
    path = tmp_path / "k.json"
    save_device_key(path, DeviceKey.generate(ALICE, "phone"), passphrase="pass phrase")
    doc = json.loads(path.read_text())
    doc["deviceId"] = "laptop"
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphrase):
        load_device_key(path, passphrase="pass phrase")


def test_tampered_kdf_cost_is_refused_before_running(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    save_device_key(path, DeviceKey.generate(ALICE, "phone"), passphrase="pass phrase")
    doc = json.loads(path.read_text())
    doc["encryption"]["memoryCostKiB"] = 1 << 30
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="out of range"):
        load_device_key(path, passphrase="pass phrase")


def test_existing_key_is_never_silently_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    first = DeviceKey.generate(ALICE, "laptop")
    save_device_key(path, first)
    with pytest.raises(KeystoreError, match="already exists"):
        save_device_key(path, DeviceKey.generate(ALICE, "laptop"))
    assert load_device_key(path).private_bytes() == first.private_bytes()
    second = DeviceKey.generate(ALICE, "laptop")
    save_device_key(path, second, overwrite=True)
    assert load_device_key(path).private_bytes() == second.private_bytes()
    assert mode(path) == 0o600


def test_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    save_device_key(path, DeviceKey.generate(ALICE, "laptop"))
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_device_key(path)


def test_corrupt_or_foreign_files(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(KeystoreError, match="no device key file"):
        load_device_key(missing)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    junk.chmod(0o600)
    with pytest.raises(KeystoreError, match="cannot read"):
        load_device_key(junk)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    other.chmod(0o600)
    with pytest.raises(KeystoreError, match="not a securecollab device key"):
        load_device_key(other)
    mismatch = tmp_path / "mismatch.json"
    save_device_key(mismatch, DeviceKey.generate(ALICE, "laptop"))
    doc = json.loads(mismatch.read_text())
    doc["privateKey"] = base64.b64encode(DeviceKey.generate(ALICE, "x").private_bytes()).decode()
    mismatch.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="does not match publicKey"):
        load_device_key(mismatch)


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        save_device_key(tmp_path / "k.json", DeviceKey.generate(ALICE, "laptop"), passphrase="")
    assert not (tmp_path / "k.json").exists()
