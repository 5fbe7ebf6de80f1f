"""The one module that reaches into qh3's private attributes or overrides its private methods.

qh3 (2.x, an optional dependency) keeps its Rust core behind a Python
``QuicConnection`` whose event queue is drained by a private method. Every
private name the qh3 backend uses lives here, with its reason;
``tests/transport/test_quic_private_api.py`` asserts each still exists with
the signature we rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import qh3.quic.connection as _connection_module
from qh3._hazmat import Buffer, QuicConnectionCore
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters
from qh3.quic.tls_bridge import QuicTlsBridge

from outrelay.transport.udp import RecordsSockname

__all__ = [
    "CORE_CLOSING_STATES",
    "CORE_LOCAL_MAX_STREAMS_BIDI",
    "QH3_MAX_STREAMS_BIDI",
    "HeldQuicConnection",
    "ProtocolBase",
    "bytes_in_flight",
    "datagram_backlog",
    "remote_address",
    "rtt",
]

CORE_LOCAL_MAX_STREAMS_BIDI = 21
"""Position of ``local_max_streams_bidi`` among ``QuicConnectionCore``'s
arguments: qh3's ``_create_core`` passes them positionally, with a literal 100."""
CORE_CLOSING_STATES = frozenset({"closing", "draining", "terminated"})
"""The core's ``state`` once the connection is ending: its events are popped
even while held, so that the close reaches us (a held queue would hide it)."""
QH3_MAX_STREAMS_BIDI = 100
"""What qh3 2.x hard-codes, in the core and in the transport parameters."""


@contextlib.contextmanager
def _replaced(name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """``qh3.quic.connection.<name>`` is ``wrap(<name>)`` during a synchronous call.

    qh3's ``_create_core`` and ``_create_tls`` build the core and the TLS bridge
    from those module globals, with qh3's stream limit as a literal; no loop
    iteration (so no other connection) runs while it is replaced."""
    original = getattr(_connection_module, name)
    setattr(_connection_module, name, wrap(original))
    try:
        yield
    finally:
        setattr(_connection_module, name, original)


class _TlsBridge(QuicTlsBridge):
    """qh3's TLS bridge announcing ``max_streams_bidi`` instead of a literal 100."""

    def __init__(self, *args: Any, max_streams_bidi: int, **kwargs: Any) -> None:
        self.max_streams_bidi = max_streams_bidi
        super().__init__(*args, **kwargs)  # serializes the transport parameters

    def serialize_transport_parameters(self) -> bytes:
        data = super().serialize_transport_parameters()
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.initial_max_streams_bidi = self.max_streams_bidi
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, parameters)
        return bytes(buf.data)


class HeldQuicConnection(QuicConnection):
    """qh3's connection whose event queue is left in the core while ``held()``,
    allowing ``max_streams_bidi`` peer-opened streams at once.

    qh3 hard-codes 100, as the core's ``local_max_streams_bidi`` (passed by
    the private ``_create_core``) and in the transport parameters (built by
    the TLS bridge the private ``_create_tls`` makes); both are replaced.
    The core replenishes MAX_STREAMS against the raised limit (measured:
    1,024 streams open at once, then 1,024 more after they closed).

    Popping a ``stream_data`` event is what returns credit to the peer, so
    not popping is the only way to push back: the private ``_drain_core``
    (which pops) is skipped while held, once the handshake is complete
    (private ``_handshake_complete``) and unless the core is closing (its
    ``state``: the close event waits in the same queue).
    """

    def __init__(
        self, *, configuration: QuicConfiguration, max_streams_bidi: int = QH3_MAX_STREAMS_BIDI
    ) -> None:
        self.max_streams_bidi = max_streams_bidi
        """Peer-opened bidirectional streams allowed at once (qh3 itself: 100)."""
        super().__init__(configuration=configuration)
        self.held: Callable[[], bool] = lambda: False

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        """qh3's core, with ``max_streams_bidi`` as its ``local_max_streams_bidi``."""
        limit = self.max_streams_bidi

        def core(original: Callable[..., QuicConnectionCore], *args: Any) -> QuicConnectionCore:
            # Only where qh3 put its literal: if the call changed, keep qh3's 100
            # (test_quic_private_api fails on it).
            if (
                len(args) > CORE_LOCAL_MAX_STREAMS_BIDI
                and args[CORE_LOCAL_MAX_STREAMS_BIDI] == QH3_MAX_STREAMS_BIDI
            ):
                args = (
                    *args[:CORE_LOCAL_MAX_STREAMS_BIDI],
                    limit,
                    *args[CORE_LOCAL_MAX_STREAMS_BIDI + 1 :],
                )
            return original(*args)

        with _replaced("QuicConnectionCore", lambda original: functools.partial(core, original)):
            super()._create_core(remote_addr, initial_dcid, now)

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        """qh3's TLS bridge, announcing ``max_streams_bidi`` (initial_max_streams_bidi)."""
        bridge = functools.partial(_TlsBridge, max_streams_bidi=self.max_streams_bidi)
        with _replaced("QuicTlsBridge", lambda _: bridge):
            return super()._create_tls(remote_source_cid)

    def _drain_core(self) -> None:
        core = self._core
        if (
            self._handshake_complete
            and self.held()
            and core is not None
            and core.state not in CORE_CLOSING_STATES
        ):
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


def datagram_backlog(quic: QuicConnection) -> int | None:
    """0 (qh3's core bounds its own DATAGRAM queue), or None when the peer accepts no
    DATAGRAM frames (private ``_remote_max_datagram_frame_size``, RFC 9221 §3)."""
    return None if quic._remote_max_datagram_frame_size is None else 0


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
