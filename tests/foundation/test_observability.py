"""Health, readiness, metrics, the OpenAPI document and /docs, audit retention."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import trio
from quart import Quart

from securecollab.ids import now_ms
from securecollab.services.audit import DAY_MS
from securecollab.store import AuditRecord, StoreUnavailable
from tests.support.server import ServerHandle, bearer, register_and_login, running_server

# every route the foundation serves, as documented
FOUNDATION_ROUTES = {
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
    ("/api/auth/register", "post"),
    ("/api/auth/login", "post"),
    ("/api/auth/refresh", "post"),
    ("/api/auth/logout", "post"),
    ("/api/users/me", "get"),
}


async def test_healthz_and_readyz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready"}

        async def unreachable() -> None:
            raise StoreUnavailable("connection refused")

        monkeypatch.setattr(srv.ctx.store, "ping", unreachable)
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert (await c.get("/healthz")).status_code == 200  # alive, just not ready

        async def driver_bug() -> None:  # an error the store did not map
            raise ValueError("cannot switch to state 12")

        monkeypatch.setattr(srv.ctx.store, "ping", driver_bug)
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"


async def test_readyz_503_while_shutting_down(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        # a fresh event that is set, so the real one (which stops hypercorn) stays unset
        ev = trio.Event()
        ev.set()
        real, srv.ctx.shutdown = srv.ctx.shutdown, ev
        try:
            r = await c.get("/readyz")
        finally:
            srv.ctx.shutdown = real
        assert r.status_code == 503 and r.json()["error"] == "shutting_down"


async def test_metrics_token_when_configured(tmp_path: Path) -> None:
    token = "m3trics-" + "x" * 24
    async with (
        running_server(tmp_path, http__metrics_token=token) as srv,
        httpx.AsyncClient(base_url=srv.base_url) as c,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = await c.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"] == "unauthorized" and r.json()["detail"]
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "process_cpu_seconds_total" in r.text
        # health stays public
        assert (await c.get("/healthz")).status_code == 200


async def test_metrics_counts_requests_and_exports_store_and_process(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        login = await register_and_login(c, "m@example.com")
        for _ in range(3):
            await c.get("/api/users/me", headers=bearer(login["token"]))
        await c.get("/nope/12345")
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        m = re.search(
            r"securecollab_http_requests_total"
            r'\{method="GET",route="/api/users/me",status="200"\} (\d+)',
            text,
        )
        assert m and float(m.group(1)) >= 3
        # unknown paths are counted under one label, not one series per path
        assert 'route="unmatched",status="404"' in text and "/nope/12345" not in text
        assert "securecollab_http_request_duration_seconds_bucket" in text
        assert "securecollab_store_batch_size" in text  # group commit (register/login wrote)
        assert "process_cpu_seconds_total" in text  # process metrics


async def test_openapi_describes_every_route(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        assert doc["openapi"].startswith("3.1")
        documented = {(p, m) for p, item in doc["paths"].items() for m in item}
        assert FOUNDATION_ROUTES <= documented
        # every route the app serves (except the doc endpoints themselves) is documented
        app_rules = {
            (re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method.lower())
            for rule in _app(srv).url_map.iter_rules()
            if rule.rule not in ("/openapi.json", "/docs") and not rule.websocket
            for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")
        }
        assert app_rules <= documented
        login = doc["paths"]["/api/auth/login"]["post"]
        assert login["security"] == []  # public
        schema = login["requestBody"]["content"]["application/json"]["schema"]
        assert "password" in str(doc["components"]["schemas"]) or "password" in str(schema)
        me = doc["paths"]["/api/users/me"]["get"]
        assert me.get("security", doc["security"]) == [{"bearer": []}]
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def _app(srv: ServerHandle) -> Quart:
    """The Quart app serving srv."""
    app: Quart = srv.ctx.extras["http_app"]
    return app


async def test_docs_page_is_self_contained(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        for path, _ in FOUNDATION_ROUTES:
            assert path in html
        # nothing loads from elsewhere: no scripts, no external URLs, CSP allows only its own style
        assert "<script" not in html.lower()
        assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "http" not in csp
        assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", csp)


async def test_audit_retention_job_prunes_old_entries(tmp_path: Path) -> None:
    async with running_server(tmp_path, audit__retention_days=1, audit__prune_interval_s=1) as srv:
        store = srv.ctx.store
        now = now_ms()
        await store.append_audit(AuditRecord(None, "test.old", None, now - 2 * DAY_MS))
        await store.append_audit(AuditRecord(None, "test.recent", None, now - DAY_MS // 2))
        with trio.fail_after(10):
            # polling the store: the job has no event to wait on (bounded by fail_after)
            while any(  # noqa: ASYNC110
                a.action == "test.old" for a in await store.list_audit(action_prefix="test.")
            ):
                await trio.sleep(0.1)
        assert [a.action for a in await store.list_audit(action_prefix="test.")] == ["test.recent"]
