"""The one module that reaches into qh3's private attributes or overrides its private methods.

qh3 (2.x, an optional dependency) keeps its Rust core behind a Python
``QuicConnection`` whose event queue is drained by a private method. Every
private name the qh3 backend uses lives here, with its reason;
``tests/transport/test_quic_private_api.py`` asserts each still exists with
the signature we rely on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from outrelay.transport.udp import RecordsSockname

__all__ = ["HeldQuicConnection", "ProtocolBase", "bytes_in_flight", "remote_address", "rtt"]


class HeldQuicConnection(QuicConnection):
    """qh3's connection whose event queue is left in the core while ``held()``.

    Popping a ``stream_data`` event is what returns credit to the peer, so
    not popping is the only way to push back: the private ``_drain_core``
    (which pops) is skipped while held, once the handshake is complete
    (private ``_handshake_complete``).
    """

    def __init__(self, *, configuration: QuicConfiguration) -> None:
        super().__init__(configuration=configuration)
        self.held: Callable[[], bool] = lambda: False

    def _drain_core(self) -> None:
        if self._handshake_complete and self.held():
            return
        super()._drain_core()

    def drain_held(self) -> None:
        """Pop what was left in the core while held."""
        if self._core is not None:
            super()._drain_core()


def rtt(quic: QuicConnection) -> float | None:
    """Smoothed round-trip time from the private Rust core, once it exists."""
    core = quic._core
    return None if core is None else core.smoothed_rtt


def bytes_in_flight(quic: QuicConnection) -> tuple[int, float]:
    """``(bytes in flight, smoothed RTT)`` from the private core (0s before it exists)."""
    core = quic._core
    if core is None:
        return 0, 0.0
    return int(core.bytes_in_flight), float(core.smoothed_rtt or 0.0)


def remote_address(quic: QuicConnection) -> Any:
    """The address we dialled (private ``_remote_addr``)."""
    return quic._remote_addr or ("", 0)


class ProtocolBase(RecordsSockname, QuicConnectionProtocol):
    """qh3's protocol with its private fields and methods under public names."""

    _quic: HeldQuicConnection

    @property
    def quic(self) -> HeldQuicConnection:
        return self._quic

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        self._connected = value

    def transmit_soon(self) -> None:
        """Coalesce writes: one ``transmit()`` at the next loop iteration (private)."""
        self._transmit_soon()

    def process_events(self) -> None:
        """Hand the events popped from the core to ``quic_event_received`` (private)."""
        self._process_events()
