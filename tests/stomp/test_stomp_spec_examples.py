"""Every example frame of the STOMP 1.2 specification, parsed as the spec says it reads.

https://stomp.github.io/stomp-specification-1.2.html — ``^@`` is the NUL octet. Each
example is fed whole and one byte at a time, to the side that receives it.
"""

from __future__ import annotations

import pytest

import stomp
from stomp import Frame, Parser, ProtocolError


def parse(data: bytes, side: str) -> Frame:
    whole = Parser(side=side).feed(data)
    parser = Parser(side=side)
    trickled: list[stomp.Event] = []
    for i in range(len(data)):
        trickled += parser.feed(data[i : i + 1])
    assert whole == trickled
    frames = [e for e in whole if isinstance(e, Frame)]
    assert len(frames) == 1
    return frames[0]


def nul(text: str) -> bytes:
    return text.replace("^@", "\x00").encode()


# (section, wire text, receiving side, expected command, expected headers, expected body)
EXAMPLES = [
    (
        "STOMP Frames / SEND",
        "SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n^@",
        "server",
        "SEND",
        (("destination", "/queue/a"), ("content-type", "text/plain")),
        b"hello queue a\n",
    ),
    (
        "Repeated Header Entries",
        "MESSAGE\nfoo:World\nfoo:Hello\n\n^@",
        None,  # not a complete MESSAGE (no destination): framing only
        "MESSAGE",
        (("foo", "World"), ("foo", "Hello")),
        b"",
    ),
    (
        "Connecting / CONNECT",
        "CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n^@",
        "server",
        "CONNECT",
        (("accept-version", "1.2"), ("host", "stomp.github.org")),
        b"",
    ),
    (
        "Connecting / CONNECTED",
        "CONNECTED\nversion:1.2\n\n^@",
        "client",
        "CONNECTED",
        (("version", "1.2"),),
        b"",
    ),
    (
        "Protocol Negotiation / CONNECT",
        "CONNECT\naccept-version:1.0,1.1,2.0\nhost:stomp.github.org\n\n^@",
        "server",
        "CONNECT",
        (("accept-version", "1.0,1.1,2.0"), ("host", "stomp.github.org")),
        b"",
    ),
    (
        "Protocol Negotiation / CONNECTED",
        "CONNECTED\nversion:1.1\n\n^@",
        "client",
        "CONNECTED",
        (("version", "1.1"),),
        b"",
    ),
    (
        "Protocol Negotiation / ERROR",
        "ERROR\nversion:1.2,2.1\ncontent-type:text/plain\n\n"
        "Supported protocol versions are 1.2 2.1^@",
        "client",
        "ERROR",
        (("version", "1.2,2.1"), ("content-type", "text/plain")),
        b"Supported protocol versions are 1.2 2.1",
    ),
    (
        "SUBSCRIBE",
        "SUBSCRIBE\nid:0\ndestination:/queue/foo\nack:client\n\n^@",
        "server",
        "SUBSCRIBE",
        (("id", "0"), ("destination", "/queue/foo"), ("ack", "client")),
        b"",
    ),
    ("UNSUBSCRIBE", "UNSUBSCRIBE\nid:0\n\n^@", "server", "UNSUBSCRIBE", (("id", "0"),), b""),
    (
        "ACK",
        "ACK\nid:12345\ntransaction:tx1\n\n^@",
        "server",
        "ACK",
        (("id", "12345"), ("transaction", "tx1")),
        b"",
    ),
    ("BEGIN", "BEGIN\ntransaction:tx1\n\n^@", "server", "BEGIN", (("transaction", "tx1"),), b""),
    ("COMMIT", "COMMIT\ntransaction:tx1\n\n^@", "server", "COMMIT", (("transaction", "tx1"),), b""),
    ("ABORT", "ABORT\ntransaction:tx1\n\n^@", "server", "ABORT", (("transaction", "tx1"),), b""),
    # The spec prints these two without the blank line after the headers; accepted.
    ("DISCONNECT", "DISCONNECT\nreceipt:77\n^@", "server", "DISCONNECT", (("receipt", "77"),), b""),
    (
        "DISCONNECT / RECEIPT",
        "RECEIPT\nreceipt-id:77\n^@",
        "client",
        "RECEIPT",
        (("receipt-id", "77"),),
        b"",
    ),
    (
        "Header receipt / SEND",
        "SEND\ndestination:/queue/a\nreceipt:message-12345\n\nhello queue a^@",
        "server",
        "SEND",
        (("destination", "/queue/a"), ("receipt", "message-12345")),
        b"hello queue a",
    ),
    (
        "MESSAGE",
        "MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\n"
        "content-type:text/plain\n\nhello queue a^@",
        "client",
        "MESSAGE",
        (
            ("subscription", "0"),
            ("message-id", "007"),
            ("destination", "/queue/a"),
            ("content-type", "text/plain"),
        ),
        b"hello queue a",
    ),
    (
        "RECEIPT",
        "RECEIPT\nreceipt-id:message-12345\n\n^@",
        "client",
        "RECEIPT",
        (("receipt-id", "message-12345"),),
        b"",
    ),
]

