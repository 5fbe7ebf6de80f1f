"""One Connection/Stream interface for every relay transport.

The agent and the relay only ever see these two abstract classes, so a second
backend (TLS + yamux over TCP, spec 02 §9) slots in without touching them.
The stream shape follows trio's ``abc.HalfCloseableStream``: ``send_all``
waits while the unsent buffer is over its bound (backpressure), ``send_eof``
half-closes, ``receive_some`` returns ``b""`` at end of stream.

Errors (trio's trio of them, see STYLE.md §1 "Errors"):

* :class:`ClosedResourceError` -- *we* closed the object, then used it;
* :class:`BrokenResourceError` -- the peer or the network broke it (stream
  reset, STOP_SENDING, connection lost); the detail is in ``__cause__``;
* :class:`BusyResourceError` -- two tasks used one direction at once.

:class:`CertificateError` is the broken handshake whose cause is the peer's
certificate: the agent logs it on every retry, since only a person can fix it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

__all__ = [
    "BrokenResourceError",
    "BusyResourceError",
    "CertificateError",
    "ClosedResourceError",
    "Connection",
    "PeerInfo",
    "Stream",
    "TransportError",
]


class TransportError(Exception):
    """Base class of every transport error."""


class ClosedResourceError(TransportError):
    """The stream or connection was closed locally and then used."""


class SendClosedError(ClosedResourceError):
    """A write after this side ended its sending half (``send_eof``).

    Unlike a peer that refuses bytes, nobody needs telling: it was our choice.
    """


class BrokenResourceError(TransportError):
    """The peer or the network broke the stream or connection.

    Attributes:
        code: the application error code the peer reset the stream (or stopped
            reading it) with, where the transport carries one; ``None`` when the
            connection died or the peer gave no code. ``orp.is_final(code)`` tells an
            application's close from a broken link.
    """

    def __init__(self, *args: object, code: int | None = None) -> None:
        super().__init__(*args)
        self.code = code


class CertificateError(BrokenResourceError):
    """The handshake failed because the server's certificate does not verify
    (wrong CA, expired or not yet valid, wrong name); the message says which."""


class BusyResourceError(TransportError):
    """Two tasks tried to read (or write) the same stream at once."""


@dataclass(frozen=True)
class PeerInfo:
    """What we know about the other end of a connection."""

    address: tuple[str, int]
    """Remote (ip, port), IPv4-mapped IPv6 addresses folded to dotted quad."""
    certificate: x509.Certificate | None = None
    """Peer leaf certificate, when it presented one."""
    chain: tuple[x509.Certificate, ...] = field(default_factory=tuple)
    """Intermediates the peer sent after its leaf."""


class Stream(abc.ABC):
    """A reliable, ordered, bidirectional byte stream with half-close."""

    stream_id: int

    @abc.abstractmethod
    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Wait for and return up to ``max_bytes`` bytes.

        Returns:
            At least one byte, or ``b""`` once the peer has finished sending (FIN).

        Raises:
            BrokenResourceError: the peer reset the stream or the connection died.
            ClosedResourceError: we closed or aborted the stream.
            BusyResourceError: another task is already reading.
        """

    @abc.abstractmethod
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of ``data``, waiting while the unsent buffer is over its bound.

        Raises:
            BrokenResourceError: the peer asked us to stop (STOP_SENDING) or the
                connection died.
            ClosedResourceError: we already sent EOF or closed the stream.
        """

    @abc.abstractmethod
    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after the data already sent.

        Idempotent. Raises nothing if the stream is already broken.
        """

    @abc.abstractmethod
    def abort(self, error_code: int = 0) -> None:
        """Reset both directions at once (RESET_STREAM + STOP_SENDING on QUIC)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Graceful close: FIN if not yet sent, stop reading. Idempotent."""

    @property
    @abc.abstractmethod
    def unsent_bytes(self) -> int:
        """Bytes queued but not yet acknowledged by the peer."""

    async def wait_send_buffer_empty(self) -> None:
        """Wait until :attr:`unsent_bytes` is 0 (bound it with ``asyncio.timeout``).

        No backend reports acknowledgements as an event, so this default looks every
        20 ms; a backend with such an event may override it.
        """
        while self.unsent_bytes:  # noqa: ASYNC110 - no acknowledgement event to wait on
            await asyncio.sleep(0.02)


class Connection(abc.ABC):
    """A multiplexed, authenticated connection to a relay or an agent."""

    @property
    @abc.abstractmethod
    def peer(self) -> PeerInfo:
        """Remote address and certificate."""

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the connection has terminated, for whatever reason."""

    @abc.abstractmethod
    async def open_stream(self) -> Stream:
        """Open a new bidirectional stream.

        Waits (does not fail) while the peer's concurrent-stream limit is reached.

        Raises:
            BrokenResourceError: the connection died.
            ClosedResourceError: we closed the connection.
        """

    @abc.abstractmethod
    async def accept_stream(self) -> Stream:
        """Wait for the next stream the peer opened.

        Raises:
            BrokenResourceError: the connection died.
            ClosedResourceError: we closed the connection.
        """

    @abc.abstractmethod
    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Close the connection now (CONNECTION_CLOSE with an application code)."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the connection has terminated."""

    @property
    @abc.abstractmethod
    def close_reason(self) -> str:
        """Why the connection ended, for logs ("" while it is open)."""

    @property
    def peer_close_code(self) -> int | None:
        """The application error code the peer closed the connection with, where the
        transport carries one (QUIC CONNECTION_CLOSE); None while open, after a
        local close, a timeout, or on transports without codes."""
        return None

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, where the transport measures one."""
        return None

    on_datagram: Callable[[bytes], None] | None = None
    """Called with each unreliable datagram the peer sent (QUIC DATAGRAM frames, RFC
    9221), where the transport carries them; set by the connection's owner."""

    def send_datagram(self, data: bytes) -> bool:
        """Send ``data`` as one unreliable datagram (RFC 9221) if the transport and the
        peer support it and it fits in a packet.

        Returns:
            False when it was not sent (no datagram support, too large, closed): the
            caller uses the stream instead. True does not mean it will arrive.
        """
        return False
