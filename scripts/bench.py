#!/usr/bin/env python3
"""Load benchmark (issue 7): SecureCollab vs RabbitMQ Web-STOMP, side by side.

    .venv/bin/python scripts/bench.py                       # everything (~10 min)
    .venv/bin/python scripts/bench.py --quick               # smoke run, both servers
    .venv/bin/python scripts/bench.py --only ours --workloads 1,2 --duration 5

Workloads (STOMP over WebSocket, text frames, no compression, 127.0.0.1 only):
  1. 1:1 persisted: N users (--users 200), user i sends to user i+1 (--pairing next;
     or along a fixed random cycle: --pairing shuffled) with a receipt on every SEND,
     users sending in index order, evenly spaced; a fixed offered rate (--rate 1000
     msg/s) and a ramp of offered
     rates (--ramp) to find the maximum sustainable rate: delivered >= 95 % of
     offered, nothing lost, p99 < 1 s. Then (ours; --no-crash-check skips it) the
     crash check: one more phase at that rate on a fresh server, whose process and
     SQLite writer are SIGKILLed halfway; every SEND that got its RECEIPT must be in
     the database file afterwards ("every receipted message durable").
  2. Channel fan-out: one sender, one channel with --fanout-subs (1000) subscribed
     members (one connection each); latency to the LAST subscriber of every message.
  3. Connections: --idle (10000) idle STOMP sessions with 10 s heart-beats held
     --hold (60) s; server RSS and connect rate.
  4. Mixed REST (ours only): history paging + POST send-message over HTTP while
     workload 1 runs at --rate.

The server under test runs as a subprocess (ours: `securecollab serve`, temp data
dir, embedded defaults: SQLite + in-memory backplane) or is the local RabbitMQ
(plugins enabled idempotently). The load comes from --workers (default 1) processes
separate from the server (scripts/bench_lib/loadgen.py: asyncio Protocols and a
minimal RFC 6455 client, the same for both servers); their own CPU use is printed,
also per delivered message.
Latency = receive wall clock - send wall clock stamped inside the payload (one clock,
one machine). Results: stdout, --json (default scripts/results/bench_results.json)
and a PNG plot (--plot, default scripts/results/bench_latency.png).

Not a test: numbers depend on the machine (server and load share its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = Path(__file__).resolve().parent / "bench_lib" / "loadgen.py"
PASSWORD = "benchmark password 123"
RABBIT_WS = "ws://127.0.0.1:15674/ws"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Overrides for our server; everything else is the embedded default config.
OUR_ENV = {
    # the benchmark measures throughput, not the limiters
    "SECURECOLLAB_STOMP__SEND_LIMIT": "1000000000",
    "SECURECOLLAB_HTTP__RATE_LIMIT_USER_PER_MIN": "1000000000",
    "SECURECOLLAB_HTTP__RATE_LIMIT_IP_PER_MIN": "1000000000",
    "SECURECOLLAB_AUTH__LOGIN_LIMIT_PER_USER_PER_MIN": "1000000000",
    "SECURECOLLAB_AUTH__LOGIN_LIMIT_PER_IP_PER_MIN": "1000000000",
    # registering 1,000 accounts at argon2id t=3/64 MiB would take minutes; hashing is
    # not part of any workload (logins happen before the clock starts)
    "SECURECOLLAB_AUTH__ARGON2_TIME_COST": "1",
    "SECURECOLLAB_AUTH__ARGON2_MEMORY_KIB": "1024",
    "SECURECOLLAB_AUTH__ARGON2_PARALLELISM": "1",
    "SECURECOLLAB_STOMP__PORT": "0",  # raw TCP listener off: everything goes over /ws
}

DIFFERENCES = """\
What differs between the two setups:
- Ours: every /app/chat/send is JSON-parsed and validated as an E2EE envelope
  (base64 of ciphertext, iv and each wrapped key; sizes; recipient exists), then the
  message row, (offline-queue rows) and an outbox row are committed to SQLite (WAL,
  synchronous=FULL: fsync per group commit) BEFORE the RECEIPT and the delivery; the
  delivery is a new JSON document (id, from, createdAt added). JWT auth at CONNECT.
