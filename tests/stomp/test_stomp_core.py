"""Core behaviour of the stomp/ parser, writer, validation and negotiation."""

from __future__ import annotations

import dataclasses

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
        wire == b"MESSAGE\ndestination:/a\\cb\\n\nmessage-id:1\nsubscription:s\n"
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


def reason_of(data: bytes, **kw: object) -> str:
    with pytest.raises(ProtocolError) as err:
        feed_all(data, **kw)
    whole = err.value.reason
    with pytest.raises(ProtocolError):
        feed_bytewise(data, **kw)
    return whole


def test_escapes_per_version() -> None:
    line = b"SEND\ndestination:/a\\c\\\\\\n\\r\n\n\x00"
    (f12,) = feed_all(line, version="1.2")
    assert isinstance(f12, Frame)
    assert f12.get("destination") == "/a:\\\n\r"
    # 1.1 has no \r escape: it is an undefined escape, a fatal error
    assert reason_of(line, version="1.1") == "bad-escape"
    (f11,) = feed_all(b"SEND\ndestination:/a\\c\\\\\\n\n\n\x00", version="1.1")
    assert isinstance(f11, Frame)
    assert f11.get("destination") == "/a:\\\n"
    # 1.0 has no escaping at all
    (f10,) = feed_all(line, version="1.0")
    assert isinstance(f10, Frame)
    assert f10.get("destination") == "/a\\c\\\\\\n\\r"
    assert reason_of(b"SEND\ndestination:/a\\t\n\n\x00") == "bad-escape"
    assert reason_of(b"SEND\ndestination:/a\\\n\n\x00") == "bad-escape"  # trailing backslash


def test_writer_escapes_per_version() -> None:
    frame = Frame("SEND", (("destination", "a:b\\c\n"),))
    assert stomp.encode(frame, "1.2") == b"SEND\ndestination:a\\cb\\\\c\\n\n\n\x00"
    assert stomp.encode(frame, "1.1") == b"SEND\ndestination:a\\cb\\\\c\\n\n\n\x00"
    with pytest.raises(ValueError):
        stomp.encode(frame, "1.0")  # 1.0 cannot carry a newline in a header
    with pytest.raises(ValueError):
        stomp.encode(Frame("SEND", (("destination", "a\r"),)), "1.1")
    assert (
        stomp.encode(Frame("SEND", (("destination", "a:b"),)), "1.0")
        == b"SEND\ndestination:a:b\n\n\x00"
    )
    # CONNECT/CONNECTED are never escaped
    assert (
        stomp.encode(Frame("CONNECT", (("passcode", "a:b\\n"),)))
        == b"CONNECT\npasscode:a:b\\n\n\n\x00"
    )
    with pytest.raises(ValueError):
        stomp.encode(Frame("SEND", (("content-length", "9"),), b"abc"))
    assert stomp.encode(HeartBeat) == stomp.HEARTBEAT_BYTES == b"\n"


def test_bad_utf8_is_a_clear_error() -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all(b"SEND\ndestination:/\xff\xfe\n\n\x00")
    assert err.value.reason == "bad-utf8"
    assert "UTF-8" in err.value.message
    (frame,) = feed_all("SEND\ndestination:/é/日本\n\n\x00".encode())
    assert isinstance(frame, Frame)
    assert frame.get("destination") == "/é/日本"


def test_header_values_are_not_trimmed_and_colons_after_the_first_are_kept() -> None:
    (frame,) = feed_all(b"SEND\ndestination: /a \nx:1:2\n\n\x00")
    assert isinstance(frame, Frame)
    assert frame.headers == (("destination", " /a "), ("x", "1:2"))


def test_framing_errors() -> None:
    assert reason_of(b"SEND\ndestination:/a\nnocolon\n\n\x00") == "malformed-header"
    assert reason_of(b"SEND\ndestination:/a\n:empty-name\n\n\x00") == "malformed-header"
    assert reason_of(b"SEND\ndestination:/a\ncontent-length:x\n\n\x00") == "bad-content-length"
    assert reason_of(b"SEND\ndestination:/a\ncontent-length:1\n\nab\x00") == "bad-content-length"
    assert reason_of(b"SUBSCRIBE\nid:1\ndestination:/a\n\nbody\x00") == "unexpected-body"
    assert reason_of(b"SUBSCRIBE\nid:1\ndestination:/a\nack:sometimes\n\n\x00") == "bad-header"
    assert reason_of(b"CONNECT\nheart-beat:fast\n\n\x00") == "bad-heart-beat"
    assert reason_of(b"\rSEND\n\n\x00") == "malformed-frame"
    assert reason_of(b"send\ndestination:/a\n\n\x00") == "unknown-command"  # case sensitive


