"""The one exception of the protocol layer."""

from __future__ import annotations

from typing import Any


class ProtocolError(Exception):
    """The peer broke the STOMP protocol (or a configured limit).

    ``reason`` is a short machine-readable code (``"frame-too-large"``, ``"bad-escape"``,
    ``"missing-header"``, ...); ``message`` is one line of plain ASCII-safe text fit for the
    ``message`` header of an ERROR frame. ``events`` holds what the same ``feed()`` call
    parsed before the error (the caller may act on them before reporting the error).
    After a ProtocolError the parser is dead: every later ``feed()`` raises it again.
    """

    reason: str
    message: str
    events: list[Any]

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.events = []

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, str]]:
        return (type(self), (self.reason, self.message))
