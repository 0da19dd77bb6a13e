"""Hypothesis properties: round trip for any frames and any split; any bytes are safe."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stomp
from stomp import Frame, HeartBeat, Limits, Parser, ProtocolError

# Characters a header may carry per version (NUL never; surrogates cannot be UTF-8).
_BASE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_NO_CR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r")
_RAW = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n")
_RAW_NAME = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n:")
ALPHABET = {"1.2": (_BASE, _BASE), "1.1": (_NO_CR, _NO_CR), "1.0": (_RAW_NAME, _RAW)}

# client command -> (required headers in 1.2, may it have a body)
COMMANDS = {
    "SEND": (("destination",), True),
    "SUBSCRIBE": (("destination", "id"), False),
    "UNSUBSCRIBE": (("id",), False),
    "ACK": (("id", "message-id", "subscription"), False),
    "NACK": (("id", "message-id", "subscription"), False),
    "BEGIN": (("transaction",), False),
    "COMMIT": (("transaction",), False),
    "ABORT": (("transaction",), False),
    "DISCONNECT": ((), False),
}


@st.composite
def frames(draw: st.DrawFn, version: str) -> Frame:
    name_chars, value_chars = ALPHABET[version]
    command = draw(st.sampled_from(sorted(c for c in COMMANDS if version != "1.0" or c != "NACK")))
    required, may_have_body = COMMANDS[command]
    names = st.text(name_chars, min_size=1, max_size=12).filter(lambda n: n != "content-length")
    values = st.text(value_chars, max_size=24)
    headers = [(name, draw(values)) for name in required]
    headers += draw(st.lists(st.tuples(names, values), max_size=5))
    if command == "SUBSCRIBE":
        headers = [(k, v) for k, v in headers if k != "ack"]
    body = draw(st.binary(max_size=300)) if may_have_body else b""
    return Frame(command, tuple(headers), body)


def expected(frame: Frame) -> Frame:
    if frame.body and not frame.has("content-length"):
        return Frame(
            frame.command, (*frame.headers, ("content-length", str(len(frame.body)))), frame.body
        )
    return frame


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, list[Frame | type[HeartBeat]], list[int]]:
    version = draw(st.sampled_from(stomp.VERSIONS))
    events = draw(st.lists(st.one_of(frames(version), st.just(HeartBeat)), max_size=8))
    wire_len = sum(len(stomp.encode(e, version)) for e in events)
    cuts = draw(st.lists(st.integers(0, max(wire_len, 0)), max_size=12))
    return version, events, sorted(cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_round_trip_any_frames_any_split(
    case: tuple[str, list[Frame | type[HeartBeat]], list[int]],
) -> None:
    version, events, cuts = case
    wire = stomp.encode_many(events, version)
    parser = Parser(version, side="server")
    got: list[stomp.Event] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        got += parser.feed(wire[start:cut])
        start = max(start, cut)
    assert got == [e if e is HeartBeat else expected(e) for e in events]  # type: ignore[arg-type]
    assert parser.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(stomp.VERSIONS), frames("1.2"))
def test_validate_accepts_what_parser_accepts(version: str, frame: Frame) -> None:
    wire = stomp.encode(frame, "1.2")
    (parsed,) = Parser("1.2").feed(wire)
    assert isinstance(parsed, Frame)
    stomp.validate(parsed, "1.2", "server")


SMALL = Limits(max_frame_bytes=256, max_headers=6, max_header_line=64, max_body_bytes=128)
SEED = (
    b"SEND\ndestination:/a\ncontent-length:3\n\na\x00b\x00\n"
    b"SUBSCRIBE\r\nid:0\r\ndestination:/t\\c\r\n\r\n\x00CONNECT\naccept-version:1.2\n\n\x00"
)


@st.composite
def noisy_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=1500))
    data = bytearray(SEED * draw(st.integers(1, 6)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(
            st.sampled_from([b"\x00", b"\n", b"\r", b"\\", b":", b"\xff", b"x" * 90])
        )
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(
    noisy_bytes(),
    st.integers(1, 64),
    st.sampled_from(stomp.VERSIONS),
    st.sampled_from(["server", "client"]),
)
def test_any_bytes_give_frames_or_protocol_error_with_bounded_memory(
    data: bytes, chunk: int, version: str, side: str
) -> None:
    parser = Parser(version, SMALL, side=side)
    try:
        for i in range(0, len(data), chunk):
            for event in parser.feed(data[i : i + chunk]):
                assert event is HeartBeat or isinstance(event, Frame)
            assert parser.buffered <= SMALL.max_frame_bytes + 1
    except ProtocolError as exc:
        assert exc.reason and exc.message and "\n" not in exc.message
        # a dead parser stays dead, with the same error
        try:
            parser.feed(b"SEND\n")
        except ProtocolError as again:
            assert again is exc
        else:
            raise AssertionError("parser accepted input after a ProtocolError") from None


def test_short_fuzz_run() -> None:
    """A few thousand mutated inputs through the fuzz entry point's random engine."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import fuzz_stomp
    finally:
        sys.path.pop(0)
    assert fuzz_stomp.run_random(4000, seed=7) == 4000


