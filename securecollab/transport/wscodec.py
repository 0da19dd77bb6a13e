"""Sans-IO WebSocket (RFC 6455) for the server side of `/ws`: handshake and frames.

Only what a STOMP-over-WebSocket server needs, written for the hot path:

- `parse_upgrade(head)` reads an HTTP/1.1 request head and returns a `Upgrade` when it is
  a well-formed WebSocket upgrade (GET, HTTP/1.1, `Upgrade: websocket`, `Connection:
  upgrade`, version 13, a 16-byte base64 key), else None: the caller then hands the
  connection to the HTTP server, which answers anything else (including malformed
  upgrades) the way it always did.
- `accept_response(key, subprotocol)` is the 101 answer.
- `FrameReader.feed(data)` unmasks client frames as they arrive and returns the payload
  bytes of data messages (text and binary alike, possibly partial: STOMP frames may be
  split across or packed into WebSocket messages, the STOMP parser reassembles them)
  plus control events. Text messages are checked for valid UTF-8 incrementally.
  Violations raise `WsError` with the close code to send (1002 protocol error, 1007
  bad UTF-8, 1009 too big).
- `encode_message(data, text)` frames one server message (unmasked, FIN, no extensions):
  exactly one STOMP frame per WebSocket message, which browser clients rely on.

No extensions are negotiated (no permessage-deflate): RSV bits must be zero.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD_BYTES = 16 * 1024  # a request head larger than this goes to the HTTP server

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_TEXT1 = bytes([0x80 | OP_TEXT])
_BIN1 = bytes([0x80 | OP_BINARY])


class WsError(Exception):
    """The peer broke the protocol: close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket upgrade request, as far as the server needs it."""

    path: str  # without the query string
    key: str
    subprotocols: tuple[str, ...]
    authorization: str | None
    forwarded_for: str | None = None  # X-Forwarded-For (repeated headers joined by ", ")


def parse_upgrade(head: bytes) -> Upgrade | None:
    """The upgrade in a complete request head (ending in CRLF CRLF), None if it is not one."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes every byte; kept for clarity
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
        return None
    headers: dict[str, str] = {}
    protocols: list[str] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            return None  # obs-fold, whitespace before ":" and the like: not ours to judge
        lname = name.lower()
        value = value.strip(" \t")
        if lname == "sec-websocket-protocol":
            protocols.extend(p.strip() for p in value.split(",") if p.strip())
        elif lname in headers:
            if lname in ("host", "sec-websocket-key", "authorization", "upgrade"):
                return None  # duplicated where one is required
            headers[lname] += ", " + value
        else:
            headers[lname] = value
    if "host" not in headers:
        return None
    if "websocket" not in [t.strip().lower() for t in headers.get("upgrade", "").split(",")]:
        return None
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        return None
    if headers.get("sec-websocket-version") != "13":
        return None
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return Upgrade(
        path=parts[1].partition("?")[0],
        key=key,
        subprotocols=tuple(protocols),
        authorization=headers.get("authorization"),
        forwarded_for=headers.get("x-forwarded-for"),
    )


def accept_response(key: str, subprotocol: str | None) -> bytes:
    """The `101 Switching Protocols` answer to an upgrade with `key`."""
    accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def encode_message(data: bytes, text: bool) -> bytes:
    """One unfragmented, unmasked server message."""
    n = len(data)
    first = _TEXT1 if text else _BIN1
    if n < 126:
        return first + bytes((n,)) + data
    if n < 65_536:
        return first + b"\x7e" + _U16.pack(n) + data
    return first + b"\x7f" + _U64.pack(n) + data


def encode_control(opcode: int, payload: bytes = b"") -> bytes:
    """A control frame (close, ping, pong); payload at most 125 bytes."""
    return bytes((0x80 | opcode, len(payload))) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """Payload of a close frame: the code, then a UTF-8 reason cut to fit 125 bytes."""
    return _U16.pack(code) + reason.encode("utf-8")[:123]


