"""Broker errors: each becomes one STOMP ERROR frame, after which the connection closes.

The session maps them to ERROR in one place (`Session._handle`); the `message` header
carries `message`, the body carries `detail`. App handlers (`/app/...`) raise
`AppError`; everything else here is raised by the broker itself.
"""

from __future__ import annotations


class BrokerError(Exception):
    """A client-visible failure: ERROR frame with `message`, optional `detail` body."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class AuthenticationFailed(BrokerError):
    """CONNECT credentials missing, wrong or expired."""


class Forbidden(BrokerError):
    """SUBSCRIBE or SEND to a destination the user may not use."""


class AppError(BrokerError):
    """Raised by an `/app/...` handler: the request was refused (validation, authorization)."""