def _outcome(
    parser: Parser, pieces: list[bytes]
) -> tuple[list[stomp.Event], tuple[str, str] | None, str]:
    """Events, error (reason, message) and the version after feeding ``pieces``."""
    got: list[stomp.Event] = []
    try:
        for piece in pieces:
            got += parser.feed(piece)
    except ProtocolError as exc:
        return got + exc.events, (exc.reason, exc.message), parser.version
    return got, None, parser.version


# One frame per input, as a client sends it, with the near misses of the whole-frame path
# (parser._feed_one): CRLF, escapes, NULs, bad lengths, missing headers, limits.
ONE_FRAME = (
    b"SEND\ndestination:/app/chat.send\ncontent-type:application/json\nreceipt:r17\n"
    b'content-length:12\n\n{"a":"\xc3\xa9"}\x00'
)


@st.composite
def one_frame_inputs(draw: st.DrawFn) -> bytes:
    data = bytearray(
        draw(
            st.sampled_from(
                [
                    ONE_FRAME,
                    b"SEND\ndestination:/a\n\nhello\x00",
                    b"CONNECT\naccept-version:1.0,1.1\nhost:x\n\n\x00",
                    b"SUBSCRIBE\nid:0\ndestination:/t\nack:client-individual\n\n\x00",
                    b"DISCONNECT\nreceipt:7\n\n\x00",
                    b"ACK\nid:1\n\n\x00",
                    b"SEND\ndestination:/a\ncontent-length:150\n\n" + b"y" * 150 + b"\x00",
                    b"SEND\ndestination:/a\n\n" + b"z" * 150 + b"\x00",
                ]
            )
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()) and at < len(data):
            del data[at]
        else:
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\x00",
                        b"\n",
                        b"\r",
                        b"\r\n",
                        b"\\",
                        b"\\c",
                        b":",
                        b"\xff",
                        b"x" * 90,
                        b"content-length:3\n",
                        b"content-length:x\n",
                        b"\n\n",
                    ]
                )
            )
    return bytes(data)


@settings(max_examples=1000, deadline=None)
@given(
    one_frame_inputs(),
    st.sampled_from(stomp.VERSIONS),
    st.sampled_from(["server", "client"]),
    st.booleans(),
    st.sampled_from([Limits(), SMALL, Limits(max_headers=3, max_header_line=30)]),
)
def test_one_whole_frame_parses_as_it_does_split(
    data: bytes, version: str, side: str, validate: bool, limits: Limits
) -> None:
    # A feed of one whole frame takes a shortcut; the same bytes in two feeds take the
    # general loop. Both must give the same frames, error and version.
    whole = _outcome(Parser(version, limits, side=side, validate=validate), [data])
    split = _outcome(Parser(version, limits, side=side, validate=validate), [data[:1], data[1:]])
    assert whole == split
