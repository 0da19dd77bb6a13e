"""Events of the protocol: the immutable Frame, the HeartBeat marker, and the Limits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, overload

Headers = tuple[tuple[str, str], ...]

#: Protocol versions this library speaks, oldest first.
VERSIONS: tuple[str, ...] = ("1.0", "1.1", "1.2")

CLIENT_COMMANDS: frozenset[str] = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
SERVER_COMMANDS: frozenset[str] = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})

#: Frames whose headers are never escaped (spec: "CONNECT and CONNECTED frames do not
#: escape"), so a parser can read them before any version is negotiated.
UNESCAPED_COMMANDS: frozenset[str] = frozenset({"CONNECT", "STOMP", "CONNECTED"})

#: Only these frames may carry a body (STOMP 1.1/1.2: "all other frames MUST NOT").
BODY_COMMANDS: frozenset[str] = frozenset({"SEND", "MESSAGE", "ERROR"})


@dataclass(frozen=True, slots=True)
class Frame:
    """One STOMP frame: command, ordered headers (repeats kept), body bytes.

    Header names and values are the *decoded* text (escapes already undone). When a header
    repeats, the first occurrence wins on lookup, as the spec says.
    """

    command: str
    headers: Headers = ()
    body: bytes = b""

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    @overload
    def get(self, name: str, default: None) -> str | None: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called ``name``, else ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in wire order."""
        return [value for key, value in self.headers if key == name]

    def has(self, name: str) -> bool:
        """True when header ``name`` is present (even with an empty value)."""
        return any(key == name for key, _ in self.headers)

    def header_dict(self) -> dict[str, str]:
        """Headers as a dict, first occurrence winning."""
        out: dict[str, str] = {}
        for key, value in self.headers:
            out.setdefault(key, value)
        return out

    @classmethod
    def make(
        cls,
        command: str,
        headers: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        body: bytes | bytearray | memoryview | str = b"",
    ) -> Frame:
        """Build a frame from a mapping or pairs; values go through ``str()``; str body -> UTF-8."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        pairs = tuple((str(k), str(v)) for k, v in items)
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        return cls(command, pairs, data)

    def with_header(self, name: str, value: str) -> Frame:
        """A copy with ``name`` set to ``value`` (replacing every occurrence, kept in place)."""
        out: list[tuple[str, str]] = []
        seen = False
        for key, old in self.headers:
            if key == name:
                if not seen:
                    out.append((name, value))
                    seen = True
            else:
                out.append((key, old))
        if not seen:
            out.append((name, value))
        return Frame(self.command, tuple(out), self.body)

    def without_header(self, name: str) -> Frame:
        """A copy without any header called ``name``."""
        return Frame(self.command, tuple(p for p in self.headers if p[0] != name), self.body)


_new = object.__new__
_slot = vars(Frame)  # the slot descriptors: their __set__ ignores frozen=True
_set_command = _slot["command"].__set__
_set_headers = _slot["headers"].__set__
_set_body = _slot["body"].__set__


def new_frame(command: str, headers: Headers, body: bytes) -> Frame:
    """``Frame(command, headers, body)`` for the parser: a third faster than a frozen
    dataclass's ``__init__`` (which goes through ``object.__setattr__`` per field)."""
    frame = _new(Frame)
    _set_command(frame, command)
    _set_headers(frame, headers)
    _set_body(frame, body)
    return frame


class _SentinelMeta(type):
    def __new__(
        cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwds: Any
    ) -> _SentinelMeta:
        made = super().__new__(cls, name, bases, namespace, **kwds)
        made.__class__ = made  # type: ignore[assignment]  # a class that is its own instance
        return made

    def __repr__(self) -> str:
        return self.__name__


class HeartBeat(_SentinelMeta, metaclass=_SentinelMeta):
    """A bare EOL between frames: the peer is alive.

    A sentinel in the h11 style: the parser yields the class itself, which is also an
    instance of itself, so ``event is HeartBeat``, ``isinstance(event, HeartBeat)`` and
    ``event == HeartBeat`` all hold. EOLs that trail a frame's NUL are reported as
    heart-beats too: on the wire the two cannot be told apart, and both mean "alive".
    """


#: The bytes of one heart-beat.
HEARTBEAT_BYTES = b"\n"


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits the parser enforces; each has its own ProtocolError reason.

    - ``max_frame_bytes`` (102400 = 100 KiB, the original design's WebSocket limit): command
      line through the terminating NUL, trailing EOLs excluded -> ``"frame-too-large"``.
      The parser never buffers more than this many bytes between ``feed()`` calls.
    - ``max_headers`` (64): header lines per frame -> ``"too-many-headers"``.
    - ``max_header_line`` (8192): bytes of one header line (or the command line), EOL
      excluded -> ``"header-line-too-long"``.
    - ``max_body_bytes`` (102400): body bytes -> ``"body-too-large"``.
    """

    max_frame_bytes: int = 102400
    max_headers: int = 64
    max_header_line: int = 8192
    max_body_bytes: int = 102400

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_headers", "max_header_line", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1")
