"""The session's fast frame encoder writes exactly what `stomp.encode` writes, or declines."""

from __future__ import annotations

import random
from typing import Any, cast

import stomp
from securecollab.broker.destinations import Destination, Kind
from securecollab.broker.session import (
    RESERVED_HEADERS,
    Subscription,
    _auto_message,
    _plain_encode,
)

PIECES = ["a", "id", "content-length", "0", "5", "05", ":", "\\", "\r", "\n", "\x00", "é", " ", "/"]


def random_frame(rng: random.Random) -> stomp.Frame:
    headers = []
    for _ in range(rng.randint(0, 5)):
        name = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 2)))
        value = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
        headers.append((name, value))
    if rng.random() < 0.3:
        headers.append(("content-length", str(rng.randint(0, 3))))
    body = rng.choice([b"", b"x", b"abc", b"\x00\xff"])
    command = rng.choice(["MESSAGE", "RECEIPT", "ERROR", "CONNECTED"])
    return stomp.Frame(command, tuple(headers), body)


def test_plain_encode_matches_stomp_encode_for_every_version() -> None:
    rng = random.Random(7)
    plain = 0
    for _ in range(20_000):
        frame = random_frame(rng)
        data = _plain_encode(frame)
        if data is None:
            continue
        plain += 1
        for version in stomp.VERSIONS:
            assert stomp.encode(frame, version) == data, (frame, version)
    assert plain > 2_000  # the comparison ran on plenty of frames


def test_plain_encode_declines_what_needs_escaping_or_checking() -> None:
    assert _plain_encode(stomp.Frame("RECEIPT", (("receipt-id", "a:b"),))) is None
    assert _plain_encode(stomp.Frame("MESSAGE", (("x", "a\\b"),), b"")) is None
    assert _plain_encode(stomp.Frame("MESSAGE", (("", "v"),), b"")) is None
    assert _plain_encode(stomp.Frame("MESSAGE", (("content-length", "05"),), b"12345")) is None
    receipt = stomp.Frame("RECEIPT", (("receipt-id", "r1"),))
    assert _plain_encode(receipt) == b"RECEIPT\nreceipt-id:r1\n\n\x00"


def test_auto_message_matches_the_general_message_frame() -> None:
    """What `Session.deliver` writes for an ack:auto delivery from cached parts is what
    the general path (header list + stomp.encode) writes, in every version."""
    rng = random.Random(11)
    target = Destination(Kind.USER, "/user/queue/private")
    fast = 0
    for _ in range(20_000):
        sub_id = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 2)))
        dest = rng.choice(["/user/queue/private", "/topic/a:b", "/queue/x", ""])
        sub = Subscription(cast(Any, None), sub_id, dest, target, "auto")
        message_id = rng.choice(["018f-ab", "m:1", "m\\1", ""])
        headers = tuple(
            (
                rng.choice(["content-type", "x", "", "ack", "content-length", "a:b"]),
                rng.choice(["application/json", "v", "", "a\nb"]),
            )
            for _ in range(rng.randint(0, 2))
        )
        body = rng.choice([b"", b"{}", b"\x00\xff"])
        data = _auto_message(sub, message_id, body, headers)
        if data is None:
            continue
        fast += 1
        general = (
            ("subscription", sub_id),
            ("message-id", message_id),
            ("destination", dest),
            *(h for h in headers if h[0] not in RESERVED_HEADERS),
            ("content-length", str(len(body))),
        )
        for version in stomp.VERSIONS:
            assert stomp.encode(stomp.Frame("MESSAGE", general, body), version) == data
    assert fast > 2_000
