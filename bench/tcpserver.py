"""The benchmark backend: a small asyncio TCP server (``python -m bench.tcpserver``).

One protocol for every path (the QUIC peers speak it too), chosen by the
first byte of a connection:

* ``S`` sink: read until EOF, answer the byte count (8 bytes, big endian).
* ``E`` echo: send back every byte, starting with the ``E``, until EOF.
* ``D`` download: 16 more bytes, ``size`` and ``rate`` (bytes/s, 0 = as fast
  as possible); send ``size`` bytes of :data:`PATTERN`, paced, then close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

__all__ = ["PATTERN", "PATTERN_PERIOD", "pattern_at"]

PATTERN_PERIOD = 251
"""A prime period: a dropped, duplicated or reordered chunk breaks the pattern."""
_CHUNK = 64 * 1024
PATTERN = bytes(i % PATTERN_PERIOD for i in range(_CHUNK * 16 + PATTERN_PERIOD))


def pattern_at(offset: int, length: int) -> bytes:
    """The ``length`` pattern bytes that start at stream ``offset`` (length <= 1 MiB)."""
    start = offset % PATTERN_PERIOD
    return PATTERN[start : start + length]


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    count = 0
    while chunk := await reader.read(1 << 20):
        count += len(chunk)
    writer.write(count.to_bytes(8, "big"))
    await writer.drain()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"E")
    await writer.drain()
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()


async def _download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    header = await reader.readexactly(16)
    size, rate = int.from_bytes(header[:8], "big"), int.from_bytes(header[8:], "big")
    start = time.monotonic()
    sent = 0
    while sent < size:
        n = min(_CHUNK, size - sent)
        writer.write(pattern_at(sent, n))
        sent += n
        await writer.drain()
        if rate:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        mode = await reader.readexactly(1)
        if mode == b"S":
            await _sink(reader, writer)
        elif mode == b"E":
            await _echo(reader, writer)
        elif mode == b"D":
            await _download(reader, writer)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _main(port: int) -> None:
    server = await asyncio.start_server(
        _handle, "127.0.0.1", port, backlog=4096, limit=1 << 20, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.port))


if __name__ == "__main__":
    sys.exit(main())
