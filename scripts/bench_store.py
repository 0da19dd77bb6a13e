#!/usr/bin/env python3
"""Store benchmark: durable insert_message commits/s and CPU per write.

For each adapter it runs three bounded cases on a fresh database:

- single: one task awaits one `insert_message` at a time (every write its own commit);
- group:  N tasks (default 64) write concurrently; the store's writer commits them in
  batches (one fsync / one COMMIT for many messages);
- chat:   the chat server's shape (`--chat-writers`, default 200, like workload 1's
  users): each task always writes to the same peer, so after its first message the
  `direct_peers` pair exists (steady state), and the outbox row carries metadata only.

Besides commits/s it reports the CPU each write costs (CPU time / writes; for SQLite the
server process plus its writer process), and for SQLite how that splits between the trio
thread (queueing, sending, waking) and the writer process (`store/sqlite_writer.py`).

Each write is a realistic 1:1 message: ~1 KiB of base64 ciphertext, wrapped keys for
three devices, a clientMessageId, and an outbox row, committed durably (SQLite WAL with
synchronous=FULL; PostgreSQL COMMIT).

SQLite runs in a temporary directory (removed afterwards); PostgreSQL in a throwaway
database created and dropped here (admin URL: --pg-admin, default the local server).

    .venv/bin/python scripts/bench_store.py                # both adapters, 3 s per case
    .venv/bin/python scripts/bench_store.py --seconds 5 --concurrency 128 --adapters sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securecollab.ids import now_ms, uuid7
from securecollab.store import MessageRecord, OutboxRecord, Store, open_store

MAX_WRITES_PER_CASE = 500_000  # hard bound besides the time limit


@dataclass
class Result:
    adapter: str
    case: str
    tasks: int
    writes: int
    seconds: float
    batches: int
    p50_ms: float
    p99_ms: float
    cpu_us: float  # process CPU per write
    main_us: float | None  # trio thread CPU per write (SQLite only)
    writer_us: float | None  # writer thread CPU per write (SQLite only)

    @property
    def rate(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0


def realistic_message(sender: str, recipient: str) -> tuple[MessageRecord, OutboxRecord]:
    mid = uuid7()
    created = now_ms()
    message = MessageRecord(
        id=mid,
        sender_id=sender,
        recipient_id=recipient,
        channel_id=None,
        encrypted_content=base64.b64encode(os.urandom(768)).decode(),
        iv=base64.b64encode(os.urandom(12)).decode(),
        keys={d: base64.b64encode(os.urandom(60)).decode() for d in ("phone", "laptop", "web")},
        created_at=created,
        client_message_id=secrets.token_hex(8),
    )
    event = OutboxRecord(
        id=mid,
        topic="chat.messages",
        key=recipient,
        payload=b'{"id":"%s","from":"%s"}' % (mid.encode(), sender.encode()),
        created_at=created,
    )
    return message, event


def chat_message(sender: str, recipient: str) -> tuple[MessageRecord, OutboxRecord]:
    """What the chat service writes for one 1:1 send (metadata-only outbox payload)."""
    message, _ = realistic_message(sender, recipient)
    payload = json.dumps(
        {
            "id": message.id,
            "from": sender,
            "to": recipient,
            "channelId": None,
            "createdAt": message.created_at,
            "contentBytes": len(message.encrypted_content) * 3 // 4,
        },
        separators=(",", ":"),
    ).encode()
    event = OutboxRecord(
        id=message.id,
        topic="chat.messages",
        key=message.id,
        payload=payload,
        created_at=message.created_at,
    )
    return message, event


async def _writer_cpu(store: Store) -> float | None:
    """The SQLite writer process's CPU time so far (user + system), or None elsewhere."""
    proc = getattr(store, "_proc", None)
    if not store.url.startswith("sqlite:") or proc is None:
        return None
    # let the batch in flight finish: its CPU belongs to this case
    await trio.sleep(0.05)
    with open(f"/proc/{proc.pid}/stat") as f:  # noqa: ASYNC230 - a /proc read, no disk
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_case(store: Store, adapter: str, case: str, tasks: int, seconds: float) -> Result:
    latencies: list[float] = []
    count = 0
    batches_before = store.stats.batches
    deadline = time.perf_counter() + seconds
    chat = case == "chat"
    make = chat_message if chat else realistic_message
    # the CPU spent making the records is the benchmark's, not the store's: measured here
    # once per case, subtracted below (timing each build would cost more than it saves)
    b0 = time.thread_time()
    for _ in range(2000):
        make("a@example.com", "b@example.com")
    build_cpu = (time.thread_time() - b0) / 2000

    async def writer(i: int) -> None:
        nonlocal count
        if chat:
            sender, recipient = f"user{i}@example.com", f"user{(i + 1) % tasks}@example.com"
        else:
            sender, recipient = f"bench{i}@example.com", f"peer{i % 7}@example.com"
        while time.perf_counter() < deadline and count < MAX_WRITES_PER_CASE:
            message, event = make(sender, recipient)
            t0 = time.perf_counter()
            await store.insert_message(message, outbox=[event])
            latencies.append(time.perf_counter() - t0)
            count += 1

    if chat:  # steady state: every pair has exchanged a message before
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                m, e = chat_message(f"user{i}@example.com", f"user{(i + 1) % tasks}@example.com")
                nursery.start_soon(partial(store.insert_message, m, outbox=[e]))
        batches_before = store.stats.batches

    writer_before = await _writer_cpu(store)
    cpu_before, main_before = time.process_time(), time.thread_time()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(writer, i)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before - build_cpu * count
    main = time.thread_time() - main_before - build_cpu * count
    writer_after = await _writer_cpu(store)
    latencies.sort()
    per = 1e6 / count if count else 0.0
    if writer_before is not None and writer_after is not None:
        cpu += writer_after - writer_before  # the writer is another process: add its CPU
    return Result(
        adapter=adapter,
        case=case,
        tasks=tasks,
        writes=count,
        seconds=elapsed,
        batches=store.stats.batches - batches_before,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
        cpu_us=cpu * per,
        main_us=main * per if writer_before is not None else None,
        writer_us=(
            (writer_after - writer_before) * per
            if writer_before is not None and writer_after is not None
            else None
        ),
    )


