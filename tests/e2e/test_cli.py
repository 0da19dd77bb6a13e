"""The `securecollab` chat commands, run as subprocesses against a real server on loopback."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import trio

from tests.support.server import PASSWORD, ServerHandle, free_port, running_server

from .conftest import SERVER_OVERRIDES, register

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
CLI = str(Path(sys.executable).with_name("securecollab"))


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECOLLAB_")}
    env["XDG_CONFIG_HOME"] = str(home)
    env["HOME"] = str(home)
    return env


async def cli(
    home: Path, *args: str, stdin: bytes = b"", ok: bool = True
) -> trio.CompletedProcess[bytes]:
    """Run `securecollab ARGS` with its own config dir; `ok` asserts exit code 0."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [CLI, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env_for(home),
        )
    if ok:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    assert b"Traceback" not in done.stderr, done.stderr
    return done


async def login(srv: ServerHandle, home: Path, user: str, device: str) -> None:
    done = await cli(
        home, "login", srv.base_url, user, "--device", device, stdin=PASSWORD.encode() + b"\n"
    )
    assert f"logged in as {user}".encode() in done.stdout


async def test_cli_chat_round_trip(tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        await register(srv, ALICE, BOB)
        await login(srv, alice_home, ALICE, "alice-cli")
        await login(srv, bob_home, BOB, "bob-cli")
        conf = alice_home / "securecollab"
        for path in (conf / "session.json", *conf.glob("keys/*/*.key")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert len(list(conf.glob("keys/*/*.key"))) == 1
        assert PASSWORD.encode() not in (conf / "session.json").read_bytes()

        # bob listens while alice sends
        listen = await trio.lowlevel.open_process(
            [CLI, "listen"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env_for(bob_home),
        )
        try:
            assert listen.stderr is not None and listen.stdout is not None
            with trio.fail_after(20):
                seen = b""
                while b"listening as" not in seen:
                    seen += await listen.stderr.receive_some(4096)
            await cli(alice_home, "send", BOB, "hello bob, from the terminal")
            out = b""
            with trio.fail_after(20):
                while b"hello bob, from the terminal" not in out:
                    chunk = await listen.stdout.receive_some(4096)
                    assert chunk, "listen exited early"
                    out += chunk
            line = next(x for x in out.decode().splitlines() if "hello bob" in x)
            assert f"{ALICE}: hello bob, from the terminal" in line and line.startswith("[")
            listen.send_signal(signal.SIGINT)
            with trio.fail_after(20):
                code = await listen.wait()
            assert code == 0  # Ctrl-C is the normal way to stop listening
        finally:
            if listen.returncode is None:
                listen.kill()
                await listen.wait()

        done = await cli(bob_home, "send", ALICE, "hi alice")
        assert done.stdout.startswith(b"sent ")
        for home, peer in ((alice_home, BOB), (bob_home, ALICE)):
            hist = (await cli(home, "history", peer)).stdout.decode().splitlines()
            assert [h.split(": ", 1)[1] for h in hist] == [
                "hello bob, from the terminal",
                "hi alice",
            ]

        # channels
        channel_id = (await cli(alice_home, "channel", "create", "ops")).stdout.decode().strip()
        assert channel_id
        done = await cli(alice_home, "channel", "invite", channel_id, BOB)
        assert done.stdout.strip() == b"invited 1"
        await cli(bob_home, "channel", "send", channel_id, "deploy is green")
        await cli(alice_home, "channel", "send", channel_id, "thanks")
        for home in (alice_home, bob_home):
            hist = (await cli(home, "channel", "history", channel_id)).stdout.decode()
            lines = hist.splitlines()
            assert len(lines) == 2 and lines[0].endswith(f"#{channel_id} {BOB}: deploy is green")
            assert lines[1].endswith(f"{ALICE}: thanks")
        listed = (await cli(bob_home, "channel", "list")).stdout.decode()
        assert channel_id in listed and "ops" in listed

        # none of it on the server in the clear
        db = Path(srv.settings.store.url.removeprefix("sqlite:///"))
        blob = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
        for text in (b"hello bob, from the terminal", b"deploy is green", b"hi alice"):
            assert text not in blob


async def test_cli_failures_are_clear_and_nonzero(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    # not logged in
    done = await cli(home, "send", BOB, "x", ok=False)
    assert done.returncode == 4 and b"not logged in" in done.stderr
    # server down
    down = f"http://127.0.0.1:{free_port()}"
    done = await cli(home, "login", down, ALICE, stdin=b"pw\n", ok=False)
    assert done.returncode == 3 and b"cannot reach the server" in done.stderr
    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        await register(srv, ALICE, BOB, CAROL)
        # bad password
        done = await cli(home, "login", srv.base_url, ALICE, stdin=b"not the password\n", ok=False)
        assert done.returncode == 4 and b"wrong user id or password" in done.stderr
        await login(srv, home, ALICE, "laptop")
        # unknown user
        done = await cli(home, "send", "nobody@example.com", "x", ok=False)
        assert done.returncode == 1 and b"unknown user nobody@example.com" in done.stderr
        # carol never logged in with a client: no device key to encrypt for
        done = await cli(home, "send", CAROL, "x", ok=False)
        assert done.returncode == 1 and b"no registered device key" in done.stderr
        # a channel that does not exist
        done = await cli(home, "channel", "send", "no-such-channel", "x", ok=False)
        assert done.returncode == 1 and done.stderr.startswith(b"securecollab: ")
        url = srv.base_url
    # the server went away after login
    done = await cli(home, "send", BOB, "x", ok=False)
    assert done.returncode == 3 and url.encode() in done.stderr