ERROR_BODY = (
    "The message:\n-----\nMESSAGE\ndestined:/queue/a\nreceipt:message-12345\n\n"
    "Hello queue a!\n-----\nDid not contain a destination header, which is REQUIRED\n"
    "for message propagation.\n"
)


@pytest.mark.parametrize(
    ("section", "text", "side", "command", "headers", "body"),
    EXAMPLES,
    ids=[e[0] for e in EXAMPLES],
)
def test_spec_example(
    section: str,
    text: str,
    side: str | None,
    command: str,
    headers: stomp.Headers,
    body: bytes,
) -> None:
    data = nul(text)
    if side is None:
        frame = parse_unvalidated(data)
    else:
        frame = parse(data, side)
    assert frame == Frame(command, headers, body), section
    if side is not None:
        stomp.validate(frame, "1.2", side)


def parse_unvalidated(data: bytes) -> Frame:
    (frame,) = Parser(side="client", validate=False).feed(data)
    assert isinstance(frame, Frame)
    return frame


def test_repeated_header_first_wins() -> None:
    frame = parse_unvalidated(nul("MESSAGE\nfoo:World\nfoo:Hello\n\n^@"))
    assert frame.get("foo") == "World"


def test_nack_example_headers() -> None:
    # The spec says NACK "takes the same headers as ACK" (id, transaction).
    frame = parse(b"NACK\nid:12345\ntransaction:tx1\n\n\x00", "server")
    assert frame.get("id") == "12345"


def test_error_example_with_content_length() -> None:
    # The spec's ERROR example says content-length:171 for a body the page prints as 170
    # octets; with the honest length it parses, header value spaces are kept (no trimming).
    text = (
        "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\n"
        f"content-length:{len(ERROR_BODY)}\nmessage: malformed frame received\n\n{ERROR_BODY}^@"
    )
    frame = parse(nul(text), "client")
    assert frame.get("message") == " malformed frame received"
    assert frame.body == ERROR_BODY.encode()
    # ... and the printed 171 is a clear bad-content-length, never a silent misparse.
    with pytest.raises(ProtocolError) as err:
        Parser(side="client").feed(
            nul(text.replace(f"length:{len(ERROR_BODY)}", "length:171")) + b"\n"
        )
    assert err.value.reason == "bad-content-length"


def test_connect_negotiation_examples() -> None:
    assert stomp.negotiate_version("1.0,1.1,2.0") == "1.1"
    with pytest.raises(ProtocolError) as err:
        stomp.negotiate_version("2.1", supported=("1.2",))
    assert err.value.reason == "bad-version"
    # "heart-beat:<cx>,<cy>" / "<sx>,<sy>": MAX rule, 0 disables a direction
    assert stomp.negotiate_heartbeat((0, 0), (10, 10)) == (0, 0)
    assert stomp.negotiate_heartbeat((100, 200), (300, 50)) == (300, 100)