async def bench_adapter(
    adapter: str,
    url: str,
    seconds: float,
    cases: list[tuple[str, int]],
    batch_max: int,
    wait_ms: float,
) -> list[Result]:
    results = []
    async with open_store(url, batch_max=batch_max, batch_wait_ms=wait_ms) as store:
        await store.migrate()
        await run_case(store, adapter, "warm-up", 1, min(0.5, seconds))
        for case, tasks in cases:
            results.append(await run_case(store, adapter, case, tasks, seconds))
    return results


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each case")
    parser.add_argument("--concurrency", type=int, default=64, help="writer tasks in 'group'")
    parser.add_argument(
        "--chat-writers", type=int, default=200, help="writer tasks in 'chat' (users)"
    )
    parser.add_argument(
        "--cases", default="single,group,chat", help="comma-separated: single, group, chat"
    )
    parser.add_argument("--adapters", default="sqlite,postgres")
    parser.add_argument(
        "--dir",
        default=None,
        help="where SQLite's temporary database goes (e.g. /dev/shm: no disk, so the CPU"
        " numbers are the store's own; commits/s then mean nothing)",
    )
    parser.add_argument("--batch-max", type=int, default=256)
    parser.add_argument("--batch-wait-ms", type=float, default=1.0)
    parser.add_argument(
        "--pg-admin",
        default=os.environ.get(
            "SECURECOLLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL URL allowed to CREATE/DROP DATABASE",
    )
    args = parser.parse_args()
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must be in (0, 60]")
    if not 2 <= args.chat_writers <= 10_000:
        parser.error("--chat-writers must be in [2, 10000]")
    tasks_of = {"single": 1, "group": args.concurrency, "chat": args.chat_writers}
    cases: list[tuple[str, int]] = []
    for name in (c.strip() for c in args.cases.split(",") if c.strip()):
        if name not in tasks_of:
            parser.error(f"unknown case {name!r}")
        cases.append((name, tasks_of[name]))

    results: list[Result] = []
    for adapter in [a.strip() for a in args.adapters.split(",") if a.strip()]:
        if adapter == "sqlite":
            with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
                url = f"sqlite:///{tmp}/bench.db"
                results += trio.run(
                    bench_adapter,
                    adapter,
                    url,
                    args.seconds,
                    cases,
                    args.batch_max,
                    args.batch_wait_ms,
                )
        elif adapter == "postgres":
            name = "sc_bench_" + secrets.token_hex(6)
            base = args.pg_admin.rsplit("/", 1)[0]
            asyncio.run(_pg_admin(args.pg_admin, f'CREATE DATABASE "{name}"'))
            try:
                results += trio.run(
                    bench_adapter,
                    adapter,
                    f"{base}/{name}",
                    args.seconds,
                    cases,
                    args.batch_max,
                    args.batch_wait_ms,
                )
            finally:
                asyncio.run(
                    _pg_admin(args.pg_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                )
        else:
            parser.error(f"unknown adapter {adapter!r}")

    print(
        "insert_message (1 KiB ciphertext + 3 wrapped keys + outbox row),"
        f" {args.seconds:g} s per case"
    )
    columns = [
        ("adapter", "<9"),
        ("case", "<7"),
        ("tasks", ">5"),
        ("writes", ">8"),
        ("commits/s", ">10"),
        ("batches", ">8"),
        ("avg batch", ">9"),
        ("p50 ms", ">8"),
        ("p99 ms", ">8"),
        ("cpu us/w", ">8"),
        ("trio us/w", ">9"),
        ("writer us/w", ">11"),
    ]
    header = " ".join(f"{name:{fmt}}" for name, fmt in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        avg = r.writes / r.batches if r.batches else 0.0
        print(
            f"{r.adapter:<9} {r.case:<7} {r.tasks:>5} {r.writes:>8} {r.rate:>10.0f} {r.batches:>8}"
            f" {avg:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.cpu_us:>8.1f}"
            f" {_opt(r.main_us):>9} {_opt(r.writer_us):>11}"
        )
    by = {(r.adapter, r.case): r for r in results}
    for adapter in dict.fromkeys(r.adapter for r in results):
        single, group = by.get((adapter, "single")), by.get((adapter, "group"))
        if single and group and single.rate:
            print(f"{adapter}: group commit = {group.rate / single.rate:.1f}x single")
    return 0


if __name__ == "__main__":
    sys.exit(main())
