"""An h11-style session: the CONNECT handshake state around a Parser, without any I/O."""

from __future__ import annotations

from collections import deque

from ._errors import ProtocolError
from ._frame import VERSIONS, Frame, HeartBeat, Limits, _SentinelMeta
from ._negotiate import format_heartbeat, negotiate_heartbeat, negotiate_version, parse_heartbeat
from ._parser import Event, Parser
from ._writer import encode


class NEED_DATA(_SentinelMeta, metaclass=_SentinelMeta):
    """``next_event()`` has nothing complete: call ``receive_data`` with more bytes."""


class CLOSED(_SentinelMeta, metaclass=_SentinelMeta):
    """The peer closed the byte stream (``receive_data(b"")``) and every event was read."""


#: Handshake states, per side. A server waits for CONNECT, then for its own CONNECTED;
#: a client sends CONNECT, then waits for CONNECTED.
AWAITING_CONNECT = "awaiting-connect"
CONNECTING = "connecting"
CONNECTED = "connected"
DONE = "done"


class Connection:
    """One STOMP session seen from ``side`` ("server" or "client"); no sockets, no clock.

    - ``receive_data(bytes)`` then ``next_event()`` until it returns ``NEED_DATA``.
      ``receive_data(b"")`` means the peer closed; ``next_event()`` then ends with
      ``CLOSED`` (or a ProtocolError "truncated-frame" if a frame was cut off).
    - ``send(frame | HeartBeat) -> bytes`` encodes for the negotiated version and tracks
      the handshake: a server's CONNECTED gets ``version`` and ``heart-beat`` headers filled
      in when missing; an ERROR ends the session.
    - ``version`` and ``heartbeat`` (``(send_every_ms, expect_every_ms)`` for *this*
      side, 0 = none) are set once CONNECTED passed. Timers are the caller's job.
    - Remote violations raise ProtocolError (reasons as the Parser's, plus "not-connected",
      "already-connected", "bad-version"); local misuse raises ValueError.
    """

    def __init__(
        self,
        side: str = "server",
        limits: Limits = Limits(),
        *,
        supported: tuple[str, ...] = VERSIONS,
        heart_beat: tuple[int, int] = (0, 0),
    ) -> None:
        if side not in ("server", "client"):
            raise ValueError("side must be 'server' or 'client'")
        self.side = side
        self.supported = supported
        #: What this side offers: (can send every ms, wants to receive every ms).
        self.heart_beat = heart_beat
        self.parser = Parser("1.2", limits, side=side, supported=supported)
        self.state = AWAITING_CONNECT
        self.version: str | None = None
        self.heartbeat: tuple[int, int] = (0, 0)
        self._peer_heart_beat = (0, 0)
        self._offered_versions: str | None = None
        self._events: deque[Event] = deque()
        self._error: ProtocolError | None = None
        self._eof = False

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Hand bytes from the peer over; ``b""`` means end of stream."""
        if self._eof:
            if data:
                raise ValueError("receive_data after end of stream")
            return
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return
        try:
            self._events.extend(self.parser.feed(data))
        except ProtocolError as exc:
            self._events.extend(exc.events)
            self._error = exc

    def next_event(self) -> Event | type[NEED_DATA] | type[CLOSED]:
        """The next frame or heart-beat, ``NEED_DATA``, or ``CLOSED``; may raise ProtocolError.

        Events parsed before a protocol error are returned first; the error follows.
        """
        if self._events:
            event = self._events.popleft()
            if event is not HeartBeat:
                assert isinstance(event, Frame)
                self._on_receive(event)
            return event
        if self._error is not None:
            raise self._error
        if self._eof:
            if self.parser.buffered:
                self._error = ProtocolError("truncated-frame", "Connection closed inside a frame")
                raise self._error
            return CLOSED
        return NEED_DATA

    def _fail(self, reason: str, message: str) -> None:
        self._error = ProtocolError(reason, message)
        self._events.clear()
        raise self._error

    def _on_receive(self, frame: Frame) -> None:
        command = frame.command
        if self.side == "server":
            if command in ("CONNECT", "STOMP"):
                if self.state != AWAITING_CONNECT:
                    self._fail("already-connected", "Session is already connected")
                self._offered_versions = frame.get("accept-version")
                try:
                    self.version = negotiate_version(self._offered_versions, self.supported)
                except ProtocolError as exc:
                    self._error = exc
                    self._events.clear()
                    raise
                self._peer_heart_beat = parse_heartbeat(frame.get("heart-beat"))
                self.parser.version = self.version
                self.state = CONNECTING
            elif self.state != CONNECTED:
                self._fail("not-connected", f"{command} before the session is connected")
            elif command == "DISCONNECT":
                self.state = DONE
        else:
            if command == "CONNECTED":
                if self.state != CONNECTING:
                    self._fail("already-connected", "Unexpected CONNECTED frame")
                got = frame.get("version", "1.0")
                if got not in self.supported:
                    self._fail("bad-version", f"Server chose unsupported version {got[:20]!r}")
                self.version = got
                self.parser.version = got
                server_hb = parse_heartbeat(frame.get("heart-beat"))
                send, expect = negotiate_heartbeat(self.heart_beat, server_hb)
                self.heartbeat = (expect, send)  # the server's view swapped
                self.state = CONNECTED
            elif command == "ERROR":
                self.state = DONE
            elif self.state not in (CONNECTED, DONE):  # a RECEIPT may follow DISCONNECT
                self._fail("not-connected", f"{command} before CONNECTED")

    # -- sending --------------------------------------------------------------------

    def send(self, event: Frame | type[HeartBeat]) -> bytes:
        """Encode ``event`` for the peer; ValueError when the session state forbids it."""
        if event is HeartBeat:
            return encode(event)
        assert isinstance(event, Frame)
        frame = event
        command = frame.command
        if self.state == DONE and command not in ("RECEIPT", "ERROR"):
            raise ValueError(f"cannot send {command}: the session is over")
        if self.side == "server":
            if command == "CONNECTED":
                if self.state != CONNECTING:
                    raise ValueError("CONNECTED is only sent in reply to CONNECT")
                assert self.version is not None
                if frame.get("version", self.version) != self.version:
                    raise ValueError(f"CONNECTED version must be the negotiated {self.version}")
                if not frame.has("version"):
                    frame = frame.with_header("version", self.version)
                own = parse_heartbeat(frame.get("heart-beat")) if frame.has("heart-beat") else None
                if own is None:
                    own = self.heart_beat
                    frame = frame.with_header("heart-beat", format_heartbeat(*own))
                self.heartbeat = negotiate_heartbeat(self._peer_heart_beat, own)
                self.state = CONNECTED
            elif command == "ERROR":
                data = encode(frame, self.version or "1.2")
                self.state = DONE
                return data
            elif self.state != CONNECTED and command != "RECEIPT":
                raise ValueError(f"cannot send {command} before CONNECTED")
        else:
            if command in ("CONNECT", "STOMP"):
                if self.state != AWAITING_CONNECT:
                    raise ValueError("CONNECT was already sent")
                if not frame.has("accept-version"):
                    frame = frame.with_header("accept-version", ",".join(self.supported))
                if frame.has("heart-beat"):
                    self.heart_beat = parse_heartbeat(frame.get("heart-beat"))
                else:
                    frame = frame.with_header("heart-beat", format_heartbeat(*self.heart_beat))
                self.state = CONNECTING
                return encode(frame, "1.2")
            if self.state != CONNECTED:
                raise ValueError(f"cannot send {command} before CONNECTED")
            if command == "DISCONNECT":
                self.state = DONE
                return encode(frame, self.version or "1.2")
        return encode(frame, self.version or "1.2")
