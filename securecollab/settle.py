"""Bounds on work that is finished after its caller was cancelled ("settling").

A send whose caller is cancelled once its write was queued still learns the write's
outcome and delivers what it stored, shielded (`services.messages.PendingSend`). Each
such settle is bounded by `SETTLE_S`. A STOMP connection that closes with several
pipelined SENDs queued settles them one after another (`broker.session`): it sets
`settle_deadline` once, so all of them together stay within one `SETTLE_S`, not one
each (a hung store would otherwise hold the connection's teardown for depth x 30 s).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

#: Longest a settle may take (commit outcome + fan-out), shielded.
SETTLE_S = 30.0

#: When set (trio time), no settle in this context runs past it.
settle_deadline: ContextVar[float] = ContextVar("settle_deadline", default=math.inf)


def settle_scope() -> trio.CancelScope:
    """A shielded scope for one settle: `SETTLE_S` from now, or `settle_deadline` if sooner."""
    return trio.CancelScope(
        shield=True, deadline=min(trio.current_time() + SETTLE_S, settle_deadline.get())
    )


@contextmanager
def settling() -> Iterator[None]:
    """Settles run in this block (in this task) end within one `SETTLE_S` from now, together."""
    token = settle_deadline.set(min(trio.current_time() + SETTLE_S, settle_deadline.get()))
    try:
        yield
    finally:
        settle_deadline.reset(token)
