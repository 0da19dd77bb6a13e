"""Core behaviour of the stomp/ parser, writer, validation and negotiation."""

from __future__ import annotations

import pytest

import stomp
from stomp import Frame, HeartBeat, Limits, Parser, ProtocolError


def feed_all(data: bytes, **kw: object) -> list[stomp.Event]:
    return Parser(**kw).feed(data)  # type: ignore[arg-type]


def feed_bytewise(data: bytes, **kw: object) -> list[stomp.Event]:
    parser = Parser(**kw)  # type: ignore[arg-type]
    out: list[stomp.Event] = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    assert parser.buffered == 0
    return out


SEND = b"SEND\ndestination:/queue/a\n\nhello\x00"


def test_frame_get_first_occurrence_wins() -> None:
    frame = Frame("MESSAGE", (("foo", "1"), ("foo", "2")))
    assert frame.get("foo") == "1"
    assert frame.get_all("foo") == ["1", "2"]
    assert frame.get("bar") is None
    assert frame.get("bar", "x") == "x"
    assert Frame.make("SEND", {"destination": "/q", "n": 3}, "é").headers == (
        ("destination", "/q"),
        ("n", "3"),
    )
    assert Frame.make("SEND", {}, "é").body == "é".encode()


def test_parse_simple_send_whole_and_bytewise() -> None:
    expected = [Frame("SEND", (("destination", "/queue/a"),), b"hello")]
    assert feed_all(SEND) == expected
    assert feed_bytewise(SEND) == expected


def test_crlf_eols_and_heartbeats() -> None:
    data = b"\r\n\nSEND\r\ndestination:/a\r\n\r\nx\x00\r\n\n"
    want = [
        HeartBeat,
        HeartBeat,
        Frame("SEND", (("destination", "/a"),), b"x"),
        HeartBeat,
        HeartBeat,
    ]
    assert feed_all(data) == want
    assert feed_bytewise(data) == want


def test_content_length_body_may_contain_nul() -> None:
    data = b"SEND\ndestination:/a\ncontent-length:5\n\na\x00b\x00c\x00"
    (frame,) = feed_bytewise(data)
    assert isinstance(frame, Frame)
    assert frame.body == b"a\x00b\x00c"


def test_encode_adds_content_length_and_escapes() -> None:
    frame = Frame(
        "MESSAGE", (("destination", "/a:b\n"), ("message-id", "1"), ("subscription", "s")), b"\x00"
    )
    wire = stomp.encode(frame)
    assert (
        wire
        == b"MESSAGE\ndestination:/a\\cb\\n\nmessage-id:1\nsubscription:s\n"
        b"content-length:1\n\n\x00\x00"
    )
    (back,) = Parser(side="client").feed(wire)
    assert back == Frame(frame.command, (*frame.headers, ("content-length", "1")), b"\x00")


def test_connect_headers_never_unescaped() -> None:
    (frame,) = feed_all(b"CONNECT\naccept-version:1.2\nhost:h\nlogin:a\\nb\n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.get("login") == "a\\nb"


def test_unknown_command_and_missing_header() -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all(b"FOO\n\n\x00")
    assert err.value.reason == "unknown-command"
    with pytest.raises(ProtocolError) as err:
        feed_all(b"MESSAGE\ndestination:/a\nmessage-id:1\nsubscription:1\n\n\x00")
    assert err.value.reason == "unknown-command"  # a client may not send MESSAGE
    with pytest.raises(ProtocolError) as err:
        feed_all(b"SEND\n\n\x00")
    assert err.value.reason == "missing-header"
    assert "destination" in err.value.message


def test_limits_each_have_their_reason() -> None:
    small = Limits(max_frame_bytes=200, max_headers=2, max_header_line=30, max_body_bytes=50)
    cases = {
        b"SEND\ndestination:/a\n\n" + b"x" * 60 + b"\x00": "body-too-large",
        b"SEND\ndestination:/a\ncontent-length:60\n\n": "body-too-large",
        b"SEND\ndestination:/" + b"a" * 40 + b"\n\n\x00": "header-line-too-long",
        b"SEND\ndestination:/a\na:1\nb:2\n\n\x00": "too-many-headers",
    }
    for data, reason in cases.items():
        with pytest.raises(ProtocolError) as err:
            feed_all(data, limits=small)
        assert err.value.reason == reason, data
        with pytest.raises(ProtocolError) as err:
            feed_bytewise(data, limits=small)
        assert err.value.reason == reason, data
    big = Limits(max_frame_bytes=100, max_body_bytes=1000)
    with pytest.raises(ProtocolError) as err:
        feed_all(b"SEND\ndestination:/a\n\n" + b"x" * 200, limits=big)
    assert err.value.reason == "frame-too-large"


def test_negotiation() -> None:
    assert stomp.negotiate_version("1.0,1.1,1.2") == "1.2"
    assert stomp.negotiate_version("1.1, 1.0") == "1.1"
    assert stomp.negotiate_version(None) == "1.0"
    with pytest.raises(ProtocolError) as err:
        stomp.negotiate_version("2.0")
    assert err.value.reason == "bad-version"
    assert stomp.parse_heartbeat("100,200") == (100, 200)
    with pytest.raises(ProtocolError) as err:
        stomp.parse_heartbeat("a,b")
    assert err.value.reason == "bad-heart-beat"
    # client can send every 1000 and wants every 5000; server can every 2000, wants 3000
    assert stomp.negotiate_heartbeat((1000, 5000), (2000, 3000)) == (5000, 3000)
    assert stomp.negotiate_heartbeat((0, 5000), (2000, 0)) == (5000, 0)
