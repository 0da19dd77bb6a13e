"""@stomp/stompjs under node over /ws: connect, subscribe, send, receive, ack, nack,
transaction, heart-beats, receipts, ERROR, disconnect (see stompjs_interop.mjs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from .conftest import InteropServer

HERE = Path(__file__).parent
STEPS = [
    "connect",
    "send-receive-ack",
    "topic-binary",
    "nack-redelivery",
    "transaction",
    "heart-beats",
    "error-frame",
    "disconnect",
]


def _node_ready() -> str | None:
    """Why the node test cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (HERE / "node_modules" / "@stomp" / "stompjs").is_dir():
        if shutil.which("npm") is None:
            return "npm is not installed (needed for npm ci in tests/interop)"
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            return f"npm ci failed: {done.stderr.strip()[-500:]}"
    return None


async def test_stompjs_over_websocket(interop_server: InteropServer) -> None:
    reason = await trio.to_thread.run_sync(_node_ready)
    if reason is not None:
        print(f"SKIP stompjs interop: {reason}")
        pytest.skip(reason)
    with trio.fail_after(60):
        done = await trio.run_process(
            [
                "node",
                str(HERE / "stompjs_interop.mjs"),
                interop_server.ws_url,
                *interop_server.tokens,
            ],
            cwd=HERE,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    lines = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
    assert done.returncode == 0, f"{lines}\n{done.stderr.decode()[-2000:]}"
    assert [s["step"] for s in lines] == STEPS
    assert lines[0]["version"] == "1.2"
