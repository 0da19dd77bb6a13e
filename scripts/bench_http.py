#!/usr/bin/env python3
"""HTTP benchmark: logins/s and authenticated GET /api/users/me req/s, with p50/p99 latency.

Starts `securecollab serve` in a subprocess (temporary data dir, SQLite, a free port,
default argon2id cost, JSON access log to a file), creates users, then drives load from
a SEPARATE process (`--worker`) running `--concurrency` httpx clients on trio for
`--seconds` per case. Rate limits and login throttling are raised for the run (the
benchmark measures throughput, not the limiter); everything else is the default config.

    .venv/bin/python scripts/bench_http.py                 # both cases, 10 s each
    .venv/bin/python scripts/bench_http.py --seconds 5 --concurrency 32

Not a test: numbers depend on the machine (client and server share its cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "benchmark password 123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """Load generator process: prints one JSON line with latencies (ms) and error counts."""
    import httpx
    import trio

    spec = json.loads(Path(args.spec).read_text())
    base, case, users, tokens = spec["base"], spec["case"], spec["users"], spec["tokens"]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one_client(i: int, deadline: float) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:
            n = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if case == "login":
                    user = users[n % len(users)]
                    r = await c.post(
                        "/api/auth/login", json={"username": user, "password": PASSWORD}
                    )
                else:
                    token = tokens[n % len(tokens)]
                    r = await c.get("/api/users/me", headers={"Authorization": f"Bearer {token}"})
                dt = (time.perf_counter() - t0) * 1000
                n += args.concurrency
                if r.status_code == 200:
                    latencies.append(dt)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + args.seconds
        async with trio.open_nursery() as nursery:
            for i in range(args.concurrency):
                nursery.start_soon(one_client, i, deadline)
        return time.perf_counter() - start

    elapsed = trio.run(main)
    print(json.dumps({"elapsed": elapsed, "latencies": latencies, "errors": errors}))


# ----------------------------------------------------------------------------- driver


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} during startup")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


def run_case(
    case: str, base: str, users: list[str], tokens: list[str], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    spec = tmp / f"{case}.json"
    spec.write_text(json.dumps({"base": base, "case": case, "users": users, "tokens": tokens}))
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--spec",
        str(spec),
        "--seconds",
        str(args.seconds),
        "--concurrency",
        str(args.concurrency),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=args.seconds + 60)
    data = json.loads(out.stdout.decode().strip().splitlines()[-1])
    lat = sorted(data["latencies"])
    return {
        "case": case,
        "ok": len(lat),
        "errors": data["errors"],
        "rps": len(lat) / data["elapsed"],
        "p50": pct(lat, 0.50),
        "p99": pct(lat, 0.99),
        "mean": statistics.fmean(lat) if lat else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each case (default 10)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="concurrent clients (default 16)"
    )
    parser.add_argument("--users", type=int, default=16, help="accounts to spread logins over")
    parser.add_argument("--cases", default="login,me", help="comma list of: login, me")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import httpx

    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if not (k.startswith("SECURECOLLAB_") and "__" in k)
        }
        env.update(
            SECURECOLLAB_SERVER__DATA_DIR=str(tmp / "data"),
            SECURECOLLAB_STORE__URL=f"sqlite:///{tmp / 'data' / 'bench.db'}",
            SECURECOLLAB_STOMP__PORT="0",
            SECURECOLLAB_HTTP__RATE_LIMIT_USER_PER_MIN="100000000",
            SECURECOLLAB_HTTP__RATE_LIMIT_IP_PER_MIN="100000000",
            SECURECOLLAB_AUTH__LOGIN_LIMIT_PER_USER_PER_MIN="100000000",
            SECURECOLLAB_AUTH__LOGIN_LIMIT_PER_IP_PER_MIN="100000000",
        )
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "securecollab", "serve", "--port", str(port)],
            env=env,
            cwd=str(tmp),
            stdout=log,
            stderr=log,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, server)
            users = [f"bench{i}@example.com" for i in range(args.users)]
            tokens = []
            with httpx.Client(base_url=base, timeout=30) as c:
                for u in users:
                    r = c.post("/api/auth/register", json={"userId": u, "password": PASSWORD})
                    r.raise_for_status()
                    r = c.post("/api/auth/login", json={"username": u, "password": PASSWORD})
                    r.raise_for_status()
                    tokens.append(r.json()["token"])
            rows = [
                run_case(case, base, users, tokens, args, tmp) for case in args.cases.split(",")
            ]
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()

    names = {
        "login": "POST /api/auth/login (argon2id t=3 m=64MiB p=4)",
        "me": "GET /api/users/me (Bearer JWT)",
    }
    print(
        f"\n{args.concurrency} concurrent clients, {args.seconds:g} s per case,"
        " 1 server process, 1 load process"
    )
    print(f"{'case':<50} {'ok':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for row in rows:
        print(
            f"{names[row['case']]:<50} {row['ok']:>7} {row['rps']:>9.1f} {row['p50']:>8.1f} "
            f"{row['p99']:>8.1f}  {row['errors'] or '-'}"
        )
    print(f"server exit code after SIGTERM: {server.returncode}")


if __name__ == "__main__":
    main()
