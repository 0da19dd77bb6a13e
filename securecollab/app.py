"""The process: one trio nursery that owns the store, the backplane, jobs and transports.

`main(settings)` is what `securecollab serve` runs under `trio.run`: it installs the
SIGINT/SIGTERM handler and calls `run_server`. Tests call `run_server` directly
(`tests/support/server.py: running_server`) with their own shutdown event.

Startup order: JWT secret -> store (migrated) -> backplane -> services (`build_services`)
-> periodic jobs (`start_jobs`) -> transports (`start_transports`: hypercorn now; the
broker adds its STOMP/TCP listener there). Shutdown (ctx.shutdown set): transports stop
accepting and finish in-flight requests (bounded), jobs are cancelled, then the store
drains pending writes and closes. The whole sequence fits in `[server] shutdown_timeout_s`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig

from securecollab.api.rest import AppHook, create_app
from securecollab.api.stomp_app import build_broker
from securecollab.api.stomp_chat import StompChat
from securecollab.backplane import Backplane
from securecollab.backplane.memory import MemoryBackplane
from securecollab.config import Settings
from securecollab.context import AppContext
from securecollab.metrics import Metrics
from securecollab.netaddr import trusted_networks
from securecollab.services.audit import AuditService
from securecollab.services.auth import AuthService, ensure_jwt_secret
from securecollab.services.channels import ChannelService
from securecollab.services.keys import KeyService
from securecollab.services.messages import MessageService
from securecollab.services.offline import OfflineService
from securecollab.store import Store, open_store
from securecollab.transport.front import serve_front
from securecollab.transport.serve import broker_of, serve_stomp, with_websocket

log = logging.getLogger("securecollab.app")


class StartupError(Exception):
    """The server cannot start (bad adapter URL, unusable data dir...); message is for humans."""


@asynccontextmanager
async def open_backplane(url: str) -> AsyncIterator[Backplane]:
    """The backplane named by `[backplane] url`."""
    if url.startswith("memory://"):
        yield MemoryBackplane()
        return
    raise StartupError(f"backplane.url {url!r}: only memory:// is available in this build")


def store_from_settings(settings: Settings) -> AbstractAsyncContextManager[Store]:
    s = settings.store
    return open_store(
        s.url, batch_max=s.batch_max, batch_wait_ms=s.batch_wait_ms, read_pool=s.read_pool
    )


def build_services(
    settings: Settings,
    store: Store,
    backplane: Backplane,
    nursery: trio.Nursery,
    jwt_secret: bytes,
) -> AppContext:
    """Construct the services into an AppContext (later parts add theirs here)."""
    audit = AuditService(store, retention_days=settings.audit.retention_days)
    auth = AuthService(store, backplane, settings, audit, jwt_secret=jwt_secret)
    ctx = AppContext(
        settings=settings,
        store=store,
        backplane=backplane,
        audit=audit,
        auth=auth,
        metrics=Metrics(),
        nursery=nursery,
    )
    ctx.broker, ctx.presence = build_broker(settings, backplane, auth)  # STOMP broker (issue 4)
    # messaging (issue 5): services, then their STOMP door and broker hooks
    m = settings.messages
    ctx.messages = MessageService(
        store,
        backplane,
        max_content_bytes=m.max_content_bytes,
        offline_ttl_ms=m.offline_ttl_days * 86_400_000,
    )
    ctx.channels = ChannelService(store, backplane, audit)
    ctx.keys = KeyService(store, audit)
    ctx.offline = OfflineService(store)
    StompChat(ctx.broker, store, ctx.messages, ctx.channels, ctx.offline)
    return ctx


def start_jobs(ctx: AppContext) -> None:
    """Periodic jobs in the process nursery (cancelled after the transports stop)."""
    ctx.nursery.start_soon(ctx.audit.prune_forever, ctx.settings.audit.prune_interval_s)
    if ctx.offline is not None:  # messaging (issue 5): expire offline-queue entries
        ctx.nursery.start_soon(
            ctx.offline.run_prune_job, ctx.settings.messages.offline_prune_interval_s
        )


def hypercorn_config(settings: Settings) -> HyperConfig:
    http = settings.http
    cfg = HyperConfig()
    host = f"[{http.host}]" if ":" in http.host else http.host
    cfg.bind = [f"{host}:{http.port}"]
    if http.tls_cert:
        cfg.certfile = http.tls_cert
        cfg.keyfile = http.tls_key
    # hypercorn's grace for in-flight requests; the rest of the budget closes the store
    cfg.graceful_timeout = max(0.2, settings.server.shutdown_timeout_s * 0.6)
    cfg.accesslog = None  # middleware.py writes one JSON line per request
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.include_server_header = False
    return cfg


class FinalSendShield:
    """ASGI wrapper: shield the last body send of an HTTP response from cancellation.

    quart-trio runs each request as two sibling tasks and cancels both once the
    client's disconnect arrives; that can land while hypercorn, inside the final
    `send`, re-arms the keep-alive idle watcher, which then never runs. The
    connection then ignores shutdown and holds it for the whole graceful timeout.
    The shield is bounded so a stuck client cannot hold the task forever.
    """

    def __init__(self, app: Any, *, timeout_s: float = 10.0) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                deadline = trio.current_time() + self.timeout_s
                with trio.CancelScope(shield=True, deadline=deadline):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive, guarded_send)


async def serve_http(
    ctx: AppContext,
    hooks: Sequence[AppHook] = (),
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST (and later /ws) app until ctx.shutdown; started() with the bound port."""
    app = create_app(ctx, extra_hooks=hooks)
    ctx.extras["http_app"] = app
    cfg = hypercorn_config(ctx.settings)
    # /ws: the front door takes WebSocket upgrades itself (transport/front.py); one that
    # comes later on a keep-alive HTTP connection reaches the raw ASGI door instead
    asgi = with_websocket(app, ctx)

    # the real binds ("http://127.0.0.1:43121") come back through task_status, which is
    # how port 0 becomes a known port
    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_front(
            FinalSendShield(asgi),
            cfg,
            lambda: broker_of(ctx),
            shutdown_trigger=ctx.shutdown.wait,
            trusted_proxies=trusted_networks(ctx.settings.http.trusted_proxies),
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        port = int(binds[0].rsplit(":", 1)[1])
        ctx.ports["http"] = port
        log.info("http listening", extra={"fields": {"binds": binds, "tls": ctx.settings.http.tls}})
        task_status.started(port)


async def start_transports(
    ctx: AppContext, nursery: trio.Nursery, hooks: Sequence[AppHook] = ()
) -> None:
    """Start every network door in `nursery`; each returns once ctx.shutdown is set and it drained.

    The broker adds its raw STOMP/TCP listener here (`[stomp] port`, 0 disables).
    """
    await nursery.start(serve_http, ctx, hooks)
    await nursery.start(serve_stomp, ctx)  # STOMP TCP listener; closes sessions on shutdown


async def _bound_shutdown(ctx: AppContext, scope: trio.CancelScope) -> None:
    """Once shutdown starts, give the transports a hard deadline inside the budget."""
    await ctx.shutdown.wait()
    scope.deadline = trio.current_time() + ctx.settings.server.shutdown_timeout_s * 0.8


async def run_server(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    app_hooks: Sequence[AppHook] = (),
    task_status: trio.TaskStatus[AppContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one server until `shutdown` is set; `task_status.started(ctx)` once listening.

    Raises the store's SchemaTooNew / StoreUnavailable, or StartupError, when it cannot
    start. Returns after a clean shutdown (store closed).
    """
    try:
        secret, generated = await trio.to_thread.run_sync(ensure_jwt_secret, settings)
    except (OSError, RuntimeError) as e:
        raise StartupError(f"JWT secret: {e}") from e
    secret_path = settings.server.data_path / "jwt_secret"
    if generated:
        log.warning(
            "no [server] jwt_secret configured: generated one",
            extra={"fields": {"path": str(secret_path)}},
        )
    async with store_from_settings(settings) as store:
        version = await store.migrate()
        log.info(
            "store ready",
            extra={"fields": {"adapter": settings.store.url.split(":", 1)[0], "schema": version}},
        )
        async with (
            open_backplane(settings.backplane.url) as backplane,
            trio.open_nursery() as nursery,
        ):
            ctx = build_services(settings, store, backplane, nursery, secret)
            if shutdown is not None:
                ctx.shutdown = shutdown
            if generated:
                await ctx.audit.record(None, "server.jwt_secret.generated", str(secret_path))
            start_jobs(ctx)
            with trio.CancelScope() as transports_scope:
                nursery.start_soon(_bound_shutdown, ctx, transports_scope)
                async with trio.open_nursery() as transports:
                    await start_transports(ctx, transports, app_hooks)
                    log.info("server ready", extra={"fields": {"ports": ctx.ports}})
                    task_status.started(ctx)
            if transports_scope.cancelled_caught:
                log.warning("transports did not drain in time; cancelled")
            nursery.cancel_scope.cancel()  # periodic jobs
    log.info("server stopped")


async def _watch_signals(
    shutdown: trio.Event,
    force: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not shutdown.is_set():
                log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
                shutdown.set()
            else:
                log.warning("second signal: stopping now")
                force.cancel()


async def main(settings: Settings) -> None:
    """`securecollab serve`: run until SIGINT/SIGTERM, then shut down gracefully."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, nursery.cancel_scope)
        await run_server(settings, shutdown=shutdown)
        nursery.cancel_scope.cancel()
