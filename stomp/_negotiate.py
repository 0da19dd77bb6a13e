"""Version and heart-beat negotiation: pure functions over header values."""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import ProtocolError
from ._frame import VERSIONS

# Accept at most this many ms (~24.8 days) in a heart-beat so arithmetic stays small.
_MAX_HEARTBEAT_MS = 2**31 - 1


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def negotiate_version(accept_version: str | None, supported: Iterable[str] = VERSIONS) -> str:
    """Highest version in both the client's ``accept-version`` and ``supported``.

    An absent (None) or blank ``accept-version`` means the client speaks 1.0 only (spec).
    Raises ProtocolError("bad-version") when there is no common version; its message lists
    what this side supports (send it in the ERROR frame's ``version`` header too).
    """
    ours = [v for v in VERSIONS if v in set(supported)]
    if accept_version is None or not accept_version.strip():
        offered = {"1.0"}
    else:
        offered = {part.strip() for part in accept_version.split(",")}
    common = [v for v in ours if v in offered]
    if not common:
        raise ProtocolError(
            "bad-version",
            f"Supported protocol versions are {','.join(ours)}",
        )
    return max(common, key=_version_key)


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    """Parse a ``heart-beat`` header ``"cx,cy"`` into two non-negative ints (milliseconds).

    None (header absent) means ``(0, 0)``: no heart-beats. Raises
    ProtocolError("bad-heart-beat") on anything else than two ASCII integers.
    """
    if value is None:
        return (0, 0)
    parts = value.split(",")
    if len(parts) != 2:
        raise ProtocolError("bad-heart-beat", f"heart-beat must be 'cx,cy', got {value[:40]!r}")
    out: list[int] = []
    for part in parts:
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or len(part) > 10:
            raise ProtocolError(
                "bad-heart-beat",
                f"heart-beat must be two non-negative integers, got {value[:40]!r}",
            )
        out.append(min(int(part), _MAX_HEARTBEAT_MS))
    return (out[0], out[1])


def format_heartbeat(send_every_ms: int, expect_every_ms: int) -> str:
    """The ``heart-beat`` header value for (can-send-every, want-to-receive-every) ms."""
    if send_every_ms < 0 or expect_every_ms < 0:
        raise ValueError("heart-beat intervals must be >= 0")
    return f"{send_every_ms},{expect_every_ms}"


def negotiate_heartbeat(client: tuple[int, int], server: tuple[int, int]) -> tuple[int, int]:
    """Apply the spec's rule to ``client=(cx, cy)`` and ``server=(sx, sy)`` (milliseconds).

    Returns ``(server_send_every_ms, server_expect_every_ms)``:
    server -> client beats every ``max(sx, cy)`` ms unless ``sx`` or ``cy`` is 0;
    client -> server beats every ``max(cx, sy)`` ms unless ``cx`` or ``sy`` is 0.
    0 means "none". The client's view is the same pair swapped.
    """
    cx, cy = client
    sx, sy = server
    send = 0 if sx == 0 or cy == 0 else max(sx, cy)
    expect = 0 if cx == 0 or sy == 0 else max(cx, sy)
    return (send, expect)
