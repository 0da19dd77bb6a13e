"""What both adapters' writers share: the pending-write record, the batching policy, stats.

A caller's write becomes a `WriteOp` queued to the adapter's single writer. The writer
takes every pending op (up to `batch_max`), runs them all in one transaction, commits once,
then completes every op on the trio thread (`finish_batch`), which wakes its waiter.
Optimistic: the batch first runs without savepoints (they cost statements, or round trips
on PostgreSQL, per op); only when an op raises is the transaction rolled back and the batch
replayed with one SAVEPOINT per op, so a failing op still fails only itself. An op must
therefore be safe to run twice (it is: a function of the connection, its effects rolled back).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

from securecollab.store import BatchStats, StoreStats
from securecollab.store.metrics import STORE_BATCH_SIZE, STORE_COMMIT_SECONDS, STORE_WRITES

T = TypeVar("T")

#: How many recent batches `StoreStats.last_batches` keeps (oldest dropped first).
BATCH_HISTORY = 1000


class WriteOp(Generic[T]):
    """One queued write: the function the writer runs, then its outcome.

    `fn` receives the writer's connection: a sqlite3.Connection (and returns the result),
    or an asyncpg.Connection (and returns an awaitable of the result). `result` starts as
    given (SQLite gives a message insert its created-message result up front, so the writer
    need not send it back); `result`/`error` are set by the writer; `complete()` is called
    on the trio thread once the batch's fate is known, and wakes the task parked in
    `wait()` (directly: no Event per write).
    """

    __slots__ = ("_done", "_task", "error", "fn", "result")

    def __init__(self, fn: Callable[[Any], Any], result: T | None = None) -> None:
        self.fn = fn
        self.result = result
        self.error: BaseException | None = None
        self._done = False
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> T:
        """Wait until the op's batch is committed (or failed); return or raise its outcome.

        One waiter per op. A cancelled wait raises Cancelled as usual; the write itself
        still commits (or fails) with its batch.
        """
        if self._done:
            await trio.lowlevel.checkpoint()
        else:
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def complete(self) -> None:
        """Mark the outcome final and wake the waiter, if any. Call on the trio thread only."""
        self._done = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)


class BatchPolicy:
    """When the writer should wait for more ops before committing.

    It always takes everything already pending (up to `batch_max`). It then lingers up to
    `batch_wait_ms` for stragglers only when it sees concurrency (more than one op pending
    now or in the previous batch): a lone writer awaiting one write at a time is never
    delayed, while many concurrent writers fill bigger batches.
    """

    def __init__(self, batch_max: int, batch_wait_ms: float) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")
        self.batch_max = batch_max
        self.wait_seconds = batch_wait_ms / 1000.0
        self._last_size = 0

    def linger_seconds(self, size_now: int) -> float:
        """How long to keep collecting, given `size_now` ops already taken."""
        if size_now >= self.batch_max or self.wait_seconds <= 0:
            return 0.0
        if size_now > 1 or self._last_size > 1:
            return self.wait_seconds
        return 0.0

    def batch_done(self, size: int) -> None:
        self._last_size = size


class BatchMetrics:
    """One adapter's Prometheus children, labelled once (`labels()` per batch costs a lock)."""

    def __init__(self, adapter: str) -> None:
        self.size = STORE_BATCH_SIZE.labels(adapter)
        self.seconds = STORE_COMMIT_SECONDS.labels(adapter)
        self.ok = STORE_WRITES.labels(adapter, "ok")
        self.error = STORE_WRITES.labels(adapter, "error")

    def observe(self, ops: list[WriteOp[Any]], seconds: float, *, failed: int | None) -> None:
        """Record one batch (thread-safe; called by the writer).

        `failed` is how many ops failed when the writer knows it (0 after a clean
        optimistic pass); None makes it count the ops' errors.
        """
        if failed is None:
            failed = sum(1 for op in ops if op.error is not None)
        self.size.observe(len(ops))
        self.seconds.observe(seconds)
        if len(ops) - failed:
            self.ok.inc(len(ops) - failed)
        if failed:
            self.error.inc(failed)


def finish_batch(stats: StoreStats, ops: list[WriteOp[Any]], seconds: float) -> None:
    """Update `stats` and wake every waiter of the batch. Call on the trio thread only."""
    stats.batches += 1
    stats.writes += len(ops)
    stats.last_batches.append(BatchStats(size=len(ops), seconds=seconds))
    if len(stats.last_batches) > BATCH_HISTORY:
        del stats.last_batches[0]
    reschedule = trio.lowlevel.reschedule
    for op in ops:  # op.complete() inlined: this loop runs once per write
        op._done = True
        task = op._task
        if task is not None:
            op._task = None
            reschedule(task)


def monotonic() -> float:
    """Clock for commit timings, in seconds."""
    return time.perf_counter()
