"""The device key file: one device's X25519 identity on disk, 0600, optionally passphrase-encrypted.

File format (JSON, UTF-8), version 1:

    {"format": "securecollab-device-key", "version": 1,
     "userId": ..., "deviceId": ..., "publicKey": base64(32 raw bytes), "createdAt": ms,
     "privateKey": base64(32 raw bytes)}                       # unencrypted file, or
     "encryption": {"kdf": "argon2id", "timeCost": 3, "memoryCostKiB": 65536,
                    "parallelism": 4, "salt": base64(16), "cipher": "AES-256-GCM",
                    "nonce": base64(12)},
     "encryptedPrivateKey": base64(32 + 16-byte tag)}         # encrypted file

With a passphrase, the private key is AES-256-GCM encrypted under
argon2id(passphrase (UTF-8), salt, t=3, m=64 MiB, p=4) -> 32 bytes (RFC 9106's second
recommended setting); the associated data is the canonical JSON (sorted keys, no
spaces) of every other field, so the owner, device id, public key and KDF parameters
cannot be swapped without detection. On load the private key must match `publicKey`.

Files are written atomically (temporary file created O_EXCL with mode 0600 in the same
directory, fsync, rename) and a file readable by group or others is refused, like ssh
does. All functions block (file I/O, ~0.1-0.3 s of argon2id): call them from a worker
thread (`trio.to_thread.run_sync`) in async code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securecollab.client.e2ee import DeviceKey, b64encode

FORMAT = "securecollab-device-key"
FILE_VERSION = 1

# Caps on what a key file may ask of us: a tampered file must not make load() eat the
# machine's memory or run for minutes.
_MAX_MEMORY_KIB = 1 << 20  # 1 GiB
_MAX_TIME_COST = 20
_MAX_PARALLELISM = 16


class KeystoreError(Exception):
    """A key file could not be read or written; str() says which file and why."""


class PassphraseRequired(KeystoreError):
    """The key file is encrypted and no passphrase was given."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not decrypt the key file (or the file was altered)."""


@dataclass(frozen=True)
class KdfParams:
    """argon2id cost parameters; the defaults are RFC 9106's second recommended option."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 4


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    if not data:
        raise ValueError("passphrase must not be empty")
    return data


def _derive(passphrase: bytes, salt: bytes, p: KdfParams) -> bytes:
    return hash_secret_raw(
        passphrase,
        salt,
        time_cost=p.time_cost,
        memory_cost=p.memory_cost_kib,
        parallelism=p.parallelism,
        hash_len=32,
        type=Type.ID,
    )


def _b64(doc: dict[str, Any], name: str, path: Path, length: int | None = None) -> bytes:
    value = doc.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise KeystoreError(f"{path}: field {name!r} is missing or not base64") from None
    if length is not None and len(data) != length:
        raise KeystoreError(f"{path}: field {name!r} must be {length} bytes, not {len(data)}")
    return data


def _write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise KeystoreError(f"{path} already exists; refusing to overwrite a device key")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_device_key(
    path: str | os.PathLike[str],
    key: DeviceKey,
    *,
    passphrase: str | bytes | None = None,
    overwrite: bool = False,
    kdf: KdfParams | None = None,
) -> None:
    """Write `key` to `path` (mode 0600, atomic); encrypt it when `passphrase` is given.

    Refuses to replace an existing file unless `overwrite`: losing a device key loses
    every message encrypted for it. Blocks (argon2id takes ~0.1-0.3 s).
    """
    path = Path(path)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": FILE_VERSION,
        "userId": key.user_id,
        "deviceId": key.device_id,
        "publicKey": b64encode(key.public_key.public_bytes_raw()),
        "createdAt": time.time_ns() // 1_000_000,
    }
    if passphrase is None:
        doc["privateKey"] = b64encode(key.private_bytes())
    else:
        params = kdf or KdfParams()
        salt, nonce = os.urandom(16), os.urandom(12)
        doc["encryption"] = {
            "kdf": "argon2id",
            "timeCost": params.time_cost,
            "memoryCostKiB": params.memory_cost_kib,
            "parallelism": params.parallelism,
            "salt": b64encode(salt),
            "cipher": "AES-256-GCM",
            "nonce": b64encode(nonce),
        }
        kek = _derive(_passphrase_bytes(passphrase), salt, params)
        doc["encryptedPrivateKey"] = b64encode(
            AESGCM(kek).encrypt(nonce, key.private_bytes(), _canonical(doc))
        )
    _write_atomic(path, json.dumps(doc, indent=2).encode("utf-8") + b"\n", overwrite=overwrite)


def _read(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeystoreError(f"no device key file at {path}") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeystoreError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeystoreError(f"{path}: cannot read key file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeystoreError(f"{path} is not a securecollab device key file")
    if doc.get("version") != FILE_VERSION:
        raise KeystoreError(f"{path}: unsupported key file version {doc.get('version')!r}")
    return doc


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether the key file at `path` needs a passphrase."""
    return "encryption" in _read(Path(path))


