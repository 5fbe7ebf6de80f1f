"""Which QUIC library dials the relay (the agent's ``--quic-backend``).

The agent's side of a relay session is a QUIC *client*, and faster client
stacks than aioquic exist (DESIGN.md, dependency table). This module maps a
backend name to a connect function with the contract of
:func:`outrelay.transport.quic.client.connect_quic`:

* ``aioquic``: :mod:`outrelay.transport.quic.client`, the reference backend (the
  relay, P2P and forward planes always use it).
* ``qh3``: :mod:`outrelay.transport.quic.qh3` (optional dependency, Rust core).
* ``auto``: aioquic for now. qh3 passes the transport and e2e tests (it now
  admits ``MAX_INCOMING_STREAMS`` relay-opened streams), but qh3 2.1 returns
  receive credit when the core's connection-wide event queue is popped, with
  no per-stream way to defer it (``bench/qh3_credit.py``, BENCHMARKS.md): its
  backpressure pauses every stream of the relay connection while one
  application stops reading, which a sidecar must not do. Its bulk gain through
  our aioquic relay is within noise (BENCHMARKS.md, 2026-12-04). Flip ``AUTO``
  once qh3's core can return a stream's credit on consumption.

qh3 is imported lazily so that an agent without it (or with an untested
version) still starts on aioquic.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from outrelay.transport.base import Connection
from outrelay.transport.quic.client import connect_quic
from outrelay.transport.quic.settings import HANDSHAKE_TIMEOUT
from outrelay.transport.tls import QuicTlsConfig

__all__ = ["QUIC_BACKENDS", "QuicBackend", "QuicConnector", "select_quic_backend"]

QUIC_BACKENDS = ("auto", "aioquic", "qh3")
AUTO = "aioquic"
"""What ``auto`` means (see the module docstring)."""
QH3_TESTED = (2,)
"""qh3 major versions the qh3 backend is tested against (it reaches into
``QuicConnection._drain_core``, a private method: see ``quic/_qh3.py``)."""


class QuicConnector:
    """``await connector(host, port, tls, handshake_timeout=...)`` -> Connection."""

    def __init__(self, connect: Callable[..., Awaitable[Connection]]) -> None:
        self._connect = connect

    async def __call__(
        self,
        host: str,
        port: int,
        tls: QuicTlsConfig,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> Connection:
        return await self._connect(host, port, tls, handshake_timeout=handshake_timeout)


@dataclass(frozen=True)
class QuicBackend:
    """The backend chosen for a requested name."""

    name: str
    """``aioquic`` or ``qh3``."""
    version: str
    """The library's installed version."""
    connect: QuicConnector
    note: str = ""
    """Why ``auto`` fell back to aioquic (empty otherwise)."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _qh3() -> QuicBackend:
    """The qh3 backend; raises ImportError if qh3 is missing or untested."""
    version = _version("qh3")
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) not in QH3_TESTED:
        raise ImportError(f"qh3 {version} is not a tested version (want {QH3_TESTED[0]}.x)")
    module = importlib.import_module("outrelay.transport.quic.qh3")
    return QuicBackend("qh3", version, QuicConnector(module.connect_quic_qh3))


def select_quic_backend(name: str) -> QuicBackend:
    """Resolve ``auto``, ``aioquic`` or ``qh3`` to a backend.

    Raises:
        ValueError: unknown name, or ``qh3`` asked for but not usable (the
            message says why).
    """
    if name not in QUIC_BACKENDS:
        raise ValueError(f"unknown QUIC backend {name!r} (choose from {', '.join(QUIC_BACKENDS)})")
    note = ""
    if name == "auto":
        name = AUTO
        note = "auto"
    if name == "qh3":
        try:
            return _qh3()
        except ImportError as exc:
            if not note:
                raise ValueError(f"--quic-backend qh3 is not usable: {exc}") from exc
            note = f"qh3 not usable ({exc})"
    return QuicBackend("aioquic", _version("aioquic"), QuicConnector(connect_quic), note)
