"""Raw single-stream transfers on outrelay's own QUIC transport (the ceiling).

``python -m bench.quicraw server ...`` listens with :func:`outrelay.transport.serve_quic`
(mTLS, ALPN ``orp/1``, client chains verified like the relay does) and speaks
the backend protocol of :mod:`bench.tcpserver` on every stream (plus ``D`` +
8-byte size for downloads). ``python -m bench.quicraw client ...`` dials it
with :func:`outrelay.transport.connect_quic`, moves the bytes on one stream
and prints one JSON object. Client and server are separate processes, so each
gets a CPU of its own, as the agents and the relay do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from outrelay.pki import ClientVerifier, load_certificates
from outrelay.transport import QuicTlsConfig, Stream, TransportError, connect_quic, serve_quic

READ = 1 << 20
_ZEROS = memoryview(bytes(1 << 20))


async def _send_zeros(stream: Stream, size: int) -> None:
    remaining = size
    while remaining:
        n = min(remaining, len(_ZEROS))
        await stream.send_all(_ZEROS[:n])
        remaining -= n


async def _handle(stream: Stream) -> None:
    try:
        first = await stream.receive_some(READ)
        if not first:
            return
        mode = first[:1]
        if mode == b"S":
            count = len(first) - 1
            while chunk := await stream.receive_some(READ):
                count += len(chunk)
            await stream.send_all(count.to_bytes(8, "big"))
        elif mode == b"E":
            await stream.send_all(first)
            while chunk := await stream.receive_some(READ):
                await stream.send_all(chunk)
        elif mode == b"D":
            header = first[1:]
            while len(header) < 8:
                more = await stream.receive_some(8 - len(header))
                if not more:
                    return
                header += more
            await _send_zeros(stream, int.from_bytes(header[:8], "big"))
        await stream.send_eof()
    except TransportError:
        pass
    finally:
        await stream.aclose()


async def _serve(args: argparse.Namespace) -> None:
    tls = QuicTlsConfig(args.cert, args.key, args.ca)
    verifier = ClientVerifier(load_certificates(args.ca))
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def accept_loop(conn: Any) -> None:
        while True:
            try:
                stream = await conn.accept_stream()
            except TransportError:
                return
            spawn(_handle(stream))

    handle = await serve_quic(
        "127.0.0.1",
        args.port,
        tls,
        verify_client=lambda leaf, chain: verifier.verify(leaf, chain),
        on_connection=lambda conn: spawn(accept_loop(conn)),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", handle.address[1], flush=True)
    await stop.wait()
    handle.close()
    for task in tasks:
        task.cancel()


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    tls = QuicTlsConfig(args.cert, args.key, args.ca)
    out: dict[str, Any] = {"mode": args.mode, "bytes": args.size}
    if args.mode == "ttfb":
        samples = []
        for _ in range(args.count):
            start = time.perf_counter()
            conn = await connect_quic("127.0.0.1", args.port, tls)
            stream = await conn.open_stream()
            await stream.send_all(b"E")
            if await stream.receive_some(1) != b"E":
                raise SystemExit("echo failed")
            samples.append(time.perf_counter() - start)
            conn.close()
        out["samples"] = samples
        return out
    conn = await connect_quic("127.0.0.1", args.port, tls)
    cpu0 = time.process_time()
    start = time.perf_counter()
    stream = await conn.open_stream()
    if args.mode == "upload":
        await stream.send_all(b"S")
        await _send_zeros(stream, args.size)
        await stream.send_eof()
        reply = b""
        while len(reply) < 8:
            chunk = await stream.receive_some(8)
            if not chunk:
                raise SystemExit("no byte count from the server")
            reply += chunk
        if int.from_bytes(reply, "big") != args.size:
            raise SystemExit(f"server counted {int.from_bytes(reply, 'big')} bytes")
    else:
        await stream.send_all(b"D" + args.size.to_bytes(8, "big"))
        await stream.send_eof()
        got = 0
        while chunk := await stream.receive_some(READ):
            got += len(chunk)
        if got != args.size:
            raise SystemExit(f"received {got} of {args.size} bytes")
    out["seconds"] = time.perf_counter() - start
    out["cpu"] = time.process_time() - cpu0
    conn.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--mode", choices=["upload", "download", "ttfb"], default="upload")
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--patch", default="", help="runtime patches from bench.patched")
    args = parser.parse_args(argv)
    if args.patch:
        from bench.patched import PATCHES

        for name in args.patch.split(","):
            PATCHES[name]()
    if args.role == "server":
        asyncio.run(_serve(args))
    else:
        print(json.dumps(asyncio.run(asyncio.wait_for(_client(args), timeout=600))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