def test_required_headers_per_version() -> None:
    # 1.2 ACK needs id; 1.1 message-id + subscription; 1.0 message-id; NACK not in 1.0
    assert feed_all(b"ACK\nid:1\n\n\x00", version="1.2")
    assert (
        reason_of(b"ACK\nmessage-id:1\nsubscription:0\n\n\x00", version="1.2") == "missing-header"
    )
    assert feed_all(b"ACK\nmessage-id:1\nsubscription:0\n\n\x00", version="1.1")
    assert reason_of(b"ACK\nmessage-id:1\n\n\x00", version="1.1") == "missing-header"
    assert feed_all(b"ACK\nmessage-id:1\n\n\x00", version="1.0")
    assert reason_of(b"NACK\nmessage-id:1\n\n\x00", version="1.0") == "unknown-command"
    assert reason_of(b"SUBSCRIBE\ndestination:/a\n\n\x00", version="1.2") == "missing-header"
    assert feed_all(b"SUBSCRIBE\ndestination:/a\n\n\x00", version="1.0")
    assert feed_all(b"UNSUBSCRIBE\ndestination:/a\n\n\x00", version="1.0")
    assert reason_of(b"UNSUBSCRIBE\ndestination:/a\n\n\x00", version="1.1") == "missing-header"
    for command in (b"BEGIN", b"COMMIT", b"ABORT"):
        assert reason_of(command + b"\n\n\x00") == "missing-header"
    assert (
        reason_of(b"MESSAGE\ndestination:/a\nmessage-id:1\n\n\x00", side="client")
        == "missing-header"
    )
    assert reason_of(b"RECEIPT\n\n\x00", side="client") == "missing-header"
    assert reason_of(b"SEND\ndestination:/a\n\n\x00", side="client") == "unknown-command"
    assert feed_all(b"ERROR\n\n\x00", side="client")
    # a STOMP 1.2 client must send host, but real clients omit it: accepted
    assert feed_all(b"STOMP\naccept-version:1.2\n\n\x00")


def test_trailing_eols_after_nul_are_heartbeats_not_frames() -> None:
    data = b"SEND\ndestination:/a\n\nx\x00\n\r\n\n"
    events = feed_bytewise(data)
    assert events[1:] == [HeartBeat, HeartBeat, HeartBeat]


def test_connect_switches_version_for_pipelined_frames() -> None:
    parser = Parser(side="server")  # starts at 1.2
    with pytest.raises(ProtocolError) as err:
        parser.feed(
            b"CONNECT\naccept-version:1.0,1.1\nhost:h\n\n\x00SEND\ndestination:/a\\r\n\n\x00"
        )
    # 1.1 was negotiated before the pipelined SEND was read, and 1.1 has no \r escape
    assert parser.version == "1.1"
    assert err.value.reason == "bad-escape"
    assert [e.command for e in err.value.events] == ["CONNECT"]
    parser = Parser(side="server")
    events = parser.feed(b"CONNECT\n\n\x00SEND\ndestination:/a\\r\n\n\x00")
    assert parser.version == "1.0"  # no accept-version: 1.0, where backslashes are literal
    assert isinstance(events[1], Frame)
    assert events[1].get("destination") == "/a\\r"


def test_memory_stays_bounded_under_trickle_and_flood() -> None:
    limits = Limits(max_frame_bytes=4096, max_body_bytes=4096)
    parser = Parser(limits=limits)
    parser.feed(b"SEND\ndestination:/a\n\n")
    with pytest.raises(ProtocolError) as err:
        for _ in range(10_000):
            parser.feed(b"y")
            assert parser.buffered <= limits.max_frame_bytes + 1
    assert err.value.reason in ("frame-too-large", "body-too-large")
    # a header block that never ends
    parser = Parser(limits=limits)
    with pytest.raises(ProtocolError) as err:
        for _ in range(10_000):
            parser.feed(b"SEND\n")
            assert parser.buffered <= limits.max_frame_bytes + 1
    assert err.value.reason == "too-many-headers"
    # one huge chunk: rejected without buffering it
    parser = Parser(limits=limits)
    with pytest.raises(ProtocolError):
        parser.feed(b"SEND\ndestination:/a\n\n" + b"z" * 1_000_000)
    assert parser.buffered == 0


def test_parsed_content_length_with_leading_zero_re_encodes() -> None:
    # found by the fuzzer: "05" parses as 5, so relaying the frame must not raise
    (frame,) = feed_all(b"SEND\ndestination:/a\ncontent-length:05\n\nhello\x00")
    assert isinstance(frame, Frame)
    assert frame.body == b"hello"
    (again,) = Parser().feed(stomp.encode(frame))
    assert again == frame


def test_new_frame_is_the_frame_the_constructor_makes() -> None:
    from stomp._frame import new_frame

    made = new_frame("SEND", (("destination", "/a"),), b"x")
    assert made == Frame("SEND", (("destination", "/a"),), b"x")
    assert hash(made) == hash(Frame("SEND", (("destination", "/a"),), b"x"))
    assert repr(made) == repr(Frame("SEND", (("destination", "/a"),), b"x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.command = "MESSAGE"  # type: ignore[misc]
