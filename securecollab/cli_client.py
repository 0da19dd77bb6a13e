"""Chat from the terminal: `securecollab login|logout|send|history|listen|channel ...`.

State lives in `$XDG_CONFIG_HOME/securecollab` (else `~/.config/securecollab`), directory
0700, files 0600:

- `session.json`: server URL, user id, device id and the current tokens (rewritten
  at every token refresh, because refresh tokens rotate);
- `keys/<userId>/<deviceId>.key`: the device's X25519 key (see client/keystore.py),
  encrypted with `$SECURECOLLAB_KEY_PASSPHRASE` when that is set at `login`.

The password is read from the terminal without echo, or as one line from stdin when
stdin is not a terminal (`echo "$PW" | securecollab login URL USER`).

Exit codes: 0 ok (also `listen` ended by Ctrl-C), 1 the request failed (refused,
unknown user, no device key, undecryptable history...), 2 bad usage, 3 the server
could not be reached, 4 not logged in, bad password or session expired. Errors are
one line on stderr, never a traceback (set SECURECOLLAB_DEBUG=1 to get one).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import secrets
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from securecollab.client.api import (
    Client,
    DeviceKeyMismatch,
    Item,
    NoDeviceKey,
    ReceivedMessage,
    UnknownUser,
)
from securecollab.client.e2ee import check_device_id
from securecollab.client.keystore import KeystoreError, PassphraseRequired, WrongPassphrase
from securecollab.client.rest import (
    ApiError,
    AuthError,
    ClientError,
    NotFoundError,
    ServerUnavailable,
    Session,
)
from securecollab.client.stomp_ws import StompAuthError, StompError, single_exception

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4
PASSPHRASE_ENV = "SECURECOLLAB_KEY_PASSPHRASE"


class CliError(Exception):
    """A failure with a message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- state


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/securecollab`, else `~/.config/securecollab`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "securecollab"


def _write_private(path: Path, data: bytes) -> None:
    """Write a 0600 file atomically (directory created 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Profile:
    """What `login` saved: where the server is and who we are there."""

    url: str
    session: Session

    @property
    def key_path(self) -> Path:
        return key_path(self.session.user_id, self.session.device_id or "")

    def save(self) -> None:
        doc = {"url": self.url, "session": self.session.to_json()}
        _write_private(config_dir() / "session.json", json.dumps(doc, indent=2).encode() + b"\n")


def key_path(user_id: str, device_id: str) -> Path:
    # user ids are e-mail-like; keep the file name portable anyway
    safe = "".join(c if c.isalnum() or c in "@._+-" else "_" for c in user_id)
    return config_dir() / "keys" / safe / f"{device_id}.key"


def load_profile() -> Profile:
    path = config_dir() / "session.json"
    try:
        doc = json.loads(path.read_text("utf-8"))
        return Profile(str(doc["url"]), Session.from_json(doc["session"]))
    except FileNotFoundError:
        raise CliError(
            "not logged in: run `securecollab login URL USERID` first", EXIT_AUTH
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{path} is unreadable ({exc}); log in again", EXIT_AUTH) from None


def _passphrase() -> str | None:
    return os.environ.get(PASSPHRASE_ENV) or None


def _read_password(prompt: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.readline() if sys.stdin is not None else ""
    return line.rstrip("\r\n")


# ----------------------------------------------------------------------------- running


def _explain(exc: BaseException, url: str | None) -> CliError | None:
    """A user-facing message for every failure we know; None for real bugs."""
    where = f" at {url}" if url else ""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, StompAuthError):
        return CliError(f"the server refused the session ({exc}); log in again", EXIT_AUTH)
    if isinstance(exc, ServerUnavailable):
        return CliError(f"cannot reach the server{where}: {exc}", EXIT_UNREACHABLE)
    if isinstance(exc, AuthError):
        if exc.error == "not_logged_in" or "log in again" in exc.detail:
            return CliError("session expired or revoked: run `securecollab login` again", EXIT_AUTH)
        return CliError(f"not authorized: {exc.detail}", EXIT_AUTH)
    if isinstance(exc, (UnknownUser, NoDeviceKey, DeviceKeyMismatch)):
        return CliError(str(exc))
    if isinstance(exc, NotFoundError):
        return CliError(f"not found: {exc.detail}")
    if isinstance(exc, ApiError):
        return CliError(f"the server refused the request: {exc.detail} ({exc.status} {exc.error})")
    if isinstance(exc, StompError):
        return CliError(f"the server refused the request: {exc}")
    if isinstance(exc, (PassphraseRequired, WrongPassphrase)):
        return CliError(f"{exc} (set {PASSPHRASE_ENV})", EXIT_AUTH)
    if isinstance(exc, KeystoreError):
        return CliError(f"device key: {exc}")
    if isinstance(exc, ClientError):
        return CliError(str(exc))
    if isinstance(exc, OSError):
        return CliError(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))
    if isinstance(exc, ValueError):
        return CliError(str(exc), EXIT_USAGE)
    return None


def _run(fn: Callable[..., Awaitable[int]], *args: Any, url: str | None = None) -> int:
    """trio.run `fn`, turning every known failure into one line on stderr + exit code."""
    try:
        return trio.run(fn, *args)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:
        leaf = single_exception(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_OK
        err = _explain(leaf, url)
        if err is None:
            if os.environ.get("SECURECOLLAB_DEBUG"):
                traceback.print_exc()
            print(f"securecollab: internal error: {type(leaf).__name__}: {leaf}", file=sys.stderr)
            return EXIT_FAILED
        print(f"securecollab: {err}", file=sys.stderr)
        return err.code


def _open(profile: Profile, *, realtime: bool = False, **options: Any) -> Any:
    def persist(session: Session | None) -> None:
        if session is not None:
            profile.session = session
            profile.save()

    return Client.resume(
        profile.url,
        profile.session,
        profile.key_path,
        _passphrase(),
        realtime=realtime,
        on_session=persist,
        **options,
    )


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _print_item(item: Item) -> bool:
    """Print a message line; undecryptable ones go to stderr. True if it was readable."""
    where = f"#{item.channel_id} " if item.channel_id else ""
    if isinstance(item, ReceivedMessage):
        print(f"[{_when(item.created_at)}] {where}{item.sender}: {item.text}", flush=True)
        return True
    print(
        f"securecollab: [{_when(item.created_at)}] {where}message {item.id} from {item.sender} "
        f"cannot be decrypted on this device: {item.error}",
        file=sys.stderr,
        flush=True,
    )
    return False


# ----------------------------------------------------------------------------- commands


def _login(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        print("securecollab: URL must start with http:// or https://", file=sys.stderr)
        return EXIT_USAGE
    device_id = args.device or f"cli-{socket.gethostname()[:40]}-{secrets.token_hex(3)}"
    device_id = "".join(c if c.isalnum() or c in "._:@+-" else "-" for c in device_id)[:128]
    try:
        check_device_id(device_id)
    except ValueError as exc:
        print(f"securecollab: {exc}", file=sys.stderr)
        return EXIT_USAGE
    password = _read_password(f"Password for {args.user_id}: ")
    if not password:
        print("securecollab: no password given", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> int:
        profile: list[Profile] = []

        def persist(session: Session | None) -> None:
            if session is not None:
                p = Profile(url, session)
                profile[:] = [p]
                p.save()

        path = key_path(args.user_id, device_id)
        try:
            async with Client.login(
                url,
                args.user_id,
                password,
                device_id,
                path,
                _passphrase(),
                realtime=False,
                on_session=persist,
            ) as client:
                print(f"logged in as {client.user_id} on device {device_id} ({url})")
                print(f"device key: {path}")
        except AuthError as exc:
            if exc.status == 401 and exc.error != "not_logged_in":
                raise CliError("login failed: wrong user id or password", EXIT_AUTH) from None
            raise
        return EXIT_OK

    return _run(go, url=url)


def _logout(args: argparse.Namespace) -> int:
    profile = load_profile()

    async def go() -> int:
        async with _open(profile) as client:
            await client.rest.logout()
        return EXIT_OK

    code = _run(go, url=profile.url)
    with contextlib.suppress(FileNotFoundError):
        (config_dir() / "session.json").unlink()
    print("logged out (the device key stays, so this device can read its messages later)")
    return code if code != EXIT_UNREACHABLE else EXIT_OK


def _with_profile(fn: Callable[[Profile, argparse.Namespace], Awaitable[int]]) -> Any:
    def handler(args: argparse.Namespace) -> int:
        try:
            profile = load_profile()
        except CliError as err:
            print(f"securecollab: {err}", file=sys.stderr)
            return err.code
        return _run(fn, profile, args, url=profile.url)

    return handler


async def _send(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        sent = await client.send_text(args.user_id, args.text)
    print(f"sent {sent.id or sent.client_message_id}")
    return EXIT_OK


def _print_history(items: list[Item]) -> int:
    bad = sum(0 if _print_item(i) else 1 for i in items)
    return EXIT_FAILED if bad else EXIT_OK


async def _history(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        items = await client.history(args.user_id, limit=args.limit)
    return _print_history(items)


async def _channel_create(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        channel = await client.create_channel(args.name, args.description)
    print(channel.id)
    return EXIT_OK


async def _channel_invite(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        count = await client.invite(args.channel_id, args.user_ids)
    print(f"invited {count}")
    return EXIT_OK


async def _channel_send(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        sent = await client.send_channel_text(args.channel_id, args.text)
    print(f"sent {sent.id or sent.client_message_id}")
    return EXIT_OK


async def _channel_history(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        items = await client.channel_history(args.channel_id, limit=args.limit)
    return _print_history(items)


async def _channel_list(profile: Profile, args: argparse.Namespace) -> int:
    async with _open(profile) as client:
        channels = await client.rest.channels()
    for ch in channels:
        print(f"{ch.id}\t{ch.name}\t{len(ch.members)} members")
    return EXIT_OK


async def _listen(profile: Profile, args: argparse.Namespace) -> int:
    def on_state(state: str, detail: str) -> None:
        if state != "connected":
            print(f"securecollab: {state}: {detail}", file=sys.stderr, flush=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with _open(profile, realtime=True, on_state=on_state) as client:
                print(
                    f"listening as {client.user_id} (Ctrl-C to stop)", file=sys.stderr, flush=True
                )
                async for item in client.messages():
                    _print_item(item)
            nursery.cancel_scope.cancel()
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client subcommands (registered through cli.COMMAND_MODULES)."""
    p = sub.add_parser("login", help="log in to a server and set up this device's key")
    p.add_argument("url", metavar="URL", help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("user_id", metavar="USERID")
    p.add_argument("--device", help="device id (default: cli-<hostname>-<random>)")
    p.set_defaults(handler=_login)

    p = sub.add_parser("logout", help="end the saved session")
    p.set_defaults(handler=_logout)

    p = sub.add_parser("send", help="send an end-to-end encrypted message to a user")
    p.add_argument("user_id", metavar="USERID")
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(handler=_with_profile(_send))

    p = sub.add_parser("history", help="show (decrypted) messages with a user, oldest first")
    p.add_argument("user_id", metavar="USERID")
    p.add_argument("--limit", type=int, default=50, help="how many (1-200, default 50)")
    p.set_defaults(handler=_with_profile(_history))

    p = sub.add_parser("listen", help="print incoming messages until Ctrl-C")
    p.set_defaults(handler=_with_profile(_listen))

    channel = sub.add_parser("channel", help="channels: create, invite, send, history, list")
    csub = channel.add_subparsers(dest="channel_command", required=True, metavar="COMMAND")
    p = csub.add_parser("create", help="create a channel; prints its id")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--description")
    p.set_defaults(handler=_with_profile(_channel_create))
    p = csub.add_parser("invite", help="invite users to a channel you own")
    p.add_argument("channel_id", metavar="CHANNEL")
    p.add_argument("user_ids", metavar="USERID", nargs="+")
    p.set_defaults(handler=_with_profile(_channel_invite))
    p = csub.add_parser("send", help="send an encrypted message to a channel")
    p.add_argument("channel_id", metavar="CHANNEL")
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(handler=_with_profile(_channel_send))
    p = csub.add_parser("history", help="show a channel's (decrypted) messages, oldest first")
    p.add_argument("channel_id", metavar="CHANNEL")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_with_profile(_channel_history))
    p = csub.add_parser("list", help="the channels you are in")
    p.set_defaults(handler=_with_profile(_channel_list))
