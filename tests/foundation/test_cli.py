"""The `securecollab` command in real subprocesses: version, config errors, migrate,
user add, serve + graceful shutdown on SIGTERM/SIGINT, JSON logs without secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

import securecollab
from tests.support.server import PASSWORD, bearer, free_port

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SECURECOLLAB_") and "__" in k)}
    env.update(
        SECURECOLLAB_SERVER__DATA_DIR=str(tmp_path / "data"),
        SECURECOLLAB_STORE__URL=f"sqlite:///{tmp_path / 'data' / 'sc.db'}",
        SECURECOLLAB_AUTH__ARGON2_TIME_COST="1",
        SECURECOLLAB_AUTH__ARGON2_MEMORY_KIB="8192",
        SECURECOLLAB_STOMP__PORT="0",
    )
    env.update(extra)
    return env


async def _run(
    args: list[str], env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "securecollab", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd=str(ROOT),
        )


async def test_version(tmp_path: Path) -> None:
    p = await _run(["--version"], _env(tmp_path))
    assert (
        p.returncode == 0
        and p.stdout.decode().strip() == f"securecollab {securecollab.__version__}"
    )


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[http]\nprot = 1\n", {}, "http.prot"),
        ("", {"SECURECOLLAB_HTTP__PORT": "abc"}, "http.port"),
        ("[http]\nport = 70000\n", {}, "http.port"),
        ('[auth]\nmin_password_length = "ten"\n', {}, "auth.min_password_length"),
    ],
    ids=["unknown_key", "wrong_type_env", "impossible_port", "wrong_type_file"],
)
async def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    p = await _run(["serve", "--config", str(cfg)], _env(tmp_path, **env))
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "config error" in err and needle in err
    assert "Traceback" not in err


async def test_migrate_is_idempotent(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = await _run(["migrate"], env)
    assert first.returncode == 0, first.stderr
    second = await _run(["migrate"], env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert first.stdout.decode().startswith("schema version ")


async def _wait_healthy(base: str, proc: trio.Process) -> None:
    async with httpx.AsyncClient(base_url=base) as c:
        with trio.fail_after(30):
            while True:
                assert proc.returncode is None, "server exited during startup"
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_user_add_then_serve_login_and_signal_shutdown(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # registration is off: only the operator's CLI can create accounts
    env = _env(tmp_path, SECURECOLLAB_AUTH__REGISTRATION_ENABLED="false")
    p = await _run(
        ["user", "add", "ops@example.com", "--password-stdin"], env, stdin=PASSWORD.encode() + b"\n"
    )
    assert p.returncode == 0, p.stderr
    dup = await _run(
        ["user", "add", "OPS@example.com", "--password-stdin"], env, stdin=PASSWORD.encode()
    )
    assert dup.returncode == 1 and b"already registered" in dup.stderr
    weak = await _run(["user", "add", "w@example.com", "--password-stdin"], env, stdin=b"short\n")
    assert weak.returncode == 1 and b"at least 10" in weak.stderr

    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "securecollab", "serve", "--port", str(port)],
            env=env,
            cwd=str(tmp_path),
            stdout=log,
            stderr=log,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await _wait_healthy(base, proc)
            async with httpx.AsyncClient(base_url=base) as c:
                r = await c.post(
                    "/api/auth/login", json={"username": "ops@example.com", "password": PASSWORD}
                )
                assert r.status_code == 200, r.text
                token = r.json()["token"]
                r = await c.get(
                    "/api/users/me", headers={**bearer(token), "X-Request-Id": "cli-test-1"}
                )
                assert r.status_code == 200 and r.json()["userId"] == "ops@example.com"
                r = await c.post(
                    "/api/auth/register", json={"userId": "x@example.com", "password": PASSWORD}
                )
                assert r.status_code == 403
                # a keep-alive connection stays open across the signal: it must not delay exit
                proc.send_signal(sig)
                with trio.fail_after(5):
                    code = await proc.wait()
            assert code == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    lines = log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    me = [e for e in events if e.get("path") == "/api/users/me"]
    assert me and me[0]["request_id"] == "cli-test-1" and me[0]["status"] == 200
    assert any(e["msg"] == "shutting down" and e["signal"] == sig.name for e in events)
    assert any(e["msg"] == "no [server] jwt_secret configured: generated one" for e in events)
    text = log_path.read_text()
    assert PASSWORD not in text and token not in text
    secret_file = tmp_path / "data" / "jwt_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret_file.read_text().strip() not in text


def test_serve_tunes_the_garbage_collector() -> None:
    import gc

    from securecollab.cli import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # startup objects are out of the collector's sight
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
