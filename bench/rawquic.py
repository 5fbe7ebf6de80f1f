"""Single-stream QUIC transfers with plain library APIs: aioquic and qh3.

``python -m bench.rawquic server --port P ...`` is a plain aioquic server
(``aioquic.asyncio.serve`` and a ``QuicConnectionProtocol`` subclass, library
defaults except the 1350-byte datagrams outrelay uses), speaking the backend
protocol (``S`` sink, ``E`` echo, ``D`` + 8-byte size download).

``python -m bench.rawquic client --stack aioquic|qh3 [--uvloop] ...`` is a
plain client on either stack (qh3 mirrors aioquic's API). It can target this
server (ALPN ``bench``) or outrelay's transport server, ``bench.quicraw``
(ALPN ``orp/1``, which requires and verifies a client certificate: the
relay's configuration), so it tells whether a stack can be the agent's side
of the relay connection. Neither library's asyncio API pauses a writer, so
the client feeds the connection at most ``SEND_LIMIT`` queued bytes at a time
and waits for the next transmit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import time
from typing import Any

SEND_LIMIT = 1 << 20
CHUNK = 256 * 1024
DATAGRAM = 1350
_ZEROS = bytes(CHUNK)


def _load(stack: str) -> dict[str, Any]:
    """The handful of names we need from ``aioquic`` or ``qh3``."""
    return {
        "QuicConfiguration": importlib.import_module(
            f"{stack}.quic.configuration"
        ).QuicConfiguration,
        "QuicConnectionProtocol": importlib.import_module(
            f"{stack}.asyncio.protocol"
        ).QuicConnectionProtocol,
        "connect": importlib.import_module(f"{stack}.asyncio.client").connect,
        "events": importlib.import_module(f"{stack}.quic.events"),
    }


# -- server (plain aioquic) ----------------------------------------------------------------


def _server_protocol(base: type, events: Any) -> type:
    class ServerProtocol(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._state: dict[int, list[Any]] = {}  # stream id -> [mode, count, header]

        def quic_event_received(self, event: Any) -> None:
            if not isinstance(event, events.StreamDataReceived):
                return
            sid, data = event.stream_id, event.data
            state = self._state.get(sid)
            if state is None:
                if not data:
                    return
                state = self._state[sid] = [data[:1], 0, b""]
                data = data[1:]
                if state[0] == b"E":
                    self._quic.send_stream_data(sid, b"E", False)
            mode = state[0]
            if mode == b"S":
                state[1] += len(data)
                if event.end_stream:
                    self._quic.send_stream_data(sid, state[1].to_bytes(8, "big"), True)
            elif mode == b"E":
                self._quic.send_stream_data(sid, data, event.end_stream)
            elif mode == b"D":
                state[2] += data
                if event.end_stream:
                    asyncio.get_running_loop().create_task(
                        self._download(sid, int.from_bytes(state[2][:8], "big"))
                    )
            if event.end_stream:
                del self._state[sid]

        async def _download(self, sid: int, size: int) -> None:
            sent = 0
            deadline = time.monotonic() + 600  # bounded even if the client vanishes
            while sent < size and time.monotonic() < deadline:
                stream = self._quic._streams.get(sid)
                if stream is None or self._closed.is_set():
                    return
                sender = stream.sender
                if sender._buffer_stop - sender._buffer_start > SEND_LIMIT:
                    await asyncio.sleep(0.001)
                    continue
                n = min(CHUNK, size - sent)
                sent += n
                self._quic.send_stream_data(sid, _ZEROS[:n], sent == size)
                self.transmit()

    return ServerProtocol


async def _serve(args: argparse.Namespace) -> None:
    from aioquic.asyncio import serve

    names = _load("aioquic")
    config = names["QuicConfiguration"](
        is_client=False, alpn_protocols=["bench"], max_datagram_size=DATAGRAM
    )
    config.load_cert_chain(args.cert, args.key)
    protocol = _server_protocol(names["QuicConnectionProtocol"], names["events"])
    server = await serve("127.0.0.1", args.port, configuration=config, create_protocol=protocol)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", args.port, flush=True)
    await stop.wait()
    server.close()


# -- client (aioquic or qh3) -----------------------------------------------------------------


def _client_protocol(base: type, events: Any) -> type:
    class ClientProtocol(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.progress = asyncio.Event()
            self.received = 0
            self.head = b""
            self.finished = asyncio.get_running_loop().create_future()

        def transmit(self) -> None:
            super().transmit()
            self.progress.set()

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                self.received += len(event.data)
                if len(self.head) < 8:
                    self.head += event.data[:8]
                if event.end_stream and not self.finished.done():
                    self.finished.set_result(None)
            elif isinstance(event, events.ConnectionTerminated) and not self.finished.done():
                self.finished.set_exception(ConnectionError(event.reason_phrase or "closed"))

    return ClientProtocol


def _queued(quic: Any, sid: int) -> int:
    if hasattr(quic, "get_send_buffer_size"):  # qh3: bytes not yet transmitted
        return int(quic.get_send_buffer_size(sid))
    sender = quic._streams[sid].sender  # aioquic: bytes not yet acknowledged
    return int(sender._buffer_stop - sender._buffer_start)


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    names = _load(args.stack)
    config = names["QuicConfiguration"](
        is_client=True,
        alpn_protocols=[args.alpn],
        max_datagram_size=DATAGRAM,
        server_name="localhost",
    )
    config.load_cert_chain(args.cert, args.key)
    config.load_verify_locations(cafile=args.ca)
    protocol = _client_protocol(names["QuicConnectionProtocol"], names["events"])
    out: dict[str, Any] = {"mode": args.mode, "bytes": args.size, "stack": args.stack}
    connect = names["connect"]
    if args.mode == "ttfb":
        samples = []
        for _ in range(args.count):
            start = time.perf_counter()
            async with connect(
                "127.0.0.1", args.port, configuration=config, create_protocol=protocol
            ) as client:
                sid = client._quic.get_next_available_stream_id()
                client._quic.send_stream_data(sid, b"E", False)
                client.transmit()
                while client.received < 1:
                    client.progress.clear()
                    await client.progress.wait()
                samples.append(time.perf_counter() - start)
        out["samples"] = samples
        return out
    async with connect(
        "127.0.0.1", args.port, configuration=config, create_protocol=protocol
    ) as client:
        quic = client._quic
        cpu0 = time.process_time()
        start = time.perf_counter()
        sid = quic.get_next_available_stream_id()
        if args.mode == "upload":
            quic.send_stream_data(sid, b"S", False)
            sent = 0
            while sent < args.size:
                if _queued(quic, sid) > SEND_LIMIT:
                    client.progress.clear()
                    await client.progress.wait()
                    continue
                n = min(CHUNK, args.size - sent)
                sent += n
                quic.send_stream_data(sid, _ZEROS[:n], sent == args.size)
                client.transmit()
            await client.finished
            counted = int.from_bytes(client.head[:8], "big")
            if counted != args.size:
                raise SystemExit(f"server counted {counted} bytes")
        else:
            quic.send_stream_data(sid, b"D" + args.size.to_bytes(8, "big"), True)
            client.transmit()
            await client.finished
            if client.received != args.size:
                raise SystemExit(f"received {client.received} of {args.size} bytes")
        out["seconds"] = time.perf_counter() - start
        out["cpu"] = time.process_time() - cpu0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--stack", choices=["aioquic", "qh3"], default="aioquic")
    parser.add_argument("--uvloop", action="store_true", help="client: run on uvloop")
    parser.add_argument("--alpn", default="bench", help="client: bench (this server) or orp/1")
    parser.add_argument("--mode", choices=["upload", "download", "ttfb"], default="upload")
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args(argv)
    if args.role == "server":
        asyncio.run(_serve(args))
        return
    coro = asyncio.wait_for(_client(args), timeout=600)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    result["loop"] = "uvloop" if args.uvloop else "asyncio"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
