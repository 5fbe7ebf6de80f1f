"""A bounded QUIC flood against one UDP address, run as its own process by the e2e tests.

Two kinds of datagram, interleaved at fixed rates:

* **abandoned Initials**: the first datagram of a real aioquic client (a fresh
  connection each time: new CIDs, a real ClientHello, padded to 1200+
  bytes); the handshake is never continued, Retry packets are not answered.
* **garbage**: random bytes behind a plausible QUIC v1 Initial header
  (long header, version 1, 8-byte CIDs, no token), 1200-1350 bytes.

Stops after ``--duration`` seconds or ``--max-datagrams`` datagrams, whichever
comes first, and prints one JSON line: what was sent and what came back
(Retry, Version Negotiation, other), counted by the first bytes of each reply.

    python tests/e2e/flood.py --port 7443 --duration 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

TICK = 0.01
"""Seconds between send bursts (rates are spread over ticks)."""


def client_initial(host: str, port: int) -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=["orp/1"], server_name="localhost")
    conn = QuicConnection(configuration=config)
    now = time.monotonic()
    conn.connect((host, port), now=now)
    return conn.datagrams_to_send(now=now)[0][0]


def garbage_initial(rng: random.Random) -> bytes:
    size = rng.randint(1200, 1350)
    header = bytes([0xC0 | rng.randrange(4)]) + (1).to_bytes(4, "big")
    header += b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = size - len(header) - 2
    return header + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def classify(reply: bytes) -> str:
    if len(reply) >= 5 and reply[0] & 0x80:
        if reply[1:5] == b"\x00\x00\x00\x00":
            return "version_negotiation"
        if (reply[0] & 0x30) >> 4 == 3:
            return "retry"
        return "long_header"
    return "other"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default="127.0.0.1", help="local address to send from")
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--initials-per-s", type=float, default=300.0)
    p.add_argument("--garbage-per-s", type=float, default=3000.0)
    p.add_argument("--max-datagrams", type=int, default=200_000)
    args = p.parse_args(argv)

    rng = random.Random(1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.source, 0))
    sock.setblocking(False)
    target = (args.host, args.port)
    sent = {"initial": 0, "garbage": 0}
    replies: dict[str, int] = {}
    start = time.monotonic()
    end = start + args.duration
    next_tick = start
    while True:
        now = time.monotonic()
        if now >= end or sum(sent.values()) >= args.max_datagrams:
            break
        elapsed = now - start
        due_initials = int(elapsed * args.initials_per_s) - sent["initial"]
        due_garbage = int(elapsed * args.garbage_per_s) - sent["garbage"]
        for _ in range(max(0, due_initials)):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(client_initial(args.host, args.port), target)
            sent["initial"] += 1
        for _ in range(max(0, due_garbage)):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(garbage_initial(rng), target)
            sent["garbage"] += 1
        while True:
            try:
                reply = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # ICMP port unreachable once the relay is gone
            kind = classify(reply)
            replies[kind] = replies.get(kind, 0) + 1
        next_tick += TICK
        time.sleep(max(0.0, next_tick - time.monotonic()))
    sock.close()
    summary = {
        "seconds": round(time.monotonic() - start, 2),
        "sent": sent,
        "replies": replies,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
