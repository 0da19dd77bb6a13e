"""Receive side: bytes in any split -> frames and heart-beats, with a bounded buffer."""

from __future__ import annotations

import re

from ._errors import ProtocolError
from ._frame import UNESCAPED_COMMANDS, VERSIONS, Frame, Headers, HeartBeat, Limits, new_frame
from ._negotiate import negotiate_version
from ._validate import check_body, check_headers

Event = Frame | type[HeartBeat]

_ESCAPE_12 = {"\\": "\\", "n": "\n", "r": "\r", "c": ":"}
_ESCAPE_11 = {"\\": "\\", "n": "\n", "c": ":"}
_BACKSLASH = re.compile(r"\\(.?)", re.S)


def unescape(text: str, version: str) -> str:
    """Undo header escaping of ``version``; an undefined escape raises "bad-escape".

    1.2 knows ``\\\\ \\n \\r \\c``, 1.1 the same without ``\\r``, 1.0 none (text is kept).
    """
    if version == "1.0" or "\\" not in text:
        return text
    table = _ESCAPE_12 if version == "1.2" else _ESCAPE_11

    def repl(match: re.Match[str]) -> str:
        got = table.get(match.group(1))
        if got is None:
            seq = "\\" + match.group(1)
            raise ProtocolError(
                "bad-escape", f"Undefined escape sequence {seq!r} in a header (STOMP {version})"
            )
        return got

    return _BACKSLASH.sub(repl, text)


def _parse_content_length(value: str, limits: Limits) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise ProtocolError(
            "bad-content-length",
            f"content-length must be a non-negative integer, got {value[:40]!r}",
        )
    length = int(value)
    if length > limits.max_body_bytes:
        raise ProtocolError(
            "body-too-large",
            f"Body of {length} bytes exceeds the limit of {limits.max_body_bytes} bytes",
        )
    return length


def _too_large(limits: Limits) -> ProtocolError:
    return ProtocolError(
        "frame-too-large", f"Frame exceeds the limit of {limits.max_frame_bytes} bytes"
    )


def _line_too_long(limits: Limits) -> ProtocolError:
    return ProtocolError(
        "header-line-too-long",
        f"Header line exceeds the limit of {limits.max_header_line} bytes",
    )


def _too_many(limits: Limits) -> ProtocolError:
    return ProtocolError("too-many-headers", f"Frame has more than {limits.max_headers} headers")


