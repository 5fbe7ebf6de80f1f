"""Listeners on 127.0.0.1 for the transport tests: QUIC or TLS + yamux, over the dev PKI.

:func:`listen_quic` and :func:`listen_tcp` start a server whose clients are verified
against the session's CA (``tlspki.Pki``); the :class:`Listener` keeps what it accepted
(``conns``) and why it refused whom it refused (``refused``). The small readers and raw
clients several transport test modules use live here too.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from outrelay.pki import ClientVerifier
from outrelay.transport import Connection, QuicTlsConfig, Stream, select_quic_backend
from outrelay.transport.quic import QuicConn, serve_quic
from outrelay.transport.tcp import TcpConn, TcpServerHandle, serve_tcp

from .tlspki import Pki

__all__ = [
    "Flood",
    "Listener",
    "dial_quic",
    "listen_quic",
    "listen_tcp",
    "open_and_accept",
    "ping_pong",
    "raw_tls_exchange",
    "read_all",
]

C = TypeVar("C", bound=Connection)

YAMUX_SYN = bytes.fromhex("00 01 0001 00000001 00000000")
"""A yamux WINDOW_UPDATE with SYN for stream 1: what an agent's first stream sends."""


@dataclass
class Listener(Generic[C]):
    """A server on 127.0.0.1 and what it reported: connections handed on, refusals."""

    handle: Any = None
    """The :class:`QuicServerHandle` or :class:`TcpServerHandle`."""
    conns: asyncio.Queue[C] = field(default_factory=asyncio.Queue)
    refused: list[str] = field(default_factory=list)
    """The reasons of every refused client, in order."""
    refused_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        return int(self.handle.address[1])

    def on_refused(self, addr: tuple[str, int], reason: str) -> None:
        self.refused.append(reason)
        self.refused_event.set()

    async def refusals(self, count: int) -> list[str]:
        """Wait (15 s at most) until ``count`` clients were refused; all reasons so far."""
        async with asyncio.timeout(15):
            while len(self.refused) < count:
                self.refused_event.clear()
                await self.refused_event.wait()
        return self.refused

    async def accepted(self) -> C:
        """The next connection handed on (waits 5 s at most)."""
        async with asyncio.timeout(5):
            return await self.conns.get()

    async def close(self) -> None:
        self.handle.close()
        if isinstance(self.handle, TcpServerHandle):
            await self.handle.wait_closed()


async def _listen(serve: Any, pki: Pki, **kwargs: Any) -> Any:
    state: Listener[Any] = Listener()
    verifier = ClientVerifier([pki.ca.cert])
    state.handle = await serve(
        "127.0.0.1",
        0,
        pki.relay,
        verify_client=lambda leaf, chain: verifier.verify(leaf, chain),
        on_connection=state.conns.put_nowait,
        on_refused=state.on_refused,
        **kwargs,
    )
    return state


async def listen_quic(pki: Pki, **kwargs: Any) -> Listener[QuicConn]:
    """``serve_quic`` with the relay's certificate; ``kwargs`` go to it (``admission``...)."""
    listener: Listener[QuicConn] = await _listen(serve_quic, pki, **kwargs)
    return listener


async def listen_tcp(pki: Pki, **kwargs: Any) -> Listener[TcpConn]:
    """``serve_tcp`` with the relay's certificate; ``kwargs`` go to it (handshake caps...)."""
    listener: Listener[TcpConn] = await _listen(serve_tcp, pki, **kwargs)
    return listener


async def dial_quic(backend: str, port: int, tls: QuicTlsConfig, **kwargs: Any) -> Connection:
    """Connect to 127.0.0.1:``port`` with the QUIC client library ``backend``."""
    return await select_quic_backend(backend).connect("127.0.0.1", port, tls, **kwargs)


async def read_all(stream: Stream, max_bytes: int = 65536) -> bytes:
    """Everything until EOF."""
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


async def raw_tls_exchange(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake with ``ctx``, send a yamux SYN, report what came back."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
        )
    except (OSError, ssl.SSLError) as exc:
        return f"handshake failed: {exc}"
    try:
        writer.write(YAMUX_SYN)
        data = await asyncio.wait_for(reader.read(100), 5)
        return "data" if data else "eof"
    except (OSError, ssl.SSLError) as exc:
        return f"error: {exc}"
    finally:
        writer.close()


async def open_and_accept(
    client: Connection, peer: Connection, first: bytes = b"x"
) -> tuple[Stream, Stream]:
    """Open a stream at ``client``, send ``first`` (a QUIC peer sees a stream with its
    first bytes); that stream and the one ``peer`` accepted."""
    stream = await client.open_stream()
    await stream.send_all(first)
    return stream, await peer.accept_stream()


async def ping_pong(stream: Stream, accept: Callable[[], Awaitable[Stream]]) -> Stream:
    """``ping`` and FIN on ``stream``; the side ``accept`` returns reads it all, then
    answers ``pong`` and FIN: our FIN closed one direction only. Returns that side."""
    await stream.send_all(b"ping")
    await stream.send_eof()
    remote = await accept()
    assert await read_all(remote) == b"ping"
    # Our FIN did not close the other direction.
    await remote.send_all(b"pong")
    await remote.send_eof()
    assert await read_all(stream) == b"pong"
    return remote


class Flood:
    """A task writing ``chunk`` to ``stream`` until cancelled; ``sent``: the bytes that got out."""

    def __init__(self, stream: Stream, chunk: bytes = b"y" * 65536) -> None:
        self.stream = stream
        self.chunk = chunk
        self.sent = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.stream.send_all(self.chunk)
            self.sent += len(self.chunk)

    async def released_by_reading(
        self, reader: Stream, max_bytes: int = 65536, check: Callable[[], None] | None = None
    ) -> None:
        """Read 4 MiB from ``reader`` (``check()`` after each read): the writer must have
        got more out meanwhile."""
        before = self.sent
        received = 0
        while received < 4 << 20:
            received += len(await reader.receive_some(max_bytes))
            if check is not None:
                check()
        assert self.sent > before
