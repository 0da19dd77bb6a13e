"""stomp/ — the protocol library: sans-IO STOMP 1.0/1.1/1.2 (parser, writer, negotiation).

No sockets, no event loop, no knowledge of the application: bytes in, frames out,
frames in, bytes out (the h11/wsproto model). Usage::

    import stomp

    parser = stomp.Parser(side="server")          # reads frames sent by clients
    for event in parser.feed(chunk):              # any split of the byte stream
        if event is stomp.HeartBeat:
            continue                              # peer is alive
        frame: stomp.Frame = event                # .command, .headers, .body, .get(name)
        ...
    wire = stomp.encode(stomp.Frame.make("MESSAGE", {"destination": "/topic/a",
                        "message-id": "1", "subscription": "0"}, b"{}"), parser.version)

    version = stomp.negotiate_version(connect.get("accept-version"))   # "1.2"
    send_ms, expect_ms = stomp.negotiate_heartbeat(
        stomp.parse_heartbeat(connect.get("heart-beat")), (10000, 10000))

With the session helper (no I/O either; the caller owns sockets and timers)::

    conn = stomp.Connection("server", heart_beat=(10000, 10000))
    conn.receive_data(chunk)                      # b"" = peer closed
    while (event := conn.next_event()) not in (stomp.NEED_DATA, stomp.CLOSED):
        if isinstance(event, stomp.Frame) and event.command in ("CONNECT", "STOMP"):
            sock_send(conn.send(stomp.Frame("CONNECTED")))   # version/heart-beat filled in
    conn.version, conn.heartbeat                  # "1.2", (send_every_ms, expect_every_ms)

Errors are one type, :class:`ProtocolError`, with ``.reason`` (machine-readable) and
``.message`` (fit for an ERROR frame's ``message`` header). Limits (:class:`Limits`)
default to 100 KiB frames and bodies, 64 headers and 8 KiB header lines; the parser never
buffers more than one frame's limit. :class:`Connection` adds the CONNECT handshake state
(negotiated version and heart-beats) in the h11 style: ``receive_data`` /
``next_event`` / ``send``.
"""

from __future__ import annotations

from ._connection import (
    AWAITING_CONNECT,
    CLOSED,
    CONNECTED,
    CONNECTING,
    DONE,
    NEED_DATA,
    Connection,
)
from ._errors import ProtocolError
from ._frame import (
    BODY_COMMANDS,
    CLIENT_COMMANDS,
    HEARTBEAT_BYTES,
    SERVER_COMMANDS,
    UNESCAPED_COMMANDS,
    VERSIONS,
    Frame,
    Headers,
    HeartBeat,
    Limits,
)
from ._negotiate import format_heartbeat, negotiate_heartbeat, negotiate_version, parse_heartbeat
from ._parser import Event, Parser, unescape
from ._validate import validate
from ._writer import encode, encode_many, escape

__all__ = [
    "AWAITING_CONNECT",
    "BODY_COMMANDS",
    "CLIENT_COMMANDS",
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "DONE",
    "HEARTBEAT_BYTES",
    "NEED_DATA",
    "SERVER_COMMANDS",
    "UNESCAPED_COMMANDS",
    "VERSIONS",
    "Connection",
    "Event",
    "Frame",
    "Headers",
    "HeartBeat",
    "Limits",
    "Parser",
    "ProtocolError",
    "encode",
    "encode_many",
    "escape",
    "format_heartbeat",
    "negotiate_heartbeat",
    "negotiate_version",
    "parse_heartbeat",
    "unescape",
    "validate",
]
