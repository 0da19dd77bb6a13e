"""Prometheus metrics of the broker (registered once, in the default registry)."""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge

CONNECTIONS = Gauge("securecollab_stomp_connections_open", "Open STOMP connections", ["transport"])
CONNECTIONS_TOTAL = Counter(
    "securecollab_stomp_connections", "STOMP connections accepted", ["transport"]
)
FRAMES_IN = Counter("securecollab_stomp_frames_in", "STOMP frames received", ["command"])
FRAMES_OUT = Counter(
    "securecollab_stomp_frames_out", "STOMP frames written to clients", ["command"]
)
WRITES = Counter(
    "securecollab_stomp_writes",
    "Socket writes of frames to clients (one write may carry several frames:"
    " frames_out / writes is the coalescing)",
)
DELIVERIES = Counter(
    "securecollab_stomp_deliveries", "MESSAGE frames delivered to subscriptions", ["kind"]
)
DROPS = Counter("securecollab_stomp_drops", "Frames or messages dropped", ["reason"])
SLOW_CONSUMER_DISCONNECTS = Counter(
    "securecollab_stomp_slow_consumer_disconnects",
    "Sessions closed because their outbound queue was full",
)
ERRORS = Counter("securecollab_stomp_errors", "ERROR frames sent (each closes its session)")
PRESENCE = Gauge(
    "securecollab_presence_users", "Users with a session on this node, by status", ["status"]
)


# Cached label children for the per-frame counters: `labels()` takes a lock and builds
# a key on every call; these run several times per message. Label values are bounded
# (STOMP commands, destination kinds).
@cache
def frames_in(command: str) -> Any:
    return FRAMES_IN.labels(command)


@cache
def frames_out(command: str) -> Any:
    return FRAMES_OUT.labels(command or "heart-beat")


@cache
def deliveries(kind: str) -> Any:
    return DELIVERIES.labels(kind)
