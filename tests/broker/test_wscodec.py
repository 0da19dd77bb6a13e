"""`transport/wscodec.py`: the WebSocket handshake and frame codec of the `/ws` front door."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from securecollab.transport import wscodec

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


GOOD = [
    "GET /ws?x=1 HTTP/1.1",
    "Host: example",
    "Upgrade: websocket",
    "Connection: keep-alive, Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Protocol: v10.stomp, v12.stomp",
    "Sec-WebSocket-Protocol: other",
    "Authorization: Bearer abc",
]


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """A client frame, masked with a random key (as browsers send them)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        hdr = bytes((b0, (0x80 if mask else 0) | n))
    elif n < 65536:
        hdr = bytes((b0, (0x80 if mask else 0) | 126)) + struct.pack("!H", n)
    else:
        hdr = bytes((b0, (0x80 if mask else 0) | 127)) + struct.pack("!Q", n)
    if not mask:
        return hdr + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return hdr + key + masked


def test_parse_upgrade_reads_what_the_server_needs() -> None:
    up = wscodec.parse_upgrade(head(*GOOD))
    assert up is not None
    assert up.path == "/ws"
    assert up.key == KEY
    assert up.subprotocols == ("v10.stomp", "v12.stomp", "other")
    assert up.authorization == "Bearer abc"


@pytest.mark.parametrize(
    "change",
    [
        (0, "POST /ws HTTP/1.1"),
        (0, "GET /ws HTTP/1.0"),
        (0, "GET /ws"),
        (1, "X-Nothing: 1"),  # no Host
        (2, "Upgrade: h2c"),
        (3, "Connection: keep-alive"),
        (4, "Sec-WebSocket-Key: short"),
        (4, "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!"),
        (5, "Sec-WebSocket-Version: 8"),
        (1, "Host : example"),  # whitespace before the colon
        (1, " folded"),  # obs-fold
    ],
)
def test_parse_upgrade_refuses_anything_not_well_formed(change: tuple[int, str]) -> None:
    lines = list(GOOD)
    lines[change[0]] = change[1]
    assert wscodec.parse_upgrade(head(*lines)) is None


def test_parse_upgrade_refuses_a_duplicated_key() -> None:
    assert wscodec.parse_upgrade(head(*GOOD, f"Sec-WebSocket-Key: {KEY}")) is None


def test_accept_response_matches_the_rfc_example() -> None:
    resp = wscodec.accept_response(KEY, "v12.stomp").decode()
    assert resp.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in resp
    assert "Sec-WebSocket-Protocol: v12.stomp\r\n" in resp
    assert resp.endswith("\r\n\r\n")
    assert "Sec-WebSocket-Protocol" not in wscodec.accept_response(KEY, None).decode()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("text", [True, False])
def test_encode_message_is_read_back_by_wsproto(size: int, text: bool) -> None:
    data = (b"x" * size) if text else os.urandom(size)
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(wscodec.encode_message(data, text))
    frames = list(reader.received_frames())
    assert len(frames) == 1
    frame = frames[0]
    assert frame.opcode is (Opcode.TEXT if text else Opcode.BINARY)
    assert frame.message_finished
    payload = frame.payload.encode() if isinstance(frame.payload, str) else bytes(frame.payload)
    assert payload == data


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.booleans(), st.binary(min_size=0, max_size=300), st.integers(1, 3)),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_frame_reader_reassembles_data_whatever_the_chunking(
    messages: list[tuple[bool, bytes, int]], cuts: list[int]
) -> None:
    wire = b""
    expected = b""
    for is_text, raw, pieces in messages:
        data = raw.decode("latin-1").encode("utf-8") if is_text else raw
        step = max(1, len(data) // pieces + 1)
        chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            op = (wscodec.OP_TEXT if is_text else wscodec.OP_BINARY) if i == 0 else 0
            wire += client_frame(op, chunk, fin=i == len(chunks) - 1)
            if i == 0:
                wire += client_frame(wscodec.OP_PING, b"p")  # control frames interleave
        expected += data
    reader = wscodec.FrameReader(1 << 20)
    got = b""
    pings = 0
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        data, events = reader.feed(wire[a:b])
        got += data
        pings += sum(1 for e in events if e[0] == "ping")
    assert got == expected
    assert pings == len(messages)


def test_frame_reader_reads_16_and_64_bit_lengths() -> None:
    reader = wscodec.FrameReader(1 << 20)
    big = os.urandom(70000)
    data, _ = reader.feed(client_frame(wscodec.OP_BINARY, big[:300]) + client_frame(2, big))
    assert data == big[:300] + big


def masked_frame(opcode: int, payload: bytes, length_bytes: int) -> bytes:
    """A final masked frame whose length takes `length_bytes` (0, 2 or 8: maybe non-minimal)."""
    n = len(payload)
    marker = {0: n, 2: 126, 8: 127}[length_bytes]
    ext = struct.pack("!Q", n)
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | marker)) + ext[8 - length_bytes :] + key + masked


