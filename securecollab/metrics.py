"""Prometheus metrics: HTTP requests and latency (process metrics come with the client).

Every part registers its metrics once, at import, in prometheus_client's default
registry (the store: `store/metrics.py`; the broker: `broker/metrics.py`); `/metrics`
renders that registry, which also carries the default process, platform and GC
collectors. Counters are therefore per process, not per server instance.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

# seconds; REST handlers that touch the store take ~1 ms, argon2 logins ~100 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "securecollab_http_requests",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "securecollab_http_request_duration_seconds",
    "HTTP request handling time by method and route template, seconds",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_RATE_LIMITED = Counter(
    "securecollab_http_rate_limited",
    "Requests refused with 429, by limit (ip, user, login)",
    ["limit"],
)


class Metrics:
    """The handle the app context carries: observe HTTP requests, render the registry."""

    content_type = CONTENT_TYPE_LATEST
    registry = REGISTRY

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        HTTP_REQUESTS.labels(method, route, str(status)).inc()
        HTTP_LATENCY.labels(method, route).observe(seconds)

    def rate_limited(self, limit: str) -> None:
        HTTP_RATE_LIMITED.labels(limit).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of the default registry."""
        # imported for their side effect: make sure store metrics exist even before a write
        import securecollab.store.metrics  # noqa: F401

        return generate_latest(self.registry)
