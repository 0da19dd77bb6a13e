"""The service layer's one exception family.

Services raise these; each door maps them in exactly one place (REST:
`securecollab.api.rest.errors`; STOMP: the broker's ERROR frame). `code` is a short
machine-readable token, `detail` a human sentence safe to show to the client.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: a request the service refuses, with a client-safe explanation."""

    code = "error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class InvalidInput(ServiceError):
    """The input is well-formed but breaks a rule (password policy, bad userId...)."""

    code = "invalid_input"


class Unauthorized(ServiceError):
    """Missing, invalid, expired or revoked credentials (HTTP 401)."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """Authenticated, but not allowed (HTTP 403)."""

    code = "forbidden"


class NotFoundError(ServiceError):
    """The thing asked for does not exist or is not visible to the caller (HTTP 404)."""

    code = "not_found"


class ConflictError(ServiceError):
    """It already exists (HTTP 409), e.g. a taken userId."""

    code = "conflict"


class RateLimited(ServiceError):
    """Too many requests; retry after `retry_after_s` seconds (HTTP 429)."""

    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after_s = max(1, retry_after_s)


class Unavailable(ServiceError):
    """A dependency (the store) cannot be reached right now (HTTP 503)."""

    code = "unavailable"
