"""Gateway behaviour: rate limits, CORS, security headers, TLS/HSTS, uniform JSON errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from quart import Quart

from securecollab.context import AppContext
from tests.support.server import (
    bearer,
    register_and_login,
    running_server,
    self_signed_cert,
    tls_client_context,
)

SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _assert_json_error(r: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]
    return body


def _assert_security_headers(r: httpx.Response, *, tls: bool = False) -> None:
    for k, v in SECURITY_HEADERS.items():
        assert r.headers.get(k) == v, k
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert ("strict-transport-security" in r.headers) is tls


# ----------------------------------------------------------------------------- rate limits


async def test_rest_rate_limit_per_user(tmp_path: Path) -> None:
    async with running_server(tmp_path, http__rate_limit_user_per_min=3) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            a = await register_and_login(c, "a@example.com")
            b = await register_and_login(c, "b@example.com")
            for _ in range(3):
                assert (await c.get("/api/users/me", headers=bearer(a["token"]))).status_code == 200
            r = await c.get("/api/users/me", headers=bearer(a["token"]))
            _assert_json_error(r, 429, "rate_limited")
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            _assert_security_headers(r)
            # the limit is per user: b still has its budget
            assert (await c.get("/api/users/me", headers=bearer(b["token"]))).status_code == 200


async def test_rest_rate_limit_per_ip(tmp_path: Path) -> None:
    async with running_server(tmp_path, http__rate_limit_ip_per_min=5) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            for _ in range(5):
                assert (await c.get("/api/users/me")).status_code == 401
            r = await c.get("/api/users/me")
            _assert_json_error(r, 429, "rate_limited")
            assert int(r.headers["Retry-After"]) >= 1
            r = await c.post(
                "/api/auth/login", json={"username": "x@example.com", "password": "y" * 12}
            )
            _assert_json_error(r, 429, "rate_limited")
            # probes are never limited
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 200


# ----------------------------------------------------------------------------- CORS


async def test_cors_allowed_origin_and_preflight(tmp_path: Path) -> None:
    origin = "https://chat.example.com"
    async with running_server(tmp_path, http__cors_origins=[origin]) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            r = await c.options(
                "/api/users/me",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert r.status_code == 204
            assert r.headers["access-control-allow-origin"] == origin
            assert "GET" in r.headers["access-control-allow-methods"]
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = await c.get("/healthz", headers={"Origin": origin})
            assert r.headers["access-control-allow-origin"] == origin
            assert "Origin" in r.headers["vary"]
            # a different origin gets no CORS grant; its preflight is refused
            r = await c.get("/healthz", headers={"Origin": "https://evil.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
            r = await c.options(
                "/api/auth/login",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
            _assert_json_error(r, 403, "cors_origin_denied")
            assert "access-control-allow-origin" not in r.headers


async def test_cors_denies_every_origin_by_default(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        r = await c.options(
            "/api/auth/login",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        _assert_json_error(r, 403, "cors_origin_denied")
        r = await c.get("/healthz", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------- headers


async def test_security_headers_and_request_id_on_every_response(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.base_url) as c:
        responses = [
            await c.get("/healthz"),
            await c.get("/nope"),
            await c.get("/api/users/me"),
            await c.post(
                "/api/auth/login", content=b"{", headers={"content-type": "application/json"}
            ),
        ]
        for r in responses:
            _assert_security_headers(r)
            assert len(r.headers["x-request-id"]) >= 16
        assert responses[2].headers["cache-control"] == "no-store"
        r = await c.get("/healthz", headers={"X-Request-Id": "trace-abc.123"})
        assert r.headers["x-request-id"] == "trace-abc.123"
        # an unusable id (too long / odd characters) is replaced, not echoed
        r = await c.get("/healthz", headers={"X-Request-Id": "x" * 300})
        assert r.headers["x-request-id"] != "x" * 300


async def test_tls_serves_https_with_hsts(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    async with running_server(tmp_path, http__tls_cert=str(cert), http__tls_key=str(key)) as srv:
        assert srv.base_url.startswith("https://")
        async with httpx.AsyncClient(base_url=srv.base_url, verify=tls_client_context(cert)) as c:
            r = await c.get("/healthz")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            _assert_security_headers(r, tls=True)
            assert "max-age=" in r.headers["strict-transport-security"]
        # plain HTTP on the TLS port does not get an answer
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}") as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")


# ----------------------------------------------------------------------------- errors


async def test_uniform_json_errors(tmp_path: Path) -> None:
    async with running_server(tmp_path, http__max_body_bytes=2048) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            _assert_json_error(await c.get("/no/such/route"), 404, "not_found")
            _assert_json_error(await c.get("/api/no/such/route"), 404, "not_found")
            r = await c.delete("/healthz")
            _assert_json_error(r, 405, "method_not_allowed")
            assert "GET" in r.headers["allow"]
            _assert_json_error(await c.get("/api/auth/login"), 405, "method_not_allowed")
            # malformed JSON -> 400
            r = await c.post(
                "/api/auth/login",
                content=b'{"username": ',
                headers={"content-type": "application/json"},
            )
            _assert_json_error(r, 400, "invalid_json")
            # missing fields, wrong types, not an object -> 422 naming the field
            body = _assert_json_error(
                await c.post("/api/auth/login", json={"username": "a@b.c"}), 422, "validation_error"
            )
            assert "password" in body["detail"]
            body = _assert_json_error(
                await c.post("/api/auth/login", json={"username": 5, "password": ["x"]}),
                422,
                "validation_error",
            )
            assert "username" in body["detail"] and "password" in body["detail"]
            _assert_json_error(
                await c.post("/api/auth/login", json=[1, 2]), 422, "validation_error"
            )
            _assert_json_error(
                await c.post("/api/auth/register", json="text"), 422, "validation_error"
            )
            # not JSON at all -> 415
            r = await c.post(
                "/api/auth/login", content=b"username=a", headers={"content-type": "text/plain"}
            )
            _assert_json_error(r, 415, "unsupported_media_type")
            # oversize body (declared and streamed) -> 413
            big = b'{"username": "' + b"a" * 4096 + b'", "password": "x"}'
            r = await c.post(
                "/api/auth/login", content=big, headers={"content-type": "application/json"}
            )
            _assert_json_error(r, 413, "request_entity_too_large")

            async def chunks():  # no Content-Length: the limit must hold while streaming
                for _ in range(8):
                    yield b" " * 1024

            r = await c.post(
                "/api/auth/login", content=chunks(), headers={"content-type": "application/json"}
            )
            _assert_json_error(r, 413, "request_entity_too_large")
            # and the server is fine afterwards
            assert (await c.get("/healthz")).status_code == 200


def _boom_route(app: Quart, ctx: AppContext) -> None:
    @app.get("/test/boom")
    async def boom() -> str:
        raise RuntimeError("secret internals /etc/passwd")


async def test_unexpected_exception_is_500_json_without_traceback(tmp_path: Path) -> None:
    async with running_server(tmp_path, app_hooks=[_boom_route]) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            r = await c.get("/test/boom", headers={"X-Request-Id": "req-500"})
            assert r.status_code == 500
            body = r.json()
            assert body == {
                "error": "internal_error",
                "detail": "internal server error",
                "requestId": "req-500",
            }
            assert "Traceback" not in r.text and "secret internals" not in r.text
            _assert_security_headers(r)
            assert (await c.get("/healthz")).status_code == 200


def _slow_route(app: Quart, ctx: AppContext) -> None:
    @app.get("/test/slow")
    async def slow() -> dict[str, str]:
        ctx.extras["slow_started"].set()
        await trio.sleep(0.5)
        return {"done": "yes"}


async def test_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    result: dict[str, httpx.Response] = {}
    async with running_server(tmp_path, app_hooks=[_slow_route]) as srv:
        srv.ctx.extras["slow_started"] = trio.Event()
        async with httpx.AsyncClient(base_url=srv.base_url) as c, trio.open_nursery() as n:

            async def call() -> None:
                result["r"] = await c.get("/test/slow")

            n.start_soon(call)
            await srv.ctx.extras["slow_started"].wait()
            srv.ctx.shutdown.set()  # graceful shutdown begins while the request runs
    assert result["r"].status_code == 200 and result["r"].json() == {"done": "yes"}