- RabbitMQ: SEND persistent:true to a durable classic /queue/... (workload 1) or to
  /topic/... (workload 2); the RECEIPT is a publisher confirm, which RabbitMQ may send
  once the message was delivered and acked by a consumer (auto-ack here) without
  waiting for its fsync (messages are written/fsync'd in batches by the message store);
  the body is relayed as is (no validation); guest/guest login; Erlang VM on both cores.
- Both on this 2-core machine, sharing the cores with the load generator: ours is
  one process plus its SQLite writer process, RabbitMQ one Erlang VM; server CPU and
  RSS are summed over a server's processes.
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------- /proc


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (our server's SQLite writer process, beam.smp's
    helpers): a server's cost is the cost of all its processes."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent_of.items() if pp in frontier]
        family += frontier
    return family


class ProcSampler:
    """CPU (% of one core) and max RSS (MiB) of a process and its descendants, sampled
    every 0.25 s (RSS summed over the processes: shared pages count once per process)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pids = descendants(pid)
        self.max_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_ticks(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a helper process that exited
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total

    def rss_mib(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE / 2**20
            except OSError:
                if pid == self.pid:
                    raise
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.max_rss = max(self.max_rss, self.rss_mib())
            except OSError:
                return

    def __enter__(self) -> ProcSampler:
        self.t0 = time.time()
        self.c0 = self.cpu_ticks()
        self.max_rss = self.rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_pct = (self.cpu_ticks() - self.c0) / TICK / max(1e-6, time.time() - self.t0) * 100
        self.rss_end = self.rss_mib()


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A server under test and how to address it."""

    name: str  # "ours" | "rabbitmq"
    url: str
    vhost: str
    pid: int
    users: list[dict[str, Any]] = field(default_factory=list)  # login, passcode, user_id
    channel: str = ""
    base: str = ""  # HTTP base (ours)
    notes: list[str] = field(default_factory=list)
    max_connections: int | None = None  # the server process's open-file limit, if known

    def cannot_hold(self, connections: int) -> str | None:
        """Why this server cannot take `connections` at once (None if it can, or unknown)."""
        if self.max_connections is not None and connections + 50 > self.max_connections:
            return (
                f"skipped: {self.name}'s open-file limit is {self.max_connections}, fewer than"
                f" the {connections} connections this workload holds (raise it to compare)"
            )
        return None

    # -- workload 1 user specs
    def direct_users(self, n: int, run: str, pairing: str = "next") -> list[dict[str, Any]]:
        """Workload 1's senders in send order. Every user sends to one peer and gets
        from one: "next" pairs user i with i+1, so a connection's RECEIPT and its incoming
        MESSAGE come from messages sent one slot apart (a server that writes both in one
        syscall when they are produced together benefits); "shuffled" pairs along a
        fixed random cycle, so the two are unrelated in time."""
        peer_of = [(i + 1) % n for i in range(n)]
        if pairing == "shuffled":
            cycle = list(range(n))
            random.Random(7).shuffle(cycle)
            for k, i in enumerate(cycle):
                peer_of[i] = cycle[(k + 1) % n]
        out = []
        for i in range(n):
            me, peer = self.users[i], self.users[peer_of[i]]
            if self.name == "ours":
                sub, sub_h = "/user/queue/private", {}
                send = {"destination": "/app/chat/send", "content-type": "application/json"}
                to = peer["user_id"]
            else:
                sub, sub_h = f"/queue/bench-{run}-u{i}", {}
                send = {
                    "destination": f"/queue/bench-{run}-u{peer_of[i]}",
                    "persistent": "true",
                    "content-type": "application/json",
                }
                to = peer["user_id"]
            out.append(
                {
                    "login": me["login"],
                    "passcode": me["passcode"],
                    "user_id": me["user_id"],
                    "token": me.get("token", ""),
                    "subscribe": sub,
                    "subscribe_headers": sub_h,
                    "send_headers": send,
                    "to_field": "to",
                    "to": to,
                }
            )
        return out


class OurServer:
    """`securecollab serve` in a subprocess with a temporary data dir and free port."""

    def __init__(self, tmp: Path, extra_env: dict[str, str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        env = {
            k: v for k, v in os.environ.items() if not (k.startswith("SECURECOLLAB_") and "__" in k)
        }
        env.update(OUR_ENV)
        env.update(extra_env)
        env["SECURECOLLAB_SERVER__DATA_DIR"] = str(tmp / "data")
        env["SECURECOLLAB_STORE__URL"] = f"sqlite:///{tmp / 'data' / 'bench.db'}"
        self.log_path = tmp / "server.log"
        self.log = self.log_path.open("wb")
        exe = Path(sys.executable).parent / "securecollab"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "securecollab"]
        self.proc = subprocess.Popen(
            [*cmd, "serve", "--port", str(self.port)],
            env=env,
            cwd=str(tmp),
            stdout=self.log,
            stderr=self.log,
            preexec_fn=raise_nofile,  # 10,000 sockets need more than the default 1024 fds
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: see {self.log_path}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not become healthy")

    def stop(self) -> int | None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


async def _register(base: str, n: int, run: str, fanout: int) -> tuple[list[dict[str, Any]], str]:
    """Register and log in n users; create a channel with users 1..fanout (owner: user 0)."""
    import httpx

    users: list[dict[str, Any]] = [{} for _ in range(n)]
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:

        async def one(i: int) -> None:
            uid = f"b{run}-{i}@bench.example"
            async with sem:
                r = await c.post("/api/auth/register", json={"userId": uid, "password": PASSWORD})
                r.raise_for_status()
                r = await c.post("/api/auth/login", json={"username": uid, "password": PASSWORD})
                r.raise_for_status()
            token = r.json()["token"]
            users[i] = {"login": "", "passcode": token, "token": token, "user_id": uid}

        await asyncio.gather(*(one(i) for i in range(n)))
        channel = ""
        if fanout:
            auth = {"Authorization": f"Bearer {users[0]['token']}"}
            r = await c.post("/api/channels/create", json={"name": "bench"}, headers=auth)
            r.raise_for_status()
            channel = r.json()["id"]
            members = [u["user_id"] for u in users[1 : fanout + 1]]
            for i in range(0, len(members), 100):
                r = await c.post(
                    f"/api/channels/{channel}/invite",
                    json={"userIds": members[i : i + 100]},
                    headers=auth,
                )
                r.raise_for_status()
    return users, channel


def start_ours(
    tmp: Path, n_users: int, run: str, fanout: int, extra_env: dict[str, str]
) -> tuple[Target, OurServer]:
    server = OurServer(tmp, extra_env)
    server.wait_healthy()
    t = time.time()
    users, channel = asyncio.run(_register(server.base, n_users, run, fanout))
    print(
        f"[ours] pid {server.proc.pid}, {server.base}; {n_users} users registered+logged in"
        f" in {time.time() - t:.1f} s; channel with {fanout} members"
    )
    target = Target(
        "ours",
        f"ws://127.0.0.1:{server.port}/ws",
        "localhost",
        server.proc.pid,
        users,
        channel,
        server.base,
    )
    return target, server


def beam_pid() -> int | None:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        return int(d)
            except OSError:
                continue
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_rabbit(n_users: int) -> Target:
    """Make sure RabbitMQ runs with Web-STOMP (idempotent), and say what was done."""
    notes = []
    if shutil.which("rabbitmqctl") is None:
        raise SystemExit("rabbitmqctl not found: install rabbitmq-server or use --only ours")
    if subprocess.run(["rabbitmqctl", "status"], capture_output=True, timeout=60).returncode:
        notes.append("RabbitMQ was not running: started it with `rabbitmq-server -detached`")
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
        for _ in range(120):
            if subprocess.run(["rabbitmqctl", "status"], capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            raise SystemExit("RabbitMQ did not come up within 120 s")
    running = subprocess.run(
        ["rabbitmq-plugins", "list", "-E", "-m"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if {"rabbitmq_stomp", "rabbitmq_web_stomp"} <= set(running) and _port_open(15674):
        notes.append("plugins rabbitmq_stomp and rabbitmq_web_stomp already enabled")
    else:
        r = subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_stomp", "rabbitmq_web_stomp"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        notes.append(
            f"ran `rabbitmq-plugins enable rabbitmq_stomp rabbitmq_web_stomp` (exit {r.returncode})"
        )
        if not _port_open(15674):
            # Typically: rabbitmq_stomp's raw TCP listener cannot bind 61613 because our own
            # server (its default STOMP port) holds it. Web-STOMP does not need that
            # listener, so move it to 127.0.0.1:61614 for this node's lifetime (runtime
            # env, no config file touched) and start the plugins.
            detail = "eaddrinuse" if "eaddrinuse" in r.stdout + r.stderr else r.stderr[-200:]
            subprocess.run(
                [
                    "rabbitmqctl",
                    "eval",
                    'application:set_env(rabbitmq_stomp, tcp_listeners, [{"127.0.0.1", 61614}]),'
                    " application:set_env(rabbitmq_web_stomp, tcp_config,"
                    " [{ip, {127,0,0,1}}, {port, 15674}]),"
                    " application:ensure_all_started(rabbitmq_web_stomp).",
                ],
                capture_output=True,
                timeout=60,
            )
            notes.append(
                f"plugin start failed ({detail.strip()}): started them at runtime with the STOMP"
                " TCP listener on 127.0.0.1:61614 and Web-STOMP on 127.0.0.1:15674"
            )
    for _ in range(60):
        if _port_open(15674):
            break
        time.sleep(1)
    else:
        raise SystemExit("RabbitMQ Web-STOMP is not listening on 127.0.0.1:15674")
    # Benchmark queues (bench-<run>-u<i>) are durable; expire them once unused.
    subprocess.run(
        [
            "rabbitmqctl",
            "set_policy",
            "bench-expire",
            "^bench-",
            '{"expires":60000}',
            "--apply-to",
            "queues",
        ],
        capture_output=True,
        timeout=60,
    )
    notes.append("policy bench-expire: unused bench-* queues expire after 60 s")
    pid = beam_pid()
    if pid is None:
        raise SystemExit("RabbitMQ runs but no beam.smp process was found")
    with open(f"/proc/{pid}/limits") as f:
        nofile = next((line.split()[3] for line in f if line.startswith("Max open files")), "?")
    notes.append(f"beam.smp pid {pid}, open-file limit {nofile} (not changed by this script)")
    users = [
        {"login": "guest", "passcode": "guest", "user_id": f"u{i}@bench.example"}
        for i in range(n_users)
    ]
    for n in notes:
        print(f"[rabbitmq] {n}")
    limit = int(nofile) if nofile.isdigit() else None
    return Target("rabbitmq", RABBIT_WS, "/", pid, users, notes=notes, max_connections=limit)


# ----------------------------------------------------------------------------- phases


def unless_skipped(
    target: Target,
    connections: int,
    bucket: dict[str, Any],
    run_it: Callable[[], dict[str, Any]],
) -> dict[str, Any] | None:
    """Run a workload holding `connections` and record it in `bucket`; None if skipped."""
    why = target.cannot_hold(connections)
    if why is not None:
        print(f"  {why}")
        bucket[target.name] = {"skipped": why}
        return None
    bucket[target.name] = result = run_it()
    return result


class Workers:
    """Several loadgen.py processes: start, wait ready, go, collect results."""

    live: ClassVar[list[Workers]] = []  # killed on the way out if a phase failed

    def __init__(self, specs: list[dict[str, Any]], tmp: Path) -> None:
        Workers.live.append(self)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outs: list[Path] = []
        for i, spec in enumerate(specs):
            path = tmp / f"spec-{uuid.uuid4().hex[:8]}-{i}.json"
            spec["out"] = str(path.with_suffix(".out.json"))
            path.write_text(json.dumps(spec))
            self.outs.append(Path(spec["out"]))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(LOADGEN), str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )

    def wait_event(self, event: str, timeout: float) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.time() + timeout
        for p in self.procs:
            while True:
                left = deadline - time.time()
                if left <= 0:
                    self.kill()
                    raise SystemExit(f"load worker did not report {event!r} in {timeout:.0f} s")
                assert p.stdout is not None
                r, _, _ = select.select([p.stdout], [], [], left)
                if not r:
                    continue
                line = p.stdout.readline()
                if not line:
                    self.kill()
                    raise SystemExit(f"load worker exited ({p.wait()}) before {event!r}")
                msg = json.loads(line)
                if msg.get("event") == event:
                    got.append(msg)
                    break
        return got

    def go(self, t0: float) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"go {t0}\n".encode())
            p.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        self.wait_event("done", timeout)
        for p in self.procs:
            p.wait(30)
        return [json.loads(o.read_text()) for o in self.outs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def lat_summary(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "p50": pct(lat, 0.50),
        "p95": pct(lat, 0.95),
        "p99": pct(lat, 0.99),
        "max": lat[-1] if lat else float("nan"),
    }


def gen_cpu(res: list[dict[str, Any]], messages: int = 0) -> str:
    """Load processes' CPU (% of one core, sum and per worker), and per message when given."""
    per = [r["cpu_s"] / r["wall_s"] * 100 for r in res]
    out = f"{sum(per):.0f}% ({'/'.join(f'{p:.0f}' for p in per)})"
    if messages:
        out += f" {gen_us_per_msg(res, messages):.0f} us/msg"
    return out


def gen_us_per_msg(res: list[dict[str, Any]], messages: int) -> float:
    """CPU of the load processes (from go to done) per delivered message, microseconds."""
    return sum(r["cpu_s"] for r in res) / max(1, messages) * 1e6


def run_direct(
    target: Target,
    args: argparse.Namespace,
    rate: float,
    duration: float,
    tmp: Path,
    run: str,
    rest: bool = False,
    kill_at: float | None = None,
) -> dict[str, Any]:
    """Workload 1 at one offered rate (optionally with workload 4's REST load alongside).

    `kill_at`: the crash check (`crash_check`): SIGKILL the server and its processes that
    many seconds into the phase; the row then lists the receipted clientMessageIds."""
    n = args.users
    phase = uuid.uuid4().hex[:6]
    users = target.direct_users(n, f"{run}{phase}", args.pairing)
    per_user = rate / n
    count = max(1, round(per_user * duration))
    specs = []
    for w, chunk in enumerate(split(list(range(n)), args.workers)):
        specs.append(
            {
                "kind": "direct",
                "url": target.url,
                "vhost": target.vhost,
                "users": [users[i] for i in chunk],
                "rate_per_user": per_user,
                "count_per_user": count,
                "expected_per_user": count,
                "duration": duration,
                "send_grace": max(2.0, duration * 0.5),
                "drain": max(5.0, duration * 0.5) + 5,
                "seq_base": w * 10_000_000,
                "seed": w,
                # clientMessageIds must be unique per phase: a repeat is an idempotent retry
                "run": f"{run}-{phase}-{w}",
                "timeout": duration * 3 + 120,
                "report": kill_at is not None,
            }
        )
    if rest:
        specs.append(
            {
                "kind": "rest",
                "base": target.base,
                "users": users,
                "concurrency": args.rest_concurrency,
                "duration": duration,
                "seed": 99,
                "run": f"{run}-{phase}-rest",
                "timeout": duration + 120,
            }
        )
    workers = Workers(specs, tmp)
    workers.wait_event("ready", 120)
    killer: threading.Timer | None = None
    with ProcSampler(target.pid) as sampler:
        t0 = time.time() + 0.5
        if kill_at is not None:
            family = descendants(target.pid)
            killer = threading.Timer(t0 + kill_at - time.time(), kill_all, [family])
            killer.start()
        workers.go(t0)
        res = workers.results(duration * 3 + 150)
    if killer is not None:
        killer.join()
    stomp = [r for r, s in zip(res, specs, strict=True) if s["kind"] == "direct"]
    lat = [x for r in stomp for x in r["lat_ms"]]
    rec = [x for r in stomp for x in r["receipt_ms"]]
    sent = sum(r["sent"] for r in stomp)
    receipts = sum(r["receipts"] for r in stomp)
    delivered = sum(r["delivered"] for r in stomp)
    offered_total = count * n
    first = min((r["first_send"] for r in stomp if r["first_send"]), default=t0)
    last = max((r["last_deliver"] for r in stomp), default=t0)
    span = max(duration, last - first) if delivered else duration
    errors: dict[str, int] = {}
    for r in stomp:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out = {
        "server": target.name,
        "offered": rate,
        "duration": duration,
        "offered_msgs": offered_total,
        "sent": sent,
        "receipts": receipts,
        "delivered": delivered,
        "lost": max(0, receipts - delivered),
        "delivered_per_s": delivered / span,
        "lat": lat_summary(lat),
        "receipt": lat_summary(rec),
        "gen_lag_p99_ms": max(r["lag_ms_p99"] for r in stomp),
        "server_cpu_pct": sampler.cpu_pct,
        "server_rss_mib": sampler.max_rss,
        "gen_cpu": gen_cpu(stomp, delivered),
        "gen_us_per_msg": gen_us_per_msg(stomp, delivered),
        "errors": errors,
    }
    if kill_at is not None:
        out["receipted"] = [cmid for r in stomp for cmid in r["receipted"]]
    if rest:
        out["gen_cpu"] = gen_cpu(res)  # the REST worker's CPU is not per STOMP message
    out["sustainable"] = bool(
        delivered >= 0.95 * offered_total
        and out["delivered_per_s"] >= 0.95 * rate
        and out["lost"] == 0
        and out["lat"]["p99"] < 1000
    )
    if rest:
        r = next(r for r, s in zip(res, specs, strict=True) if s["kind"] == "rest")
        out["rest"] = {
            kind: {"n": len(v), "per_s": len(v) / r["elapsed"], **lat_summary(v)}
            for kind, v in r["rest_lat_ms"].items()
        }
        out["rest_codes"] = r["codes"]
        out["rest_delivered_stomp"] = sum(x["rest_delivered"] for x in stomp)
    return out


def run_fanout(target: Target, args: argparse.Namespace, tmp: Path, run: str) -> dict[str, Any]:
    subs = args.fanout_subs
    members = target.users[1 : subs + 1]
    count = max(1, round(args.fanout_rate * args.fanout_duration))
    if target.name == "ours":
        topic = f"/topic/messages/{target.channel}"
        send = {"destination": "/app/chat/send", "content-type": "application/json"}
        to_field, to = "channelId", target.channel
    else:
        topic = f"/topic/bench-{run}-fanout"
        send = {"destination": topic, "persistent": "true", "content-type": "application/json"}
        to_field, to = "channelId", "bench"
    sender = {**target.users[0], "send_headers": send, "to_field": to_field, "to": to}
    specs = []
    for w, chunk in enumerate(split(members, args.workers)):
        specs.append(
            {
                "kind": "fanout",
                "url": target.url,
                "vhost": target.vhost,
                "subscribers": chunk,
                "sender": sender if w == 0 else None,
                "topic": topic,
                "rate": args.fanout_rate,
                "count": count,
                "duration": args.fanout_duration,
                "send_grace": 5.0,
                "drain": 15.0,
                "seed": w,
                "run": f"{run}-f",
                "timeout": args.fanout_duration + 240,
            }
        )
    workers = Workers(specs, tmp)
    workers.wait_event("ready", 240)
    with ProcSampler(target.pid) as sampler:
        t0 = time.time() + 0.5
        workers.go(t0)
        res = workers.results(args.fanout_duration + 300)
    last: dict[str, float] = {}
    for r in res:
        for k, v in r["last_ms"].items():
            last[k] = max(last.get(k, 0.0), v)
    got = [g for r in res for g in r["got_per_sub"]]
    complete = sum(1 for g in got if g == count)
    errors: dict[str, int] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    deliveries = sum(r["delivered"] for r in res)
    first = min((r["first_send"] for r in res if r["first_send"]), default=t0)
    end = max((r["last_deliver"] for r in res), default=t0)
    return {
        "server": target.name,
        "subscribers": len(members),
        "messages": count,
        "sent": sum(r["sent"] for r in res),
        "receipts": sum(r["receipts"] for r in res),
        "deliveries": deliveries,
        "expected_deliveries": count * len(members),
        "subs_complete": complete,
        "deliveries_per_s": deliveries / max(1e-6, end - first),
        "last_sub": lat_summary(list(last.values())),
        "any_sub": lat_summary([x for r in res for x in r["lat_ms"]]),
        "server_cpu_pct": sampler.cpu_pct,
        "server_rss_mib": sampler.max_rss,
        "gen_cpu": gen_cpu(res, deliveries),
        "gen_us_per_msg": gen_us_per_msg(res, deliveries),
        "errors": errors,
    }


def run_idle(target: Target, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = args.idle
    pool = target.users[: max(1, min(len(target.users), args.idle_users))]
    per = [len(c) for c in split(list(range(n)), args.workers)]
    specs = []
    for w, k in enumerate(per):
        specs.append(
            {
                "kind": "idle",
                "url": target.url,
                "vhost": target.vhost,
                "users": pool[w :: args.workers] or pool,
                "connections": k,
                "heartbeat_ms": 10_000,
                "concurrency": 64,
                "hold": args.hold,
                "connect_timeout": 300,
                "seed": w,
                "timeout": args.hold + 420,
            }
        )
    with ProcSampler(target.pid) as sampler:
        rss0 = sampler.rss_mib()
        workers = Workers(specs, tmp)
        workers.wait_event("ready", 60)
        t0 = time.time() + 0.2
        workers.go(t0)
        conn_events = workers.wait_event("connected", 330)
        connected_at = max(e["at"] for e in conn_events)
        rss_connected = sampler.rss_mib()
        res = workers.results(args.hold + 400)
        rss_held = sampler.max_rss
    connected = sum(r["connected"] for r in res)
    failures: dict[str, int] = {}
    for r in res:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    return {
        "server": target.name,
        "requested": n,
        "connected": connected,
        "connect_s": connected_at - t0,
        "connect_per_s": connected / max(1e-6, connected_at - t0),
        "connect_ms": lat_summary([x for r in res for x in r["connect_ms"]]),
        "failures": failures,
        "dropped_during_hold": sum(r["dropped_during_hold"] for r in res),
        "alive_at_end": sum(r["alive_at_end"] for r in res),
        "hold_s": args.hold,
        "rss_before_mib": rss0,
        "rss_connected_mib": rss_connected,
        "rss_max_mib": rss_held,
        "server_cpu_pct": sampler.cpu_pct,
        "gen_cpu": gen_cpu(res),
    }


# ----------------------------------------------------------------------------- output


def fmt_lat(d: dict[str, float]) -> str:
    return f"{d['p50']:7.1f} {d['p95']:7.1f} {d['p99']:7.1f} {d['max']:8.1f}"


def kill_all(pids: list[int]) -> None:
    """SIGKILL every process of a server at once (a crash: no shutdown code runs)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stored_ids(db_path: Path, prefix: str) -> set[str]:
    """The clientMessageIds starting with `prefix` in a server's SQLite database (opening it
    after a crash recovers its WAL, as the server's next start would)."""
    import sqlite3

    db = sqlite3.connect(db_path)
    try:
        rows = db.execute(
            "SELECT client_message_id FROM messages WHERE client_message_id LIKE ?",
            (prefix + "%",),
        )
        return {cmid for (cmid,) in rows}
    finally:
        db.close()


def crash_check(
    tmp: Path, args: argparse.Namespace, run: str, rate: float, extra: dict[str, str]
) -> dict[str, Any]:
    """Workload 1's claim "every receipted message is durable", checked with a crash.

    A fresh server (its own data dir) runs workload 1 at `rate`; halfway through the
    phase the server process and its SQLite writer are SIGKILLed together. Then every
    clientMessageId the load generator got a RECEIPT for must be in the database file.
    What a process crash cannot show: a power cut (that is fsync's part,
    `synchronous=FULL`)."""
    crash_dir = tmp / "crash"
    crash_dir.mkdir()
    target, server = start_ours(crash_dir, args.users, run, 0, extra)
    kill_at = args.duration / 2
    try:
        row = run_direct(target, args, rate, args.duration, crash_dir, run, kill_at=kill_at)
    finally:
        server.stop()  # reaps the killed server (or stops it, had the phase failed early)
    receipted: list[str] = row.pop("receipted")
    stored = stored_ids(crash_dir / "data" / "bench.db", run)
    missing = [c for c in receipted if c not in stored]
    return {
        "rate": rate,
        "killed_after_s": kill_at,
        "sent": row["sent"],
        "receipted": len(receipted),
        "stored": len(stored),
        "missing": len(missing),
        "missing_sample": missing[:10],
        "exit_code": server.proc.returncode,
    }


def print_direct(row: dict[str, Any], label: str) -> None:
    print(
        f"  {row['server']:<9} {label:<10} {row['offered']:>7.0f} {row['delivered_per_s']:>9.0f} "
        f"{fmt_lat(row['lat'])}  {row['receipt']['p99']:7.1f} "
        f"{row['delivered']:>7}/{row['receipts']:<7} {row['lost']:>4} "
        f"{row['server_cpu_pct']:5.0f}% {row['server_rss_mib']:6.0f}  {row['gen_cpu']}"
        f"{'  ok' if row['sustainable'] else '  NOT sustainable'}"
        f"{'  errors: ' + json.dumps(row['errors']) if row['errors'] else ''}"
    )


DIRECT_HEAD = (
    "  server    phase       offered  deliv/s     p50     p95     p99      max  rcpt99 "
    " delivered/rcpt   lost  s.cpu  s.rss  load-gen cpu (sum, per worker, per delivered msg)"
)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"ours": "-", "rabbitmq": "--"}
    colors = {"p50": "tab:blue", "p95": "tab:orange", "p99": "tab:red"}
    for server, rows in results.get("ramp", {}).items():
        rows = sorted(rows, key=lambda r: r["offered"])
        x = [r["offered"] for r in rows]
        for q in ("p50", "p95", "p99"):
            label = "SecureCollab" if server == "ours" else "RabbitMQ Web-STOMP"
            ax.plot(
                x,
                [r["lat"][q] for r in rows],
                styles.get(server, ":"),
                marker="o",
                color=colors[q],
                label=f"{label} {q}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, msg/s (workload 1: 1:1 persisted, receipts)")
    ax.set_ylabel("send -> deliver latency, ms (log)")
    ax.set_title(results.get("title", "latency vs offered rate"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    p.add_argument("--only", choices=["ours", "rabbitmq", "both"], default="both")
    p.add_argument("--workloads", default="1,2,3,4", help="comma list of 1,2,3,4")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="load-generator processes (1 measured cheapest per message on 2 cores, and"
        " enough: RabbitMQ workload 1 at 7,500 msg/s took 37 %% of one core)",
    )
    p.add_argument("--users", type=int, default=200, help="workload 1 users")
    p.add_argument(
        "--pairing",
        choices=("next", "shuffled"),
        default="next",
        help="workload 1: user i sends to i+1 (next) or along a fixed random cycle (shuffled)",
    )
    p.add_argument("--rate", type=float, default=1000, help="workload 1 fixed rate, msg/s")
    p.add_argument("--duration", type=float, default=10, help="seconds per workload-1 phase")
    p.add_argument(
        "--ramp",
        default=(
            "250,500,1000,2000,3000,4000,4500,5000,5500,6000,6500,7000,7500,8000,8500,9000,"
            "9500,10000,10500,11000,11500,12000,13000,14000,16000"
        ),
        help="offered rates for the max-sustainable search (stops at the first failure;"
        " a server that passes the last step is reported as 'at least' that)",
    )
    p.add_argument(
        "--crash-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours, with workload 1: a last phase at the max sustainable rate on a fresh"
        " server, SIGKILLed halfway; every receipted message must be in its database",
    )
    p.add_argument("--fanout-subs", type=int, default=1000)
    p.add_argument("--fanout-rate", type=float, default=10, help="workload 2 msg/s")
    p.add_argument("--fanout-duration", type=float, default=10)
    p.add_argument("--idle", type=int, default=10_000, help="workload 3 connections")
    p.add_argument("--idle-users", type=int, default=1000, help="accounts they log in as")
    p.add_argument("--hold", type=float, default=60, help="workload 3 hold time, s")
    p.add_argument("--rest-concurrency", type=int, default=8)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env for our server, e.g. SECURECOLLAB_STORE__BATCH_WAIT_MS=2 (repeatable)",
    )
    p.add_argument("--json", type=Path, default=ROOT / "scripts/results/bench_results.json")
    p.add_argument("--plot", type=Path, default=ROOT / "scripts/results/bench_latency.png")
    a = p.parse_args(argv)
    if a.quick:
        a.users, a.rate, a.duration = min(a.users, 20), min(a.rate, 200), min(a.duration, 2)
        a.ramp = "200,400"
        a.fanout_subs, a.fanout_rate, a.fanout_duration = min(a.fanout_subs, 40), 5, 2
        a.idle, a.idle_users, a.hold = min(a.idle, 200), 20, min(a.hold, 2)
        a.workers = min(a.workers, 2)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server subprocess and workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wl = {int(x) for x in args.workloads.split(",") if x}
    nofile = raise_nofile()
    servers = ["ours", "rabbitmq"] if args.only == "both" else [args.only]
    run = uuid.uuid4().hex[:6]
    print(f"bench run {run}: {' '.join(sys.argv)}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
        f"; open files {nofile}; {args.workers} load processes"
    )
    print(
        "our server overrides: "
        + " ".join(f"{k}={v}" for k, v in OUR_ENV.items())
        + "".join(f" {kv}" for kv in args.server_env)
    )
    results: dict[str, Any] = {
        "run": run,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "fixed": {},
        "ramp": {},
        "fanout": {},
        "idle": {},
        "rest": {},
        "notes": {},
    }
    n_users = max(
        args.users, args.fanout_subs + 1 if 2 in wl else 0, args.idle_users if 3 in wl else 0
    )
    failed = False
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for name in servers:
            server: OurServer | None = None
            if name == "ours":
                extra = dict(kv.split("=", 1) for kv in args.server_env)
                target, server = start_ours(
                    tmp, n_users, run, args.fanout_subs if 2 in wl else 0, extra
                )
            else:
                target = start_rabbit(n_users)
                results["notes"]["rabbitmq"] = target.notes
            try:
                if 1 in wl:
                    print(
                        f"\n[{name}] workload 1: 1:1 persisted, {args.users} users, receipts,"
                        f" pairing {args.pairing}; {args.duration:g} s per phase (latency ms)"
                    )
                    print(DIRECT_HEAD)
                    row = run_direct(target, args, args.rate, args.duration, tmp, run)
                    results["fixed"][name] = row
                    print_direct(row, "fixed")
                    ramp = []
                    for rate in [float(x) for x in args.ramp.split(",") if x]:
                        row = run_direct(target, args, rate, args.duration, tmp, run)
                        ramp.append(row)
                        print_direct(row, "ramp")
                        if not row["sustainable"]:
                            break
                    results["ramp"][name] = ramp
                    ok = [r for r in ramp if r["sustainable"]]
                    best = max((r["delivered_per_s"] for r in ok), default=0.0)
                    results.setdefault("max_sustainable", {})[name] = best
                    # every step passed: the server's real maximum is above the ramp
                    capped = bool(ramp) and len(ok) == len(ramp)
                    results.setdefault("max_capped", {})[name] = capped
                    print(
                        f"  max sustainable (delivered >= 95% of offered, no loss, p99 < 1 s):"
                        f" {'at least ' if capped else ''}{best:.0f} msg/s delivered"
                        + (" (the ramp's last step passed)" if capped else "")
                    )
                    failed |= any(r["lost"] for r in [results["fixed"][name], *ramp])
                if 2 in wl:
                    print(
                        f"\n[{name}] workload 2: channel fan-out, 1 sender ->"
                        f" {args.fanout_subs} subscribers, {args.fanout_rate:g} msg/s for"
                        f" {args.fanout_duration:g} s"
                    )
                    f = unless_skipped(
                        target,
                        args.fanout_subs + 1,
                        results["fanout"],
                        functools.partial(run_fanout, target, args, tmp, run),
                    )
                if 2 in wl and f is not None:
                    print(
                        f"  deliveries {f['deliveries']}/{f['expected_deliveries']}"
                        f" ({f['deliveries_per_s']:.0f}/s), subscribers complete"
                        f" {f['subs_complete']}/{f['subscribers']}, receipts"
                        f" {f['receipts']}/{f['sent']}"
                    )
                    print(f"  last-subscriber latency ms p50/p95/p99/max: {fmt_lat(f['last_sub'])}")
                    print(f"  any-subscriber latency ms p50/p95/p99/max:  {fmt_lat(f['any_sub'])}")
                    print(
                        f"  server cpu {f['server_cpu_pct']:.0f}%, rss {f['server_rss_mib']:.0f}"
                        f" MiB; load-gen cpu {f['gen_cpu']}"
                        f"{'; errors ' + json.dumps(f['errors']) if f['errors'] else ''}"
                    )
                if 3 in wl:
                    print(
                        f"\n[{name}] workload 3: {args.idle} idle connections, heart-beat"
                        f" 10000,10000, held {args.hold:g} s"
                    )
                    i = unless_skipped(
                        target,
                        args.idle,
                        results["idle"],
                        functools.partial(run_idle, target, args, tmp),
                    )
                if 3 in wl and i is not None:
                    print(
                        f"  connected {i['connected']}/{i['requested']} in {i['connect_s']:.1f} s"
                        f" ({i['connect_per_s']:.0f}/s; connect ms p50/p95/p99/max"
                        f" {fmt_lat(i['connect_ms'])})"
                    )
                    print(
                        f"  server rss: before {i['rss_before_mib']:.0f} MiB, all connected"
                        f" {i['rss_connected_mib']:.0f} MiB, max {i['rss_max_mib']:.0f} MiB;"
                        f" cpu {i['server_cpu_pct']:.0f}%; load-gen cpu {i['gen_cpu']}"
                    )
                    print(
                        f"  dropped during hold: {i['dropped_during_hold']}, alive at end:"
                        f" {i['alive_at_end']}"
                        f"{'; failures ' + json.dumps(i['failures']) if i['failures'] else ''}"
                    )
                if 4 in wl and name == "ours":
                    print(
                        f"\n[{name}] workload 4: REST history paging + send-message"
                        f" ({args.rest_concurrency} HTTP clients) during workload 1 at"
                        f" {args.rate:g} msg/s"
                    )
                    print(DIRECT_HEAD)
                    row = run_direct(target, args, args.rate, args.duration, tmp, run, rest=True)
                    results["rest"][name] = row
                    print_direct(row, "w/ REST")
                    for kind, s in row["rest"].items():
                        print(
                            f"  REST {kind:<8} {s['per_s']:7.1f} req/s  ms p50/p95/p99/max"
                            f" {fmt_lat(s)}"
                        )
                    print(
                        f"  REST status codes: {row['rest_codes']}; REST sends delivered over"
                        f" STOMP: {row['rest_delivered_stomp']}"
                    )
                    failed |= bool(row["lost"])
            finally:
                for w in Workers.live:
                    w.kill()
                Workers.live.clear()
                if server is not None:
                    code = server.stop()
                    print(f"[ours] server exit code after SIGTERM: {code}")
                    results["notes"]["ours_exit"] = code
            if name == "ours" and 1 in wl and args.crash_check:
                rate = results.get("max_sustainable", {}).get("ours") or args.rate
                c = crash_check(tmp, args, run, rate, extra)
                results["crash"] = c
                print(
                    f"\n[ours] crash check: workload 1 at {rate:.0f} msg/s on a fresh server,"
                    f" SIGKILL of the server and its SQLite writer {c['killed_after_s']:g} s in:"
                    f" {c['receipted']} SENDs had their RECEIPT, {c['missing']} of them missing"
                    f" from the database ({c['stored']} stored of {c['sent']} sent; the rest"
                    " were in flight)"
                )
                if c["missing"]:
                    print(f"  LOSS: receipted but not stored, e.g. {c['missing_sample']}")
                    failed = True
                if c["exit_code"] != -signal.SIGKILL or not c["receipted"]:
                    # a check that killed nothing, or saw no RECEIPT, proves nothing
                    print(
                        f"  CRASH CHECK INVALID: server exit code {c['exit_code']},"
                        f" {c['receipted']} receipted"
                    )
                    failed = True

    if len(servers) == 2:
        print("\nours / RabbitMQ:")
        ms = results.get("max_sustainable", {})
        if ms.get("rabbitmq"):
            # a capped maximum is a lower bound: the ratio is then a bound too
            capped = results.get("max_capped", {})
            bound = {  # (ours capped, RabbitMQ capped) -> what the ratio is
                (False, True): " (upper bound: RabbitMQ passed the ramp's last step)",
                (True, False): " (lower bound: ours passed the ramp's last step)",
                (True, True): " (both passed the ramp's last step: extend --ramp)",
            }.get((bool(capped.get("ours")), bool(capped.get("rabbitmq"))), "")
            print(
                f"  workload 1 max sustainable delivered msg/s: {ms['ours']:.0f} /"
                f" {ms['rabbitmq']:.0f} = {ms['ours'] / ms['rabbitmq']:.2f}{bound}"
            )
        fx = results["fixed"]
        if "ours" in fx and "rabbitmq" in fx:
            print(
                f"  workload 1 p99 at {args.rate:g} msg/s: {fx['ours']['lat']['p99']:.1f} /"
                f" {fx['rabbitmq']['lat']['p99']:.1f} ms"
            )
        fo = results["fanout"]
        if all("last_sub" in fo.get(n, {}) for n in ("ours", "rabbitmq")):
            print(
                f"  workload 2 last-subscriber p99: {fo['ours']['last_sub']['p99']:.1f} /"
                f" {fo['rabbitmq']['last_sub']['p99']:.1f} ms"
            )
        idl = results["idle"]
        if all("connected" in idl.get(n, {}) for n in ("ours", "rabbitmq")):
            print(
                f"  workload 3 connected: {idl['ours']['connected']} /"
                f" {idl['rabbitmq']['connected']}; max rss {idl['ours']['rss_max_mib']:.0f} /"
                f" {idl['rabbitmq']['rss_max_mib']:.0f} MiB"
            )
        print()
        print(DIFFERENCES)
    results["title"] = f"workload 1 ({args.users} users), run {results['date']}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"results: {args.json}")
    if results["ramp"]:
        try:
            plot(results, args.plot)
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    if failed:
        print(
            "FAILED: receipted messages not delivered or not stored,"
            " or an invalid crash check (see above)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
