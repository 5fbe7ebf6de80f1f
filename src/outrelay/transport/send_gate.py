"""The send half's rules of a QUIC or yamux stream: one writer, and when writing must fail.

:class:`~outrelay.transport.quic.QuicStream` and
:class:`~outrelay.transport.tcp.TcpStream` each hold one :class:`SendGate`; the
waiting itself (for credit, for the socket) is the backend's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SendClosedError,
)

__all__ = ["SendGate"]


class SendGate:
    """Writer state of one stream: closed, EOF sent, broken by the peer, busy."""

    def __init__(self) -> None:
        self.closed = False
        """We closed the stream (``abort``/``aclose``)."""
        self.eof_sent = False
        self.broken: tuple[str, int | None] | None = None
        """``(message, code)`` once the peer refused our data (STOP_SENDING, RST)."""
        self.ready = asyncio.Event()
        """Set when a waiting writer should look again."""
        self._writing = False

    def break_(self, message: str, code: int | None) -> None:
        """The peer will take no more: writes raise ``BrokenResourceError(message, code)``."""
        self.broken = (message, code)
        self.ready.set()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the stream's one writer slot.

        Raises:
            BusyResourceError: another task is writing.
        """
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def check(self, raise_if_terminated: Callable[[], None]) -> None:
        """Raise why writing must fail now, if it must.

        Raises:
            ClosedResourceError: we closed the stream.
            SendClosedError: we already sent EOF.
            BrokenResourceError: the peer refused more data (with its code),
                or ``raise_if_terminated`` raised it for the connection.
        """
        if self.closed:
            raise ClosedResourceError("stream closed")
        if self.eof_sent:
            raise SendClosedError("stream already closed for sending")
        if self.broken is not None:
            message, code = self.broken
            raise BrokenResourceError(message, code=code)
        raise_if_terminated()
