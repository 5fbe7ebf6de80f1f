"""Blocking TCP clients of the backend protocol (see :mod:`bench.tcpserver`).

They run in the driver process: the application side of every TCP path
(direct, through the agents, through ``ssh -L``, through stunnel). Every
socket call has a timeout.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from bench.common import LOOPBACK, BenchError
from bench.tcpserver import pattern_at

__all__ = ["DownloadResult", "download_with_gaps", "echo_once", "upload"]

_ZEROS = memoryview(bytes(1 << 20))
IO_TIMEOUT = 60.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def upload(port: int, size: int, timeout: float = IO_TIMEOUT) -> float:
    """Send ``size`` bytes to a sink; seconds from connect to the sink's byte count."""
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(b"S")
        remaining = size
        while remaining:
            n = min(remaining, len(_ZEROS))
            sock.sendall(_ZEROS[:n])
            remaining -= n
        sock.shutdown(socket.SHUT_WR)
        counted = int.from_bytes(_recv_exact(sock, 8), "big")
    elapsed = time.perf_counter() - start
    if counted != size:
        raise BenchError(f"sink counted {counted} bytes, {size} were sent")
    return elapsed


def echo_once(port: int, timeout: float = 10.0) -> float:
    """Fresh connection + 1-byte echo: seconds from connect() to the byte back."""
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(b"E")
        if sock.recv(1) != b"E":
            raise BenchError("echo answered nothing (connection closed or reset)")
        elapsed = time.perf_counter() - start
    return elapsed


@dataclass
class DownloadResult:
    received: int = 0
    intact: bool = True
    """Every byte matched the pattern at its offset (nothing lost, duplicated or reordered)."""
    max_gap: float = 0.0
    """Longest time between two reads that returned data, seconds."""
    gap_at: float = 0.0
    """When that gap started, seconds after the request."""
    seconds: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the request, bytes received so far), about every 50 ms."""
    error: str = ""


def download_with_gaps(
    port: int, size: int, rate: int, timeout: float = IO_TIMEOUT
) -> DownloadResult:
    """Download ``size`` paced bytes and record the longest stall the application saw."""
    result = DownloadResult()
    start = time.perf_counter()
    last = start
    next_sample = 0.0
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"D" + size.to_bytes(8, "big") + rate.to_bytes(8, "big"))
            while result.received < size:
                chunk = sock.recv(1 << 20)
                now = time.perf_counter()
                if not chunk:
                    result.error = f"EOF after {result.received} of {size} bytes"
                    break
                if now - last > result.max_gap:
                    result.max_gap, result.gap_at = now - last, last - start
                last = now
                if result.intact and chunk != pattern_at(result.received, len(chunk)):
                    result.intact = False
                result.received += len(chunk)
                if now - start >= next_sample:
                    result.timeline.append((now - start, result.received))
                    next_sample = now - start + 0.05
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    result.timeline.append((result.seconds, result.received))
    return result
