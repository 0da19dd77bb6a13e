#!/usr/bin/env python3
"""Frames/s of stomp/ beside stompman's own parser and serializer, on the same input.

Usage: scripts/bench_stomp.py [--frames N] [--repeat R]

Parse: N small SEND frames (200-byte JSON body, typical stompjs headers) arriving in
4 KiB chunks, like a TCP/WebSocket read loop. Write: N MESSAGE frames with the same body.
Both libraries get identical bytes; the best of R runs is reported. One core, one process.
Goal (issue 3): >= 200,000 parsed frames/s and >= 2x the peer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stompman.frames as sm_frames
from stompman.serde import FrameParser, dump_frame

import stomp

BODY = json.dumps(
    {
        "to": "0190f0a2-7d5e-7c6a-9f0e-0a1b2c3d4e5f",
        "encryptedContent": "q7Vb3x9LkQ2mZr8sT1uYwE4aP6dF0gH5jK8lN3oR2tU7vW9xY1zA4bC6dE8fG0hI",
        "iv": "3q2+7wAAAAAAAAAA",
        "type": "text",
    },
    separators=(",", ":"),
).encode()
BODY = BODY + b" " * (200 - len(BODY))  # exactly 200 bytes
assert len(BODY) == 200


def send_bytes(i: int) -> bytes:
    return stomp.encode(
        stomp.Frame.make(
            "SEND",
            {
                "destination": "/app/chat/send",
                "content-type": "application/json",
                "receipt": f"receipt-{i}",
            },
            BODY,
        )
    )


def best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """Best wall time of `repeat` runs of fn and the count it returned."""
    times = []
    count = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - t0)
    return min(times), count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.frames
    stream = b"".join(send_bytes(i) for i in range(n))
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    def ours_parse() -> int:
        parser = stomp.Parser(side="server")
        got = 0
        for chunk in chunks:
            got += len(parser.feed(chunk))
        return got

    def peer_parse() -> int:
        parser = FrameParser()
        got = 0
        for chunk in chunks:
            for _ in parser.parse_frames_from_chunk(chunk):
                got += 1
        return got

    messages = [
        stomp.Frame(
            "MESSAGE",
            (
                ("destination", "/topic/messages/c1"),
                ("message-id", f"m-{i}"),
                ("subscription", "sub-0"),
                ("content-type", "application/json"),
            ),
            BODY,
        )
        for i in range(n)
    ]
    peer_messages = [
        sm_frames.MessageFrame(
            headers={
                "destination": f.headers[0][1],
                "message-id": f.headers[1][1],
                "subscription": f.headers[2][1],
                "content-type": "application/json",
                "content-length": str(len(BODY)),
            },
            body=BODY,
        )
        for f in messages
    ]

    def ours_write() -> int:
        encode = stomp.encode
        return len([encode(f) for f in messages])

    def peer_write() -> int:
        return len([dump_frame(f) for f in peer_messages])

    # Same input, same answer: both parsers see every frame.
    assert ours_parse() == n, "stomp parser lost frames"
    assert peer_parse() == n, "stompman parser lost frames"
    check = stomp.Parser(side="client").feed(b"".join(stomp.encode(f) for f in messages[:3]))
    assert [f.body for f in check if isinstance(f, stomp.Frame)] == [BODY] * 3

    results = {}
    for name, fn in (
        ("parse stomp", ours_parse),
        ("parse stompman", peer_parse),
        ("write stomp", ours_write),
        ("write stompman", peer_write),
    ):
        took, count = best(fn, args.repeat)
        assert count == n
        results[name] = n / took
    print(
        f"python {sys.version.split()[0]}, {n} frames, {len(stream)} bytes, best of {args.repeat}"
    )
    for what in ("parse", "write"):
        ours, peer = results[f"{what} stomp"], results[f"{what} stompman"]
        print(
            f"{what:5}  stomp {ours:>11,.0f} frames/s   stompman {peer:>9,.0f} frames/s"
            f"   ratio {ours / peer:5.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
