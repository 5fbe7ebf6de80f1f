"""The :class:`Stream` interface over a plain TCP socket (applications, backends).

Lets one splice routine bridge a local socket and a relay stream
(spec 03 §5). ``abort`` closes with SO_LINGER 0 so the application sees a
TCP RST, the [REC] of spec 03 §5.2 for streams lost for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SendClosedError,
    Stream,
)

__all__ = ["SocketStream", "open_tcp"]

CLOSE_TIMEOUT = 5.0


class SocketStream(Stream):
    """A TCP connection as a half-closeable :class:`Stream`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._reading = False
        self._writing = False
        self._eof_sent = False
        self._closed = False
        sock = writer.get_extra_info("socket")
        self.stream_id = sock.fileno() if sock is not None else -1
        peer = writer.get_extra_info("peername")
        self.peername: tuple[str, int] | None = tuple(peer[:2]) if peer else None
        local = writer.get_extra_info("sockname")
        self.sockname: tuple[str, int] | None = tuple(local[:2]) if local else None

    @property
    def socket(self) -> socket.socket | None:
        sock: socket.socket | None = self._writer.get_extra_info("socket")
        return sock

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise ClosedResourceError("socket closed")
        if self._reading:
            raise BusyResourceError("another task is reading this socket")
        self._reading = True
        try:
            return await self._reader.read(max_bytes)
        except OSError as exc:
            raise BrokenResourceError(f"socket read failed: {exc}") from exc
        finally:
            self._reading = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ClosedResourceError("socket closed")
        if self._eof_sent:
            raise SendClosedError("socket closed for sending")
        if self._writing:
            raise BusyResourceError("another task is writing this socket")
        self._writing = True
        try:
            if self._writer.is_closing():
                raise BrokenResourceError("socket closed by peer")
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise BrokenResourceError(f"socket write failed: {exc}") from exc
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()

    @property
    def unsent_bytes(self) -> int:
        transport = self._writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def abort(self, error_code: int = 0) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        if self._closed:
            return
        self._closed = True
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()


async def open_tcp(host: str, port: int, *, connect_timeout: float = 10.0) -> SocketStream:
    """Dial a TCP backend.

    Raises:
        OSError: connection refused or unreachable (message as the OS gives it).
        TimeoutError: no answer within ``connect_timeout`` seconds.
    """
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(host, port)
    return SocketStream(reader, writer)
