#!/usr/bin/env python3
"""Store benchmark: durable insert_message commits/s, one writer vs group commit.

For each adapter it runs two bounded cases on a fresh database:

- single: one task awaits one `insert_message` at a time (every write its own commit);
- group:  N tasks (default 64) write concurrently; the store's writer commits them in
  batches (one fsync / one COMMIT for many messages).

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
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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


async def run_case(store: Store, adapter: str, case: str, tasks: int, seconds: float) -> Result:
    latencies: list[float] = []
    count = 0
    batches_before = store.stats.batches
    deadline = time.perf_counter() + seconds

    async def writer(i: int) -> None:
        nonlocal count
        sender, recipient = f"bench{i}@example.com", f"peer{i % 7}@example.com"
        while time.perf_counter() < deadline and count < MAX_WRITES_PER_CASE:
            message, event = realistic_message(sender, recipient)
            t0 = time.perf_counter()
            await store.insert_message(message, outbox=[event])
            latencies.append(time.perf_counter() - t0)
            count += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(writer, i)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Result(
        adapter=adapter,
        case=case,
        tasks=tasks,
        writes=count,
        seconds=elapsed,
        batches=store.stats.batches - batches_before,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
    )


async def bench_adapter(
    adapter: str, url: str, seconds: float, concurrency: int, batch_max: int, wait_ms: float
) -> list[Result]:
    results = []
    async with open_store(url, batch_max=batch_max, batch_wait_ms=wait_ms) as store:
        await store.migrate()
        await run_case(store, adapter, "warm-up", 1, min(0.5, seconds))
        results.append(await run_case(store, adapter, "single", 1, seconds))
        results.append(await run_case(store, adapter, "group", concurrency, seconds))
    return results


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each case")
    parser.add_argument("--concurrency", type=int, default=64, help="writer tasks in 'group'")
    parser.add_argument("--adapters", default="sqlite,postgres")
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

    results: list[Result] = []
    for adapter in [a.strip() for a in args.adapters.split(",") if a.strip()]:
        if adapter == "sqlite":
            with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
                url = f"sqlite:///{tmp}/bench.db"
                results += trio.run(
                    bench_adapter,
                    adapter,
                    url,
                    args.seconds,
                    args.concurrency,
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
                    args.concurrency,
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
    ]
    header = " ".join(f"{name:{fmt}}" for name, fmt in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        avg = r.writes / r.batches if r.batches else 0.0
        print(
            f"{r.adapter:<9} {r.case:<7} {r.tasks:>5} {r.writes:>8} {r.rate:>10.0f} {r.batches:>8}"
            f" {avg:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
        )
    by = {(r.adapter, r.case): r for r in results}
    for adapter in dict.fromkeys(r.adapter for r in results):
        single, group = by.get((adapter, "single")), by.get((adapter, "group"))
        if single and group and single.rate:
            print(f"{adapter}: group commit = {group.rate / single.rate:.1f}x single")
    return 0


if __name__ == "__main__":
    sys.exit(main())