@pytest.mark.parametrize(
    ("size", "length_bytes"),
    [
        (0, 0),
        (1, 0),
        (119, 0),
        (125, 0),
        (0, 2),
        (2, 2),
        (119, 2),
        (126, 2),
        (900, 2),
        (65535, 2),
        (0, 8),
        (119, 8),
        (125, 8),
        (900, 8),
        (70000, 8),
    ],
)
@pytest.mark.parametrize("opcode", [wscodec.OP_TEXT, wscodec.OP_BINARY])
def test_one_whole_frame_per_feed_in_every_length_encoding(
    size: int, length_bytes: int, opcode: int
) -> None:
    # The common case (one read = one whole frame) has a fast path; a 64-bit length of a
    # 119-byte payload makes a 133-byte frame, as long as a 7-bit 127-byte one would be.
    if length_bytes == 0 and size > 125:
        pytest.skip("no 7-bit encoding")
    text = ("é" * (size // 2) + "x" * (size % 2)).encode()  # size bytes, not all ASCII
    payload = text if opcode == wscodec.OP_TEXT else os.urandom(size)
    reader = wscodec.FrameReader(1 << 20)
    for _ in range(3):
        assert reader.feed(masked_frame(opcode, payload, length_bytes)) == (payload, [])
    bad = b"\xff" + payload[1:] if size else b""
    if opcode == wscodec.OP_TEXT and size:
        with pytest.raises(wscodec.WsError) as info:
            wscodec.FrameReader(1 << 20).feed(masked_frame(opcode, bad, length_bytes))
        assert info.value.code == 1007
    if size:
        with pytest.raises(wscodec.WsError) as info:
            wscodec.FrameReader(size - 1).feed(masked_frame(opcode, payload, length_bytes))
        assert info.value.code == 1009


def test_close_frame_gives_code_and_reason_then_nothing_more() -> None:
    reader = wscodec.FrameReader(1024)
    frame = client_frame(wscodec.OP_CLOSE, struct.pack("!H", 1000) + "bye ✓".encode())
    data, events = reader.feed(frame + client_frame(wscodec.OP_TEXT, b"late"))
    assert data == b""
    assert events == [("close", 1000, "bye ✓")]
    assert reader.feed(client_frame(wscodec.OP_TEXT, b"later")) == (b"", [])
    empty = wscodec.FrameReader(1024).feed(client_frame(wscodec.OP_CLOSE, b""))
    assert empty[1] == [("close", 1005, "")]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(wscodec.OP_TEXT, b"hi", mask=False), 1002),  # unmasked
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 without an extension
        (client_frame(0x3, b"x"), 1002),  # reserved data opcode
        (client_frame(0xB, b"x"), 1002),  # reserved control opcode
        (client_frame(wscodec.OP_CONT, b"x"), 1002),  # continuation of nothing
        (client_frame(wscodec.OP_PING, b"x", fin=False), 1002),  # fragmented control
        (client_frame(wscodec.OP_PING, b"x" * 126), 1002),  # control > 125 bytes
        (client_frame(wscodec.OP_CLOSE, b"\x03"), 1002),  # 1-byte close payload
        (client_frame(wscodec.OP_CLOSE, struct.pack("!H", 1005)), 1002),  # reserved code
        (client_frame(wscodec.OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
        (client_frame(wscodec.OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (client_frame(wscodec.OP_TEXT, b"a" * 2000), 1009),  # over the limit
        (
            client_frame(wscodec.OP_TEXT, b"a", fin=False) + client_frame(wscodec.OP_TEXT, b"b"),
            1002,
        ),  # a new message inside a fragmented one
    ],
)
def test_violations_raise_with_the_close_code(wire: bytes, code: int) -> None:
    reader = wscodec.FrameReader(1024)
    with pytest.raises(wscodec.WsError) as info:
        reader.feed(wire)
    assert info.value.code == code


def test_utf8_split_across_fragments_is_valid() -> None:
    snowman = "☃".encode()
    reader = wscodec.FrameReader(1024)
    wire = client_frame(wscodec.OP_TEXT, snowman[:1], fin=False) + client_frame(0, snowman[1:])
    assert reader.feed(wire)[0] == snowman
    truncated = wscodec.FrameReader(1024)
    with pytest.raises(wscodec.WsError):
        truncated.feed(client_frame(wscodec.OP_TEXT, snowman[:2]))