def _kdf_params(enc: dict[str, Any], path: Path) -> KdfParams:
    if enc.get("kdf") != "argon2id" or enc.get("cipher") != "AES-256-GCM":
        raise KeystoreError(
            f"{path}: unsupported encryption {enc.get('kdf')!r}/{enc.get('cipher')!r}"
        )
    t, m, p = enc.get("timeCost"), enc.get("memoryCostKiB"), enc.get("parallelism")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (t, m, p)):
        raise KeystoreError(f"{path}: argon2id parameters must be integers")
    assert isinstance(t, int) and isinstance(m, int) and isinstance(p, int)
    if not (
        1 <= t <= _MAX_TIME_COST and 1 <= p <= _MAX_PARALLELISM and 8 * p <= m <= _MAX_MEMORY_KIB
    ):
        raise KeystoreError(f"{path}: argon2id parameters out of range (t={t}, m={m} KiB, p={p})")
    return KdfParams(t, m, p)


def load_device_key(
    path: str | os.PathLike[str], *, passphrase: str | bytes | None = None
) -> DeviceKey:
    """Read a device key; raises PassphraseRequired / WrongPassphrase / KeystoreError.

    A passphrase given for an unencrypted file is ignored. Blocks (see module docstring).
    """
    path = Path(path)
    doc = _read(path)
    user_id, device_id = doc.get("userId"), doc.get("deviceId")
    if not isinstance(user_id, str) or not isinstance(device_id, str):
        raise KeystoreError(f"{path}: userId and deviceId must be strings")
    public = _b64(doc, "publicKey", path, 32)
    enc = doc.get("encryption")
    if enc is None:
        private = _b64(doc, "privateKey", path, 32)
    else:
        if not isinstance(enc, dict):
            raise KeystoreError(f"{path}: field 'encryption' must be an object")
        if passphrase is None:
            raise PassphraseRequired(f"{path} is encrypted: a passphrase is needed")
        params = _kdf_params(enc, path)
        salt, nonce = _b64(enc, "salt", path), _b64(enc, "nonce", path, 12)
        sealed = _b64(doc, "encryptedPrivateKey", path, 48)
        header = {k: v for k, v in doc.items() if k != "encryptedPrivateKey"}
        kek = _derive(_passphrase_bytes(passphrase), salt, params)
        try:
            private = AESGCM(kek).decrypt(nonce, sealed, _canonical(header))
        except InvalidTag:
            raise WrongPassphrase(
                f"wrong passphrase for {path} (or the file was altered)"
            ) from None
    try:
        key = DeviceKey(user_id, device_id, X25519PrivateKey.from_private_bytes(private))
    except ValueError as exc:
        raise KeystoreError(f"{path}: {exc}") from None
    if key.public_key.public_bytes_raw() != public:
        raise KeystoreError(f"{path}: private key does not match publicKey (file corrupted?)")
    return key
