"""Receive buffers of the QUIC and TLS+yamux streams: a deque of received chunks."""

from __future__ import annotations

from collections import deque

__all__ = ["take_chunks"]


def take_chunks(chunks: deque[bytes], max_bytes: int) -> bytes:
    """Remove and return up to ``max_bytes`` from the front of a non-empty ``chunks``.

    A chunk larger than ``max_bytes`` is split; otherwise every further whole
    chunk that fits is joined on, so one read moves up to ``max_bytes``
    instead of one ~1.3 kB QUIC frame (bench: with batched reads, ~2.2x
    throughput on the relay path).
    """
    chunk = chunks.popleft()
    if len(chunk) > max_bytes:
        chunks.appendleft(chunk[max_bytes:])
        return chunk[:max_bytes]
    if not chunks or len(chunk) + len(chunks[0]) > max_bytes:
        return chunk
    parts = [chunk]
    size = len(chunk)
    while chunks and size + len(chunks[0]) <= max_bytes:
        part = chunks.popleft()
        parts.append(part)
        size += len(part)
    return b"".join(parts)