def _unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR `data` with the 4-byte `mask` starting at mask position `offset`."""
    n = len(data)
    if n == 0:
        return b""
    if offset % 4:
        r = offset % 4
        mask = mask[r:] + mask[:r]
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or (3000 <= code <= 4999)


class FrameReader:
    """Incremental parser of client frames; see the module docstring.

    `feed` returns `(data, events)`: `data` is the concatenated payload of data frames
    (unmasked), `events` the control frames that arrived, in order relative to each
    other: ("ping", payload), ("pong", payload), ("close", code, reason). After a close
    event nothing more is parsed.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = b""
        self._closed = False
        # the data frame being read (payload may arrive over several feeds)
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._mask = b""
        self._offset = 0  # bytes of the current frame's payload unmasked so far
        self._message_bytes = 0  # bytes of the current (maybe fragmented) message
        self._in_message = False  # a fragmented message awaits its continuation
        self._utf8: codecs.BufferedIncrementalDecoder | None = None  # text messages only
        self._fin = True

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[object, ...]]]:
        if self._closed:
            return b"", []
        if not (self._buf or self._in_message):
            # Fast path for what a client sends almost always: `data` is exactly one whole
            # masked, final text or binary frame with a 7- or 16-bit length. The same
            # checks as below, without the resume state and the incremental decoder.
            n = len(data)
            if n >= 6 and 0x81 <= data[0] <= 0x82:
                length = data[1] - 0x80  # negative: not masked (the general path says so)
                header = 6
                if length >= 126:
                    if length == 126 and n >= 8:
                        length = (data[2] << 8) | data[3]
                        header = 8
                    else:
                        length = -1  # 64-bit lengths: general path
                if 0 <= length == n - header and length <= self.max_message_bytes:
                    payload = _unmask(data[header:], data[header - 4 : header], 0)
                    if data[0] == 0x81 and not payload.isascii():
                        try:
                            payload.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise WsError(1007, "invalid UTF-8 in a text message") from exc
                    return payload, []
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        events: list[tuple[object, ...]] = []
        pos = 0
        end = len(buf)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                chunk = _unmask(buf[pos : pos + take], self._mask, self._offset)
                pos += take
                self._offset += take
                self._remaining -= take
                if self._utf8 is not None:
                    try:
                        self._utf8.decode(chunk, False)
                    except UnicodeDecodeError as exc:
                        raise WsError(1007, "invalid UTF-8 in a text message") from exc
                out.append(chunk)
                if not self._remaining:
                    self._end_data_frame()
                continue
            # a frame header: 2 bytes, extended length, 4-byte mask
            if end - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise WsError(1002, "reserved bits set (no extension was negotiated)")
            if not b1 & 0x80:
                raise WsError(1002, "client frames must be masked")
            length = b1 & 0x7F
            header = 6
            if length == 126:
                header = 8
                if end - pos < header:
                    break
                length = _U16.unpack_from(buf, pos + 2)[0]
            elif length == 127:
                header = 14
                if end - pos < header:
                    break
                length = _U64.unpack_from(buf, pos + 2)[0]
                if length >> 63:
                    raise WsError(1002, "frame length out of range")
            if end - pos < header:
                break
            fin = bool(b0 & 0x80)
            opcode = b0 & 0x0F
            mask = buf[pos + header - 4 : pos + header]
            if opcode >= 0x8:
                if not fin or length > 125:
                    raise WsError(1002, "control frames must be unfragmented and <= 125 bytes")
                if end - pos < header + length:
                    break
                payload = _unmask(buf[pos + header : pos + header + length], mask, 0)
                pos += header + length
                event = self._control(opcode, payload)
                events.append(event)
                if event[0] == "close":
                    self._closed = True
                    break
                continue
            if opcode == OP_CONT:
                if not self._in_message:
                    raise WsError(1002, "continuation frame without a message")
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._in_message:
                    raise WsError(1002, "new message before the previous one finished")
                self._message_bytes = 0
                self._utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
            else:
                raise WsError(1002, f"unknown opcode {opcode:#x}")
            self._message_bytes += length
            if self._message_bytes > self.max_message_bytes:
                raise WsError(1009, f"message larger than {self.max_message_bytes} bytes")
            pos += header
            self._in_message = True
            self._fin = fin
            self._mask = mask
            self._offset = 0
            self._remaining = length
            if not length:
                self._end_data_frame()
        self._buf = buf[pos:] if pos < end else b""
        return (out[0] if len(out) == 1 else b"".join(out)), events

    def _end_data_frame(self) -> None:
        if self._fin:
            self._in_message = False
            if self._utf8 is not None:
                try:
                    self._utf8.decode(b"", True)
                except UnicodeDecodeError as exc:
                    raise WsError(1007, "invalid UTF-8 in a text message") from exc
                self._utf8 = None

    @staticmethod
    def _control(opcode: int, payload: bytes) -> tuple[object, ...]:
        if opcode == OP_PING:
            return ("ping", payload)
        if opcode == OP_PONG:
            return ("pong", payload)
        if opcode != OP_CLOSE:
            raise WsError(1002, f"unknown control opcode {opcode:#x}")
        if not payload:
            return ("close", 1005, "")
        if len(payload) == 1:
            raise WsError(1002, "close frame with a 1-byte payload")
        code = _U16.unpack_from(payload)[0]
        if not _valid_close_code(code):
            raise WsError(1002, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WsError(1007, "invalid UTF-8 in the close reason") from exc
        return ("close", code, reason)
