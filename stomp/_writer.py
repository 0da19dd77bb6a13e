"""Send side: Frame -> bytes for a negotiated version."""

from __future__ import annotations

import re

from ._frame import HEARTBEAT_BYTES, UNESCAPED_COMMANDS, VERSIONS, Frame, HeartBeat

_SPECIAL = re.compile(r"[\\\r\n:\x00]")
_TABLE_12 = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", ":": "\\c"})
_TABLE_11 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})


def escape(text: str, version: str = "1.2") -> str:
    """Escape a header name or value for ``version`` (1.0: returned as is).

    Raises ValueError for what no version can carry (NUL) or 1.1 cannot (CR).
    """
    if _SPECIAL.search(text) is None:
        return text
    if "\x00" in text:
        raise ValueError("a header cannot carry a NUL")
    if version == "1.0":
        return text
    if version == "1.1":
        if "\r" in text:
            raise ValueError("STOMP 1.1 cannot carry a CR in a header")
        return text.translate(_TABLE_11)
    return text.translate(_TABLE_12)


def _check_raw(name: str, value: str, command: str) -> None:
    if "\n" in name or "\r" in name or ":" in name or not name:
        raise ValueError(f"header name {name!r} cannot be sent unescaped in {command}")
    if "\n" in value or "\r" in value or "\x00" in value or "\x00" in name:
        raise ValueError(f"header {name!r} value cannot carry CR, LF or NUL unescaped in {command}")


def encode(frame: Frame | type[HeartBeat], version: str = "1.2") -> bytes:
    """Serialize ``frame`` for ``version``; ``HeartBeat`` gives ``b"\\n"``.

    Header names and values are escaped per version (1.2: ``\\\\ \\n \\r \\c``; 1.1 has no
    ``\\r``; 1.0 none), except in CONNECT/STOMP/CONNECTED which the spec never escapes.
    A ``content-length`` header is appended whenever the body is not empty and the frame
    has none, so bodies may hold NULs and peers never scan for the end. Raises ValueError
    for what the version cannot represent (a CR/LF in a 1.0 header, a content-length that
    contradicts the body, an empty or multi-line command).
    """
    if frame is HeartBeat:
        return HEARTBEAT_BYTES
    assert isinstance(frame, Frame)
    command = frame.command
    body = frame.body
    if version not in VERSIONS:
        raise ValueError(f"unsupported STOMP version {version!r}")
    if not command or _SPECIAL.search(command) is not None:
        raise ValueError(f"invalid command {command!r}")
    raw = version == "1.0" or command in UNESCAPED_COMMANDS
    parts = [command]
    has_length = False
    search = _SPECIAL.search
    for name, value in frame.headers:
        if name == "content-length" and not has_length:
            # compare as numbers: peers may send "05", which the parser accepts as 5
            if not (value.isascii() and value.isdigit()) or int(value) != len(body):
                raise ValueError(
                    f"content-length header {value!r} contradicts the {len(body)}-byte body"
                )
            has_length = True
        if raw:
            _check_raw(name, value, command)
        else:
            if not name:
                raise ValueError("empty header name")
            if search(name) is not None:
                name = escape(name, version)
            if search(value) is not None:
                value = escape(value, version)
        parts.append(f"{name}:{value}")
    if body and not has_length:
        parts.append(f"content-length:{len(body)}")
    parts.append("")
    parts.append("")
    return "\n".join(parts).encode("utf-8") + body + b"\x00"


def encode_many(frames: list[Frame | type[HeartBeat]], version: str = "1.2") -> bytes:
    """Serialize several frames into one write (coalescing outbound frames)."""
    return b"".join([encode(f, version) for f in frames])
