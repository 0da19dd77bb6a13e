"""Gateway behaviour around every REST request.

Order per request (before the route): request id -> CORS preflight -> per-IP rate
limit -> authentication (every `/api/...` route unless marked `@public`) -> per-user
rate limit. After the route: security headers, CORS headers, request id echo, metrics
and one JSON access-log line (path without query string; never bodies or headers).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from quart import Quart, Response, current_app, g, request
from quart_schema import security_scheme
from quart_trio.wrappers import TrioRequest

from securecollab.api import client_json
from securecollab.api.rest.errors import InvalidJson, InvalidParameter, NotJson, error_response
from securecollab.context import AppContext
from securecollab.ids import now_ms
from securecollab.log import request_id_var
from securecollab.netaddr import client_address, trusted_networks
from securecollab.services.auth import Principal
from securecollab.services.errors import RateLimited, Unauthorized

log = logging.getLogger("securecollab.http")

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC_ATTR = "_securecollab_public"
CTX_KEY = "securecollab.ctx"
# probes and scrapes must not eat a client's rate-limit budget (or be refused by it)
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# C0/C1 controls, DEL, U+FFFD (what an undecodable percent-escape becomes), surrogates
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\ufffd\ud800-\udfff]")

DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HSTS = "max-age=31536000; includeSubDomains"
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# X-Device-Id: messaging stamps the device key's lastUsedAt from it (browser clients send it)
CORS_HEADERS = "Authorization, Content-Type, X-Device-Id, X-Request-Id"
CORS_EXPOSE = "Retry-After, X-Request-Id"


def public(func: F) -> F:
    """Mark a route as not needing a Bearer token (and document it so in OpenAPI)."""
    setattr(func, PUBLIC_ATTR, True)
    return security_scheme([])(func)


def app_ctx() -> AppContext:
    """The AppContext of the app serving this request."""
    ctx: AppContext = current_app.extensions[CTX_KEY]
    return ctx


def current_principal() -> Principal:
    """The authenticated caller of this request (routes behind auth only)."""
    principal: Principal | None = g.get("principal")
    if principal is None:  # a route forgot it is public: fail closed
        raise Unauthorized("authentication required", code="unauthorized")
    return principal


def client_ip() -> str:
    """The client's address: the peer, or behind a trusted proxy its X-Forwarded-For
    (`securecollab.netaddr`)."""
    peer = request.remote_addr or "unknown"
    trusted = app_ctx().settings.http.trusted_proxies
    if not trusted:
        return peer
    forwarded = ", ".join(request.headers.getlist("X-Forwarded-For")) or None
    return client_address(peer, forwarded, trusted_networks(trusted))


class JsonRequest(TrioRequest):
    """Request whose JSON errors are ours: 415 for non-JSON, 400 `invalid_json` for bad JSON.

    Bodies are decoded by `api.client_json` (UTF-8 only, bounded nesting, no duplicate
    keys, no NUL or lone surrogates), the same decoder the STOMP door uses.
    """

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if not (force or self.is_json):
            if silent:
                return None
            raise NotJson()
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        data = await self.get_data(cache=cache, as_text=False)
        try:
            result = client_json.loads(data)
        except client_json.BadJson as error:
            if not silent:
                raise InvalidJson(f"malformed JSON body: {error}") from None
            result = None
        if cache:
            self._cached_json[silent] = result
        return result


def _bad_text(value: str) -> bool:
    return _CONTROL_RE.search(value) is not None


def _check_parameters() -> None:
    """Refuse query and path parameters no route can use (400 `invalid_parameter`).

    Control characters (NUL above all: PostgreSQL text cannot hold it) and
    undecodable percent-escapes never belong in an id, a cursor or a number; a query
    parameter given twice is ambiguous (a proxy may read the other copy), so it is refused
    rather than silently taking the first.
    """
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise InvalidParameter(f"query parameter {key[:64]!r} is given more than once")
        if _bad_text(key) or _bad_text(values[0]):
            raise InvalidParameter(
                f"query parameter {key[:64]!r} contains control characters or invalid UTF-8"
            )
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and _bad_text(value):
            raise InvalidParameter(
                f"path parameter {name} contains control characters or invalid UTF-8"
            )


def _retry_after(ms: int) -> int:
    return max(1, -(-ms // 1000))


def install_middleware(app: Quart, ctx: AppContext) -> None:
    """Register the before/after hooks on `app`."""
    http = ctx.settings.http
    allowed_origins = set(http.cors_origins)

    def origin_allowed(origin: str) -> bool:
        return "*" in allowed_origins or origin in allowed_origins

    @app.before_request
    async def _before() -> Response | None:
        g.start = time.perf_counter()
        rid = request.headers.get("X-Request-Id", "")
        g.request_id = rid if _REQUEST_ID_RE.match(rid) else uuid.uuid4().hex
        request_id_var.set(g.request_id)

        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and origin
            and request.headers.get("Access-Control-Request-Method")
        ):
            if not origin_allowed(origin):
                return error_response(403, "cors_origin_denied", f"origin {origin} is not allowed")
            resp = Response("", status=204)
            resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            resp.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
            return resp

        if request.path in UNLIMITED_PATHS:
            return None
        now = now_ms()
        decision = await ctx.backplane.hit(
            f"rest:ip:{client_ip()}", http.rate_limit_ip_per_min, 60_000, now
        )
        if not decision.allowed:
            ctx.metrics.rate_limited("ip")
            retry = _retry_after(decision.retry_after_ms)
            raise RateLimited(
                f"too many requests from this address; retry in {retry} s", retry_after_s=retry
            )

        _check_parameters()

        view = current_app.view_functions.get(request.endpoint or "")
        needs_auth = (
            request.path.startswith("/api/")
            and view is not None
            and not getattr(view, PUBLIC_ATTR, False)
        )
        if not needs_auth:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing Bearer token", code="unauthorized")
        principal = await ctx.auth.verify_access_token(token.strip())
        g.principal = principal
        decision = await ctx.backplane.hit(
            f"rest:user:{principal.user_id.lower()}", http.rate_limit_user_per_min, 60_000, now
        )
        if not decision.allowed:
            ctx.metrics.rate_limited("user")
            retry = _retry_after(decision.retry_after_ms)
            raise RateLimited(
                f"too many requests for this user; retry in {retry} s", retry_after_s=retry
            )
        return None

    @app.after_request
    async def _after(resp: Response) -> Response:
        h = resp.headers
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Content-Security-Policy", DEFAULT_CSP)
        if request.scheme in ("https", "wss"):
            h["Strict-Transport-Security"] = HSTS
        if request.path.startswith("/api/"):
            h.setdefault("Cache-Control", "no-store")  # tokens must not sit in caches
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin):
            h["Access-Control-Allow-Origin"] = "*" if "*" in allowed_origins else origin
            h["Access-Control-Expose-Headers"] = CORS_EXPOSE
            h.add("Vary", "Origin")
        rid = g.get("request_id")
        if rid:
            h["X-Request-Id"] = rid
        _observe(ctx, resp.status_code)
        return resp


def _observe(ctx: AppContext, status: int) -> None:
    start = g.get("start")
    seconds = time.perf_counter() - start if start is not None else 0.0
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    ctx.metrics.observe_request(request.method, route, status, seconds)
    principal = g.get("principal")
    log.info(
        "http request",
        extra={
            "fields": {
                "method": request.method,
                "path": request.path,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "ip": client_ip(),
                "user": principal.user_id if principal else None,
            }
        },
    )
