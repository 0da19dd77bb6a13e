"""Liveness, readiness and Prometheus metrics (not rate limited).

`/healthz` and `/readyz` are public. `/metrics` is public unless `[http] metrics_token`
is set; then it needs `Authorization: Bearer <that token>` (metrics tell who is busy:
counts of sessions, messages and errors are not for the internet).
"""

from __future__ import annotations

import hmac
import logging

import trio
from pydantic import BaseModel
from quart import Blueprint, Response, request
from quart_schema import document_response, tag, validate_response

from securecollab.api.rest.errors import error_response
from securecollab.api.rest.middleware import app_ctx, public
from securecollab.api.rest.schemas import ErrorBody
from securecollab.store import StoreError

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

READY_TIMEOUT_S = 2.0


class StatusOut(BaseModel):
    status: str


@bp.get("/healthz")
@public
@tag(["ops"])
@validate_response(StatusOut)
async def healthz() -> StatusOut:
    """Liveness: 200 while the process serves HTTP."""
    return StatusOut(status="ok")


@bp.get("/readyz")
@public
@tag(["ops"])
@validate_response(StatusOut)
@document_response(ErrorBody, 503)
async def readyz() -> StatusOut | Response:
    """Readiness: 200 when the store answers within 2 s; 503 otherwise or while shutting down."""
    ctx = app_ctx()
    if ctx.shutdown.is_set():
        return error_response(503, "shutting_down", "the server is shutting down")
    try:
        with trio.fail_after(READY_TIMEOUT_S):
            await ctx.store.ping()
    except (StoreError, trio.TooSlowError, OSError, RuntimeError):
        return error_response(503, "not_ready", "the store is unreachable")
    except Exception:  # a driver error the store did not map: still "not ready", not a 500
        log.exception("readiness check failed")
        return error_response(503, "not_ready", "the store is unreachable")
    return StatusOut(status="ready")


@bp.get("/metrics")
@public
@tag(["ops"])
@document_response(ErrorBody, 401)
async def metrics() -> Response:
    """Prometheus text exposition: HTTP, store, broker and process metrics.

    Needs `Authorization: Bearer <[http] metrics_token>` when that token is set.
    """
    ctx = app_ctx()
    token = ctx.settings.http.metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            return error_response(
                401,
                "unauthorized",
                "GET /metrics needs Authorization: Bearer <[http] metrics_token>",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    m = ctx.metrics
    return Response(m.render(), content_type=m.content_type)
