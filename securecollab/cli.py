"""The `securecollab` command: serve, migrate, user add, --version (and SDK commands later).

Exit codes: 0 ok, 1 runtime failure (e.g. database newer than the code, userId taken),
2 bad usage or bad configuration (the message names the key).

Adding subcommands: write a module with `add_commands(subparsers) -> None` that calls
`subparsers.add_parser(...)` and `parser.set_defaults(handler=fn)` where
`fn(args: argparse.Namespace) -> int`; append the module path to `COMMAND_MODULES`.
Use `config_parent()` as a parent parser to get `--config` on server-side commands.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import importlib
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import trio

import securecollab
from securecollab.config import ConfigError, Settings, load_settings

#: Modules that contribute subcommands (each has add_commands(subparsers)).
COMMAND_MODULES: list[str] = ["securecollab.cli", "securecollab.cli_client"]


def config_parent() -> argparse.ArgumentParser:
    """A parent parser adding `--config PATH`."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: built-in defaults; env SECURECOLLAB_<SECTION>__<KEY>)",
    )
    return p


def settings_from_args(args: argparse.Namespace, **overrides: dict[str, Any]) -> Settings:
    """Load settings from --config, the environment and `overrides` (raises ConfigError)."""
    return load_settings(getattr(args, "config", None), overrides=overrides or None)


# ----------------------------------------------------------------------------- commands


#: Cyclic-GC thresholds for the server: a young collection after 20,000 net new
#: container objects instead of 700, an older one every 20 of those.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    Why: almost everything the server allocates per message (frames, dicts, trio's
    bookkeeping) is freed by reference counting, but with CPython's default threshold
    (700) a young collection still ran ~20 times a second under load, each scanning
    whatever was alive at that moment (~1 ms), and full collections took ~47 ms each:
    ~3 % of the event loop and the worst latency spikes. `gc.freeze()` moves everything
    built at startup (modules, config, the app) out of the collector's sight for good.
    Workload 1 at 4,000 msg/s offered: p99 422 -> 162 ms (fixed phase), ramp step
    1,236 -> 228 ms; GC ran 5 times in the run instead of 1,057 (scripts/bench.py).
    Reference cycles are still collected, only less often.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def _serve(args: argparse.Namespace) -> int:
    http: dict[str, Any] = {}
    if args.host is not None:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    settings = settings_from_args(args, **({"http": http} if http else {}))
    from securecollab.app import StartupError, main
    from securecollab.log import configure_logging
    from securecollab.store import StoreError

    configure_logging(settings.server.log_level)
    tune_gc()
    try:
        trio.run(main, settings)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        return 0
    except BaseException as e:
        known = _known_error(e, (StoreError, StartupError, OSError))
        if known is None:
            raise
        print(f"securecollab: cannot start: {known}", file=sys.stderr)
        return 1
    return 0


def _known_error(
    exc: BaseException, types: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of `types` in `exc` or its (nested) exception groups."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _known_error(inner, types)
            if found is not None:
                return found
    return None


async def _migrate_async(settings: Settings) -> int:
    from securecollab.app import store_from_settings

    async with store_from_settings(settings) as store:
        return await store.migrate()


def _migrate(args: argparse.Namespace) -> int:
    from securecollab.store import StoreError

    settings = settings_from_args(args)
    try:
        version = trio.run(_migrate_async, settings)
    except BaseException as e:
        known = _known_error(e, (StoreError, OSError))
        if known is None:
            raise
        print(f"securecollab: migrate failed: {known}", file=sys.stderr)
        return 1
    print(f"schema version {version}")
    return 0


async def _user_add_async(
    settings: Settings, user_id: str, password: str, display_name: str | None, admin: bool
) -> str:
    from securecollab.app import build_services, store_from_settings
    from securecollab.backplane.memory import MemoryBackplane

    # no token is issued here: a throwaway key keeps `serve` the one place that
    # generates (and announces) the persistent secret
    secret = secrets.token_bytes(64)
    async with store_from_settings(settings) as store:
        await store.migrate()
        async with trio.open_nursery() as nursery:
            ctx = build_services(settings, store, MemoryBackplane(), nursery, secret)
            roles = ("ROLE_USER", "ROLE_ADMIN") if admin else ("ROLE_USER",)
            user = await ctx.auth.register(
                user_id, password, display_name, None, roles=roles, by_admin=True
            )
            return user.user_id


def _user_add(args: argparse.Namespace) -> int:
    from securecollab.services.errors import ServiceError
    from securecollab.store import StoreError

    settings = settings_from_args(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            print("securecollab: passwords differ", file=sys.stderr)
            return 1
    try:
        uid = trio.run(
            _user_add_async, settings, args.user_id, password, args.display_name, args.admin
        )
    except BaseException as e:
        known = _known_error(e, (ServiceError, StoreError, OSError))
        if known is None:
            raise
        print(f"securecollab: {getattr(known, 'detail', known)}", file=sys.stderr)
        return 1
    print(f"user {uid} created")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The foundation's subcommands."""
    parent = config_parent()
    p = sub.add_parser("serve", parents=[parent], help="run the server (Ctrl-C/SIGTERM to stop)")
    p.add_argument("--host", help="listen address (overrides [http] host)")
    p.add_argument("--port", type=int, help="HTTP port (overrides [http] port)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("migrate", parents=[parent], help="apply database migrations and exit")
    p.set_defaults(handler=_migrate)

    users = sub.add_parser("user", help="manage users")
    user_sub = users.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    p = user_sub.add_parser(
        "add", parents=[parent], help="create a user (works when registration is off)"
    )
    p.add_argument("user_id", metavar="userId", help="email-like id, e.g. alice@example.com")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--display-name", help="display name (default: the part before @)")
    p.add_argument("--admin", action="store_true", help="also grant ROLE_ADMIN")
    p.set_defaults(handler=_user_add)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securecollab", description="End-to-end-encrypted team chat server"
    )
    parser.add_argument(
        "--version", action="version", version=f"securecollab {securecollab.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as e:
        print(f"securecollab: config error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
