"""Per-command, per-version, per-direction rules: which commands and headers are required."""

from __future__ import annotations

from ._errors import ProtocolError
from ._frame import (
    BODY_COMMANDS,
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    VERSIONS,
    Frame,
    Headers,
)
from ._negotiate import parse_heartbeat

# (side, version, command) -> header names that must all be present. "side" is who
# *receives* the frame: "server" validates frames from clients, "client" from servers.
_REQUIRED: dict[tuple[str, str, str], tuple[str, ...]] = {}


def _fill() -> None:
    for version in VERSIONS:
        legacy = version == "1.0"
        client: dict[str, tuple[str, ...]] = {
            # accept-version absent means 1.0 and real 1.1+ clients may omit host (the
            # spec requires it for 1.2, but a broker serves one virtual host): both lenient.
            "CONNECT": (),
            "STOMP": (),
            "SEND": ("destination",),
            "SUBSCRIBE": ("destination",) if legacy else ("destination", "id"),
            "UNSUBSCRIBE": () if legacy else ("id",),  # 1.0: destination or id, checked below
            "ACK": {"1.0": ("message-id",), "1.1": ("message-id", "subscription")}.get(
                version, ("id",)
            ),
            "BEGIN": ("transaction",),
            "COMMIT": ("transaction",),
            "ABORT": ("transaction",),
            "DISCONNECT": (),
        }
        if not legacy:
            client["NACK"] = ("message-id", "subscription") if version == "1.1" else ("id",)
        server: dict[str, tuple[str, ...]] = {
            "CONNECTED": (),
            "MESSAGE": ("destination", "message-id")
            if legacy
            else ("destination", "message-id", "subscription"),
            "RECEIPT": ("receipt-id",),
            "ERROR": (),
        }
        for command, names in client.items():
            _REQUIRED["server", version, command] = names
        for command, names in server.items():
            _REQUIRED["client", version, command] = names


_fill()

_ACK_MODES = {"auto", "client", "client-individual"}
# Commands check_headers looks at beyond their required headers.
_MORE_CHECKS = frozenset({"UNSUBSCRIBE", "CONNECT", "STOMP", "CONNECTED", "SUBSCRIBE"})


def check_command(command: str, version: str, side: str) -> None:
    """Raise ProtocolError("unknown-command") unless ``side`` may receive ``command``."""
    if (side, version, command) not in _REQUIRED:
        if command in CLIENT_COMMANDS or command in SERVER_COMMANDS:
            who = "a client" if side == "server" else "a server"
            detail = f"{command} is not a frame {who} may send in STOMP {version}"
        else:
            detail = f"Unknown command {command[:40]!r}"
        raise ProtocolError("unknown-command", detail)


def check_headers(command: str, headers: Headers, version: str, side: str) -> None:
    """Check the command is allowed and its required headers are present and well-formed.

    Raises ProtocolError with reason "unknown-command", "missing-header", "bad-heart-beat"
    or "bad-header".
    """
    required = _REQUIRED.get((side, version, command))
    if required is None:
        check_command(command, version, side)
        return
    # Nested loops, not a set of names: at most 3 required names, usually found among
    # the first headers, and this runs for every frame received.
    for need in required:
        for name, _ in headers:
            if name == need:
                break
        else:
            raise ProtocolError("missing-header", f"{command} frame needs a '{need}' header")
    if command not in _MORE_CHECKS:
        return
    if command == "UNSUBSCRIBE" and version == "1.0":
        if not any(name in ("destination", "id") for name, _ in headers):
            raise ProtocolError(
                "missing-header", "UNSUBSCRIBE frame needs an 'id' or 'destination' header"
            )
    elif command in ("CONNECT", "STOMP", "CONNECTED"):
        for name, value in headers:
            if name == "heart-beat":
                parse_heartbeat(value)
                break
    elif command == "SUBSCRIBE":
        for name, value in headers:
            if name == "ack":
                if value not in _ACK_MODES or (value == "client-individual" and version == "1.0"):
                    raise ProtocolError(
                        "bad-header",
                        f"ack must be auto, client or client-individual, got {value[:40]!r}",
                    )
                break


def check_body(command: str, body: bytes, version: str) -> None:
    """Raise ProtocolError("unexpected-body") for a body on a frame that must not have one.

    STOMP 1.0 had no such rule, so 1.0 peers are let through.
    """
    if body and command not in BODY_COMMANDS and version != "1.0":
        raise ProtocolError("unexpected-body", f"{command} frame must not have a body")


def validate(frame: Frame, version: str = "1.2", side: str = "server") -> None:
    """Check a whole frame as ``side`` would receive it (``"server"``: a frame from a client).

    Raises ProtocolError on the first rule broken; returns None when the frame is valid.
    """
    if side not in ("server", "client"):
        raise ValueError("side must be 'server' or 'client'")
    if version not in VERSIONS:
        raise ValueError(f"unsupported version {version!r}")
    check_headers(frame.command, frame.headers, version, side)
    check_body(frame.command, frame.body, version)
    cl = frame.get("content-length")
    if cl is not None and (not (cl.isascii() and cl.isdigit()) or int(cl) != len(frame.body)):
        raise ProtocolError("bad-content-length", "content-length does not match the body")