class Parser:
    """Incremental STOMP parser: ``feed(bytes) -> [Frame | HeartBeat, ...]``.

    - Input may be split anywhere; EOL is ``\\n`` or ``\\r\\n``.
    - A body ends at the NUL after ``content-length`` bytes when that header is present
      (so it may contain NULs), else at the first NUL. EOLs outside frames (including
      those trailing a NUL) come out as ``HeartBeat``.
    - Headers are UTF-8 and unescaped per ``version`` (CONNECT/STOMP/CONNECTED never are).
    - ``side="server"`` reads frames from clients, ``side="client"`` frames from servers;
      commands and required headers are checked for that direction and version unless
      ``validate=False`` (then only the framing rules and limits apply).
    - After a CONNECT/STOMP (server side) or CONNECTED (client side) frame the parser
      switches ``version`` to what that frame implies (highest common version, or the
      CONNECTED ``version`` header), so frames pipelined behind it parse right. Set
      ``version`` yourself to override.
    - Memory: between calls it buffers at most ``limits.max_frame_bytes`` (plus one CR).
    - Errors raise ProtocolError; the parser is then dead and re-raises it on every call.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_line_start",
        "_lines",
        "_pending",
        "_scan",
        "_version",
        "limits",
        "side",
        "supported",
        "validate",
    )

    def __init__(
        self,
        version: str = "1.2",
        limits: Limits = Limits(),
        *,
        side: str = "server",
        validate: bool = True,
        supported: tuple[str, ...] = VERSIONS,
    ) -> None:
        if side not in ("server", "client"):
            raise ValueError("side must be 'server' or 'client'")
        self._version = "1.2"
        self.version = version
        self.limits = limits
        self.side = side
        self.validate = validate
        self.supported = supported
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        # Resume state for the partial frame at the start of _buf (offsets relative to it):
        self._scan = 0  # where the search for the end of the headers resumes
        self._lines = 0  # complete lines seen in the partial head
        self._line_start = 0  # start of the current partial line
        # (command, headers, body offset, content-length or -1, NUL search offset)
        self._pending: tuple[str, Headers, int, int, int] | None = None

    @property
    def version(self) -> str:
        """The STOMP version headers are unescaped and validated for."""
        return self._version

    @version.setter
    def version(self, value: str) -> None:
        if value not in VERSIONS:
            raise ValueError(f"unsupported STOMP version {value!r}")
        self._version = value

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (never above max_frame_bytes + 1)."""
        return len(self._buf)

    @property
    def error(self) -> ProtocolError | None:
        """The error that killed this parser, if any."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Consume ``data``; return every frame and heart-beat now complete, in order.

        ``feed(b"")`` is allowed and parses nothing new. Raises ProtocolError; what the
        call parsed before the error is in ``error.events``.
        """
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        try:
            if self._buf or type(data) is not bytes or not self._feed_one(data, events):
                self._feed(data, events)
        except ProtocolError as exc:
            exc.events = events
            self._error = exc
            self._buf = bytearray()
            self._pending = None
            raise
        return events

    def _feed_one(self, data: bytes, events: list[Event]) -> bool:
        """Parse ``data`` when it is exactly one plain, complete frame; else return False.

        What a client sends almost always (one frame per WebSocket message or per read):
        the general loop below then does three scans of the head, keeps resume state and
        unpacks a pending tuple for nothing. This path takes only frames with LF line
        ends, no backslash, CR or NUL in the head, a well-formed header on every line,
        a body ending at the last byte, within every limit; anything else (including
        every error but the validation of a well-formed frame) returns False having
        changed nothing, and the general loop parses it (and raises) exactly as before.
        """
        n = len(data)
        if n < 3 or data[-1] != 0:
            return False
        limits = self.limits
        head_end = data.find(b"\n\n", 0, limits.max_header_line + 2)
        if head_end <= 0 or head_end > limits.max_header_line or n > limits.max_frame_bytes:
            return False
        try:
            text = data[:head_end].decode("utf-8")
        except UnicodeDecodeError:
            return False
        if "\r" in text or "\x00" in text or "\\" in text:
            return False
        lines = text.split("\n")
        command = lines[0]
        if not command or len(lines) > limits.max_headers + 1:
            return False  # no command: the input starts with heart-beats
        headers_list: list[tuple[str, str]] = []
        length = -1
        for i in range(1, len(lines)):
            name, sep, value = lines[i].partition(":")
            if not sep or not name:
                return False
            if length < 0 and name == "content-length":
                if not (value.isascii() and value.isdigit()) or len(value) > 12:
                    return False
                length = int(value)
                if length > limits.max_body_bytes:
                    return False
            headers_list.append((name, value))
        body_start = head_end + 2
        if length >= 0:
            if body_start + length != n - 1:
                return False
        elif data.find(b"\x00", body_start) != n - 1 or n - 1 - body_start > limits.max_body_bytes:
            return False
        headers = tuple(headers_list)
        body = data[body_start:-1]
        if self.validate:
            version = self._version
            check_headers(command, headers, version, self.side)
            check_body(command, body, version)
        events.append(new_frame(command, headers, body))
        if command in UNESCAPED_COMMANDS:
            self._switch_version(command, headers)
        return True

    # The hot path. Complete frames are cut straight out of the caller's bytes (no copy
    # into the buffer) with bytes.find; only a partial tail is kept, with enough resume
    # state that trickled input is never rescanned (no quadratic blow-up).
    def _feed(self, data: bytes | bytearray | memoryview, events: list[Event]) -> None:
        buf: bytes | bytearray
        if self._buf:
            if len(data) >= len(self._buf):
                # Join into immutable bytes: slicing bytes needs no second copy, and the
                # copy costs at most twice the new data (linear overall).
                buf = b"".join((self._buf, data))
                self._buf = bytearray()
            else:
                # Trickled input: append in place so small feeds never recopy the buffer.
                self._buf += data
                buf = self._buf
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        n = len(buf)
        pos = 0
        limits = self.limits
        max_frame = limits.max_frame_bytes
        max_line = limits.max_header_line
        max_headers = limits.max_headers
        max_body = limits.max_body_bytes
        side = self.side
        do_validate = self.validate
        append = events.append
        find = buf.find
        pending = self._pending
        scan = self._scan
        while pos < n:
            if pending is None:
                c = buf[pos]
                if c == 10:
                    append(HeartBeat)
                    pos += 1
                    continue
                if c == 13:
                    if pos + 1 == n:
                        break
                    if buf[pos + 1] == 10:
                        append(HeartBeat)
                        pos += 2
                        continue
                    raise ProtocolError("malformed-frame", "Stray CR between frames")
                if c == 0:
                    raise ProtocolError("malformed-frame", "Frame has no command")
                # Find the blank line ending the headers: "\n\n" or "\n\r\n".
                window = pos + max_frame
                start = pos + scan
                head_end = find(b"\n\n", start, window)
                crlf = find(b"\n\r\n", start, head_end + 2 if head_end >= 0 else window)
                if crlf >= 0:
                    head_end = crlf
                    body_start = crlf + 3
                elif head_end >= 0:
                    body_start = head_end + 2
                nul = find(b"\x00", start, head_end if head_end >= 0 else min(n, window))
                if nul >= 0:
                    # A NUL before the blank line: the spec's own DISCONNECT and RECEIPT
                    # examples omit it, so accept "headers EOL NUL" as a body-less frame.
                    if nul == pos or buf[nul - 1] != 10:
                        raise ProtocolError("malformed-frame", "NUL inside the frame headers")
                    head_end = nul - 2 if nul - 2 >= pos and buf[nul - 2] == 13 else nul - 1
                    body_start = nul
                elif head_end < 0:
                    self._check_partial_head(buf, pos, start, n)
                    if n - pos >= max_frame:
                        raise _too_large(limits)
                    scan = max(0, n - pos - 2)
                    break
                head = buf[pos:head_end]
                if head_end - pos > max_line:
                    for raw in head.split(b"\n"):
                        if len(raw) - raw.endswith(b"\r") > max_line:
                            raise _line_too_long(limits)
                try:
                    text = head.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ProtocolError(
                        "bad-utf8", f"Frame headers are not valid UTF-8 (byte {exc.start})"
                    ) from None
                lines = text.split("\n")
                if "\r" in text:
                    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
                    for ln in lines:
                        if "\r" in ln:
                            raise ProtocolError("malformed-header", "Bare CR inside a header line")
                if len(lines) > max_headers + 1:
                    raise _too_many(limits)
                command = lines[0]
                version = self._version
                escaped = version != "1.0" and "\\" in text and command not in UNESCAPED_COMMANDS
                headers_list: list[tuple[str, str]] = []
                length = -1
                for i in range(1, len(lines)):
                    name, sep, value = lines[i].partition(":")
                    if not sep or not name:
                        raise ProtocolError(
                            "malformed-header", f"Header line {i} is not 'name:value'"
                        )
                    if escaped:
                        name = unescape(name, version)
                        value = unescape(value, version)
                    if length < 0 and name == "content-length":
                        length = _parse_content_length(value, limits)
                    headers_list.append((name, value))
                headers = tuple(headers_list)
                if do_validate:
                    check_headers(command, headers, version, side)
                elif not command:
                    raise ProtocolError("malformed-frame", "Frame has an empty command")
                boff = body_start - pos
                if length >= 0 and boff + length + 1 > max_frame:
                    raise _too_large(limits)
                pending = (command, headers, boff, length, boff)
                scan = 0
            command, headers, boff, length, nul_off = pending
            bstart = pos + boff
            if length >= 0:
                end = bstart + length
                if end >= n:
                    break
                if buf[end] != 0:
                    raise ProtocolError(
                        "bad-content-length",
                        f"No NUL after the {length}-byte body given by content-length",
                    )
            else:
                end = find(b"\x00", pos + nul_off, min(bstart + max_body + 1, pos + max_frame))
                if end < 0:
                    if n - bstart > max_body:
                        raise ProtocolError(
                            "body-too-large",
                            f"Body exceeds the limit of {max_body} bytes",
                        )
                    if n - pos >= max_frame:
                        raise _too_large(limits)
                    pending = (command, headers, boff, length, n - pos)
                    break
            body = bytes(buf[bstart:end])
            if do_validate:
                check_body(command, body, self._version)
            append(new_frame(command, headers, body))
            pos = end + 1
            pending = None
            self._lines = 0
            self._line_start = 0
            if command in UNESCAPED_COMMANDS:
                self._switch_version(command, headers)
        self._pending = pending
        self._scan = scan
        if pos >= n:
            if self._buf:
                self._buf = bytearray()
        elif buf is self._buf:
            del self._buf[:pos]
        else:
            self._buf = bytearray(memoryview(buf)[pos:])

    def _check_partial_head(self, buf: bytes | bytearray, pos: int, start: int, n: int) -> None:
        """Enforce header count and line length on a head whose end has not arrived yet."""
        limits = self.limits
        lines = self._lines
        line_start = self._line_start
        # Count newlines only in bytes not yet counted (start may overlap by 2 bytes).
        i = buf.find(b"\n", max(start, pos + line_start), n)
        while i >= 0:
            if i - (pos + line_start) - (buf[i - 1] == 13) > limits.max_header_line:
                raise _line_too_long(limits)
            lines += 1
            line_start = i + 1 - pos
            if lines > limits.max_headers + 1:
                raise _too_many(limits)
            i = buf.find(b"\n", i + 1, n)
        # The open line may still get a CR before its LF: allow one byte for it.
        if n - (pos + line_start) > limits.max_header_line + 1:
            raise _line_too_long(limits)
        self._lines = lines
        self._line_start = line_start

    def _switch_version(self, command: str, headers: Headers) -> None:
        if command == "CONNECTED":
            if self.side == "client":
                got = next((v for k, v in headers if k == "version"), "1.0")
                if got in VERSIONS:
                    self._version = got
        elif self.side == "server":
            accept = next((v for k, v in headers if k == "accept-version"), None)
            try:
                self._version = negotiate_version(accept, self.supported)
            except ProtocolError:
                pass  # the caller's CONNECT handling reports it
