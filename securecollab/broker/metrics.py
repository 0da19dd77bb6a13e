"""Prometheus metrics of the broker (registered once, in the default registry)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

CONNECTIONS = Gauge("securecollab_stomp_connections_open", "Open STOMP connections", ["transport"])
CONNECTIONS_TOTAL = Counter(
    "securecollab_stomp_connections", "STOMP connections accepted", ["transport"]
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


class _Count:
    """One label value's count: a plain number, increased on the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopCounter:
    """A counter of the per-frame hot path, exported like a prometheus Counter
    (`<name>_total`, optional labels) by a collector read at scrape time.

    Why not `prometheus_client.Counter`: its `inc()` takes a lock (~0.3 us) and these run
    four or five times per chat message, always on the trio thread, where an
    attribute add is enough. Reading a float while the loop adds to it is safe under the GIL.
    """

    def __init__(self, name: str, documentation: str, label: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._children: dict[str, _Count] = {}
        self._unlabelled = _Count()
        _LOOP_COUNTERS.append(self)

    def labels(self, value: str) -> _Count:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _Count()
        return child

    def inc(self, amount: float = 1) -> None:
        self._unlabelled.value += amount

    def family(self) -> CounterMetricFamily:
        if self.label is None:
            return CounterMetricFamily(self.name, self.documentation, self._unlabelled.value)
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in list(self._children.items()):
            family.add_metric([value], child.value)
        return family


_LOOP_COUNTERS: list[LoopCounter] = []


class _LoopCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        for counter in _LOOP_COUNTERS:
            yield counter.family()


FRAMES_IN = LoopCounter("securecollab_stomp_frames_in", "STOMP frames received", "command")
FRAMES_OUT = LoopCounter(
    "securecollab_stomp_frames_out", "STOMP frames written to clients", "command"
)
WRITES = LoopCounter(
    "securecollab_stomp_writes",
    "Socket writes of frames to clients (one write may carry several frames:"
    " frames_out / writes is the coalescing)",
)
DELIVERIES = LoopCounter(
    "securecollab_stomp_deliveries", "MESSAGE frames delivered to subscriptions", "kind"
)
REGISTRY.register(_LoopCollector())


# Label children cached per value (bounded: STOMP commands, destination kinds).
@cache
def frames_in(command: str) -> _Count:
    return FRAMES_IN.labels(command)


@cache
def frames_out(command: str) -> _Count:
    return FRAMES_OUT.labels(command or "heart-beat")


@cache
def deliveries(kind: str) -> _Count:
    return DELIVERIES.labels(kind)
