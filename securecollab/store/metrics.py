"""Prometheus metrics of the store's group commit (exported by /metrics from the default registry).

Observed by the writer of each adapter once per committed batch, labelled by adapter
("sqlite" or "postgres").
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STORE_BATCH_SIZE = Histogram(
    "securecollab_store_batch_size",
    "Write operations committed together in one group-commit transaction.",
    ["adapter"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)

STORE_COMMIT_SECONDS = Histogram(
    "securecollab_store_commit_seconds",
    "Wall time of one group-commit batch, BEGIN to COMMIT (durable), in seconds.",
    ["adapter"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

STORE_WRITES = Counter(
    "securecollab_store_writes",
    "Write operations run by the store writer; outcome is ok or error.",
    ["adapter", "outcome"],
)
