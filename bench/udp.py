"""The ``udp`` scenario (issue 19 item 3): UDP packets/s delivered and loss at rising rates.

    client -UDP-> consumer (--consume-udp) -> relay -> provider (--expose-udp) -UDP-> echo

One client socket (one flow: QUIC DATAGRAM frames through the relay once the agents'
probes succeed, else length-prefixed datagrams on the flow's relay stream) sends
``SIZE``-byte datagrams paced at each offered rate for a few seconds; a receiver thread
counts the echoes. Delivered = echoes per second (the round trip crosses the path twice),
loss = 1 - echoes / sent. Over QUIC and over the TLS+yamux fallback. The echo backend is
its own process so it does not share the client's interpreter.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Any

from bench import setups
from bench.common import LOOPBACK, BenchError, Procs, free_port, venv_script
from bench.scenarios import Ctx, say
from bench.setups import READY_TIMEOUT, wait_udp

__all__ = ["markdown", "run_udp"]

SIZE = 200
ECHO = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind(('127.0.0.1',int(sys.argv[1])))\n"
    "while True:\n"
    "    d,a=s.recvfrom(65535)\n"
    "    s.sendto(d,a)\n"
)


def _start(ctx: Ctx, procs: Procs, transport: str) -> int:
    """Echo, relay, provider, consumer; returns the consumer's UDP port."""
    pki = ctx.pki
    echo_port = free_port(socket.SOCK_DGRAM)
    procs.start("udp-echo", [sys.executable, "-c", ECHO, str(echo_port)])
    relay_port = free_port(socket.SOCK_DGRAM)
    local_port = free_port(socket.SOCK_DGRAM)
    common = ["--relay", f"{LOOPBACK}:{relay_port}", "--ca", pki.ca, "--log-level", "warn"]
    extra: list[str] = []
    if transport == "tcp":
        tcp_port = free_port()
        extra = ["--listen-tcp", f"{LOOPBACK}:{tcp_port}"]
        common += ["--transport", "tcp", "--relay-tcp", f"{LOOPBACK}:{tcp_port}"]
    _relay, _ = setups.start_relay(procs, pki, relay_port, log_level="warn", extra=extra)
    (uri_a, cert_a, key_a), (uri_b, cert_b, key_b) = pki.agents[:2]
    agent = venv_script("outrelay-agent")
    procs.start(
        "provider",
        [agent, *common, "--uri", uri_a, "--cert", cert_a, "--key", key_a,
         "--expose-udp", f"ubench={LOOPBACK}:{echo_port}"],
    )  # fmt: skip
    consumer = procs.start(
        "consumer",
        [agent, *common, "--uri", uri_b, "--cert", cert_b, "--key", key_b,
         "--consume-udp", f"ubench@{LOOPBACK}:{local_port}"],
    )  # fmt: skip
    wait_udp(consumer, local_port, READY_TIMEOUT)
    _wait_echo(local_port, READY_TIMEOUT)
    return local_port


def _wait_echo(port: int, timeout: float) -> None:
    """Until one datagram comes back (the provider has registered)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            s.sendto(b"ping", (LOOPBACK, port))
            try:
                if s.recv(100) == b"ping":
                    return
            except TimeoutError:
                continue
    raise BenchError(f"no UDP echo through port {port} within {timeout:.0f}s")


def _offer(port: int, rate: int, seconds: float) -> dict[str, Any]:
    """Send at ``rate`` datagrams/s for ``seconds``; count the echoes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((LOOPBACK, port))
    sock.settimeout(0.2)
    received = 0
    stop = threading.Event()

    def receive() -> None:
        nonlocal received
        while not stop.is_set():
            try:
                sock.recv(65535)
                received += 1
            except (TimeoutError, OSError):
                continue

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    payload = b"u" * SIZE
    total = int(rate * seconds)
    sent = 0
    start = time.monotonic()
    batch = max(1, rate // 1000)  # pace in ~1 ms batches
    while sent < total:
        due = start + sent / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        for _ in range(min(batch, total - sent)):
            with contextlib.suppress(OSError):
                sock.send(payload)
            sent += 1
    elapsed = time.monotonic() - start
    time.sleep(1.0)  # echoes still in flight
    stop.set()
    reader.join(timeout=2)
    sock.close()
    return {
        "offered_pps": rate,
        "sent_pps": sent / elapsed,
        "delivered_pps": received / elapsed,
        "loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
    }


def run_udp(ctx: Ctx) -> None:
    quick = ctx.opts.quick
    rates = [1_000, 5_000, 20_000] if quick else [1_000, 5_000, 10_000, 20_000, 50_000]
    seconds = 1.0 if quick else 3.0
    out: dict[str, Any] = {"size": SIZE, "seconds": seconds, "paths": {}}
    ctx.results["udp"] = out
    for transport in ("quic", "tcp"):
        with Procs(ctx.logdir(f"udp-{transport}")) as procs:
            port = _start(ctx, procs, transport)
            rows = []
            for rate in rates:
                row = _offer(port, rate, seconds)
                say(
                    f"udp {transport}: offered {rate}/s -> delivered "
                    f"{row['delivered_pps']:,.0f}/s, loss {row['loss_pct']:.1f}%"
                )
                rows.append(row)
            out["paths"][transport] = rows


def markdown(results: dict[str, Any]) -> list[str]:
    udp = results.get("udp")
    if not udp:
        return []
    lines = [
        "",
        "## UDP services (issue 19): packets/s and loss at rising offered rates",
        "",
        f"One flow of {udp['size']}-byte datagrams, {udp['seconds']:g} s per rate, echoed by the "
        "backend: delivered = echoes/s (two crossings of the path), loss = 1 - echoes/sent. "
        "quic: QUIC DATAGRAM frames through the relay (RFC 9221); tcp: the TLS+yamux "
        "fallback, datagrams length-prefixed on the flow's stream.",
        "",
        "| path | offered /s | sent /s | delivered /s | loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for path, rows in udp["paths"].items():
        for r in rows:
            lines.append(
                f"| {path} | {r['offered_pps']:,} | {r['sent_pps']:,.0f} | "
                f"{r['delivered_pps']:,.0f} | {r['loss_pct']:.1f}% |"
            )
    return lines
