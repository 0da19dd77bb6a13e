#!/usr/bin/env python3
"""Fuzz the stomp/ parser: any bytes must give frames or ProtocolError, nothing else.

Usage: scripts/fuzz_stomp.py [N] [--engine atheris|random] [--seed S]

Each input is parsed whole and again in chunks (the split derived from the input), for a
server-side and a client-side parser, under a version picked from the input. Checked:
- only ``Frame``/``HeartBeat`` events or ``ProtocolError`` come out (any other exception
  is a bug);
- the buffer never holds more than ``max_frame_bytes + 1`` bytes (small limits are used
  so the bound is exercised);
- whole and chunked parsing agree (same events, both fail or both succeed);
- every parsed frame survives ``encode`` -> parse unchanged (plus ``content-length``).

The atheris engine (coverage-guided, libFuzzer) is used when it imports; otherwise a
seeded random engine mutates a corpus of valid frames. Prints the count and any failure;
exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stomp

LIMITS = stomp.Limits(max_frame_bytes=512, max_headers=8, max_header_line=96, max_body_bytes=300)
VERSIONS = stomp.VERSIONS

CORPUS: list[bytes] = [
    b"CONNECT\naccept-version:1.0,1.1,1.2\nhost:stomp.example\nheart-beat:0,1000\n\n\x00",
    b"STOMP\naccept-version:1.2\nhost:h\nlogin:a\\nb\npasscode:x:y\n\n\x00\n",
    b'SEND\ndestination:/queue/a\ncontent-type:application/json\n\n{"a":1}\x00',
    b"SEND\r\ndestination:/queue/a\r\ncontent-length:5\r\n\r\na\x00b\x00c\x00\r\n",
    b"SUBSCRIBE\nid:0\ndestination:/topic/x\\c\\\\y\nack:client-individual\n\n\x00",
    b"UNSUBSCRIBE\nid:0\n\n\x00",
    b"ACK\nid:12\ntransaction:t1\n\n\x00",
    b"NACK\nmessage-id:1\nsubscription:0\n\n\x00",
    b"BEGIN\ntransaction:t\n\n\x00COMMIT\ntransaction:t\n\n\x00ABORT\ntransaction:t\n\n\x00",
    b"DISCONNECT\nreceipt:77\n\n\x00\n\n",
    b"CONNECTED\nversion:1.2\nheart-beat:100,100\nserver:x/1\n\n\x00",
    b"MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\ncontent-type:text/plain"
    b"\n\nhello queue a\x00",
    b"RECEIPT\nreceipt-id:77\n\n\x00",
    b"ERROR\nreceipt-id:77\ncontent-type:text/plain\ncontent-length:9\nmessage:bad\n\n"
    b"malformed\x00",
    b"\n\r\n\n",
]
TOKENS = [
    b"\x00",
    b"\n",
    b"\r\n",
    b"\r",
    b"\\",
    b"\\c",
    b"\\r",
    b"\\t",
    b":",
    b"\n\n",
    b"content-length:",
    b"content-length:3\n",
    b"\xff",
    b"\xc3\xa9",
    b"9999",
]


class FuzzFailure(AssertionError):
    """A property of the parser did not hold."""


def _run(data: bytes, version: str, side: str, chunk: int) -> tuple[list[object], bool, int]:
    """Parse data whole (chunk=0) or in chunks; return (events, failed, max buffered)."""
    parser = stomp.Parser(version, LIMITS, side=side)
    events: list[object] = []
    peak = 0
    try:
        if chunk == 0:
            events += parser.feed(data)
            peak = parser.buffered
        else:
            for i in range(0, len(data), chunk):
                events += parser.feed(data[i : i + chunk])
                peak = max(peak, parser.buffered)
    except stomp.ProtocolError as exc:
        events += exc.events
        if not exc.reason or not exc.message or "\n" in exc.message:
            raise FuzzFailure(f"bad error text {exc!r}") from None
        return events, True, peak
    return events, False, peak


def check_one(data: bytes) -> None:
    """Raise FuzzFailure (or let a non-ProtocolError escape) if any property breaks."""
    pick = data[0] if data else 0
    version = VERSIONS[pick % 3]
    side = "server" if pick & 4 else "client"
    chunk = 1 + (data[-1] % 7 if data else 0)
    whole, whole_failed, peak1 = _run(data, version, side, 0)
    split, split_failed, peak2 = _run(data, version, side, chunk)
    if max(peak1, peak2) > LIMITS.max_frame_bytes + 1:
        raise FuzzFailure(f"buffered {max(peak1, peak2)} bytes > limit")
    if whole != split or whole_failed != split_failed:
        raise FuzzFailure(f"whole {whole!r}/{whole_failed} != split {split!r}/{split_failed}")
    parser_version = version
    for event in whole:
        if event is stomp.HeartBeat:
            continue
        if not isinstance(event, stomp.Frame):
            raise FuzzFailure(f"unexpected event {event!r}")
        wire = stomp.encode(event, parser_version)
        # default limits: escaping may legitimately lengthen a header line
        back = stomp.Parser(parser_version, side=side, validate=False).feed(wire)
        want = event
        if event.body and not event.has("content-length"):
            want = stomp.Frame(
                event.command,
                (*event.headers, ("content-length", str(len(event.body)))),
                event.body,
            )
        if back != [want]:
            raise FuzzFailure(f"round trip of {event!r} gave {back!r}")
        if event.command in stomp.UNESCAPED_COMMANDS:
            # the parser switched to the negotiated version for what follows
            parser_version = _next_version(event, side, parser_version)


def _next_version(frame: stomp.Frame, side: str, current: str) -> str:
    if frame.command == "CONNECTED":
        got = frame.get("version", "1.0")
        return got if side == "client" and got in VERSIONS else current
    if side != "server":
        return current
    try:
        return stomp.negotiate_version(frame.get("accept-version"))
    except stomp.ProtocolError:
        return current


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    """A random edit of one or two corpus entries."""
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(data))
        if op == 0 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = rng.choice(TOKENS)
        elif op == 2 and data:
            del data[at : at + rng.randint(1, 8)]
        elif op == 3:
            data[at:at] = rng.choice(corpus)
        elif op == 4:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif op == 5 and data:
            j = rng.randint(at, len(data))
            data[at:at] = data[at:j] * rng.randint(1, 40)  # grow toward the limits
        else:
            data = data[: rng.randint(0, len(data))]
    return bytes(data[:4096])


def run_random(n: int, seed: int) -> int:
    """Run n mutated inputs; return the count run (raises on the first failure)."""
    rng = random.Random(seed)
    corpus = list(CORPUS)
    for i in range(n):
        data = mutate(rng, corpus)
        try:
            check_one(data)
        except Exception as exc:
            raise FuzzFailure(f"input #{i} {data!r}: {exc!r}") from exc
        # keep inputs that still parse into frames: the corpus drifts toward odd-but-valid
        if i % 97 == 0 and len(corpus) < 400 and b"\x00" in data:
            corpus.append(data)
    return n


def run_atheris(n: int) -> int:
    import atheris  # type: ignore[import-not-found]

    def one_input(data: bytes) -> None:
        check_one(data)

    seed_dir = Path("/tmp/stomp_fuzz_seeds")
    seed_dir.mkdir(exist_ok=True)
    for i, entry in enumerate(CORPUS):
        (seed_dir / f"seed{i}").write_bytes(entry)
    atheris.instrument_all()
    args = [
        sys.argv[0],
        f"-runs={n}",
        "-max_len=2048",
        "-artifact_prefix=/tmp/stomp_fuzz_",
        str(seed_dir),
    ]
    atheris.Setup(args, one_input)
    atheris.Fuzz()  # exits the process when the run count is reached
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("n", nargs="?", type=int, default=100_000, help="inputs to run")
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    start = time.perf_counter()
    print(f"fuzzing stomp with {engine} engine for {args.n} inputs", flush=True)
    try:
        if engine == "atheris":
            run_atheris(args.n)
        else:
            run_random(args.n, args.seed)
    except FuzzFailure as exc:
        print(f"FAILURE: {exc}", flush=True)
        return 1
    took = time.perf_counter() - start
    print(f"ok: {args.n} inputs, no failure, {took:.1f} s ({args.n / took:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
