"""UDP through the relay: ping a UDP service a consumer agent carries (``--consume-udp``).

Against the README's "UDP services" setup (a UDP echo exposed as "uecho" with
``--expose-udp uecho=127.0.0.1:5353``, consumed with ``--consume-udp
uecho@127.0.0.1:15353``):

    python examples/udp_ping.py 127.0.0.1:15353

Sends COUNT datagrams (default 20) to the consumer agent's UDP address, one every 20 ms,
and prints how many came back and the median round trip. The program itself is plain UDP:
any unmodified UDP client (``dig``, a syslog sender, a game) works the same way.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time


def main(address: str, count: int) -> int:
    host, _, port = address.rpartition(":")
    target = (host or "127.0.0.1", int(port))
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        for seq in range(count):
            payload = f"ping {seq}".encode()
            sent = time.perf_counter()
            sock.sendto(payload, target)
            try:
                while sock.recv(65535) != payload:
                    pass  # a late answer to an earlier ping
            except TimeoutError:
                continue
            rtts.append((time.perf_counter() - sent) * 1000)
            time.sleep(0.02)
    if not rtts:
        print(f"no answer from {address} (is the consumer agent running?)", file=sys.stderr)
        return 1
    print(f"{len(rtts)}/{count} answered, median {statistics.median(rtts):.2f} ms")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT [COUNT]")
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 20))
