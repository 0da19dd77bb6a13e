"""REST error mapping: the ONE place where exceptions become HTTP statuses.

Every error body is JSON `{"error": code, "detail": text}`; a 500 adds `requestId` and
never a traceback (that goes to the server log). Service errors (`services/errors.py`),
store unavailability, quart-schema validation errors and werkzeug HTTP errors (404,
405, 413, ...) all end here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pydantic
from quart import Quart, Response, g, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from securecollab.services.errors import (
    ConflictError,
    Forbidden,
    InvalidInput,
    NotFoundError,
    RateLimited,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from securecollab.store import StoreUnavailable

log = logging.getLogger("securecollab.api")

_STATUS: list[tuple[type[ServiceError], int]] = [
    (InvalidInput, 422),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (RateLimited, 429),
    (Unavailable, 503),
]


class InvalidJson(BadRequest):
    """The body claims to be JSON but does not parse."""

    error_code = "invalid_json"


class InvalidParameter(BadRequest):
    """A query or path parameter no route can accept (control characters, given twice)."""

    error_code = "invalid_parameter"


class NotJson(UnsupportedMediaType):
    """The route takes JSON but the request's Content-Type is something else."""

    error_code = "unsupported_media_type"
    description = "send the request body as JSON with Content-Type: application/json"


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """Build the uniform JSON error response."""
    resp = jsonify({"error": code, "detail": detail, **extra})
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def status_for(error: ServiceError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 400


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _validation_detail(err: Exception) -> str:
    if isinstance(err, pydantic.ValidationError):
        parts = []
        for item in err.errors()[:10]:
            where = ".".join(str(p) for p in item["loc"]) or "body"
            parts.append(f"{where}: {item['msg']}")
        return "; ".join(parts)
    # the body is not an object at all, or quart-schema could not convert it
    return "request body must be a JSON object matching the documented schema"


def register_error_handlers(app: Quart) -> None:
    """Install the JSON error handlers on `app`."""

    @app.errorhandler(ServiceError)
    async def _service_error(e: ServiceError) -> Response:
        headers = {}
        if isinstance(e, RateLimited):
            headers["Retry-After"] = str(e.retry_after_s)
        if isinstance(e, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return error_response(status_for(e), e.code, e.detail, headers)

    @app.errorhandler(StoreUnavailable)
    async def _store_unavailable(e: StoreUnavailable) -> Response:
        log.warning("store unavailable", extra={"fields": {"error": str(e)}})
        return error_response(503, "unavailable", "the database is unreachable; retry later")

    @app.errorhandler(RequestSchemaValidationError)
    async def _validation(e: RequestSchemaValidationError) -> Response:
        return error_response(422, "validation_error", _validation_detail(e.validation_error))

    @app.errorhandler(HTTPException)
    async def _http(e: HTTPException) -> Response | HTTPException:
        if e.code is None or e.code < 400:  # redirects (e.g. a trailing slash) stay redirects
            return e
        code = getattr(e, "error_code", None) or _snake(e.name)
        resp = error_response(e.code, code, e.description or e.name)
        for k, v in e.get_headers():
            if k.lower() != "content-type":
                resp.headers[k] = v  # e.g. Allow on 405
        return resp

    @app.errorhandler(Exception)
    async def _unexpected(e: Exception) -> Response:
        rid = getattr(g, "request_id", None)
        log.error(
            "unhandled exception", exc_info=e, extra={"fields": {"error_type": type(e).__name__}}
        )
        return error_response(500, "internal_error", "internal server error", requestId=rid)
