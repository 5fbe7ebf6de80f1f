"""Keep-alive and peer-silence detection for one QUIC connection (both libraries).

A PING every ``interval`` keeps NATs and the relay's idle timer warm (spec 01).
Idle, a live peer answers every keep-alive, so ``silence_timeout`` without a
packet means it is gone. With bytes in flight a live peer acknowledges
within a few PTOs, so we give up sooner: a relay that was killed shows no
sign at all (aioquic sends no stateless reset), and every second here is a
second the application's stream stalls.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from outrelay.transport.quic import settings

__all__ = ["KeepAlive", "Pinger"]

log = logging.getLogger("outrelay.transport.quic")


class Pinger(Protocol):
    """What :class:`KeepAlive` needs from its protocol."""

    @property
    def connected(self) -> bool: ...

    @property
    def terminated(self) -> bool:
        """The connection ended: stop."""

    def send_ping(self) -> None:
        """Queue a PING and transmit."""

    def probe_timeout_in_flight(self) -> float | None:
        """The probe timeout if bytes are in flight, else None."""

    def close_silent(self, reason: str) -> None:
        """End the connection for ``reason`` and send a CONNECTION_CLOSE."""


class KeepAlive:
    """The keep-alive and liveness timers of one connection (see the module docstring)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pinger: Pinger, *, interval: float,
        silence_timeout: float,
    ) -> None:  # fmt: skip
        self._loop = loop
        self._pinger = pinger
        self._interval = interval
        self._silence_timeout = silence_timeout
        self._keepalive: asyncio.TimerHandle | None = None
        self._liveness: asyncio.TimerHandle | None = None
        self.last_rx = loop.time()

    def received(self) -> None:
        """A datagram arrived."""
        self.last_rx = self._loop.time()

    def start(self) -> None:
        """The handshake completed: ping every ``interval``."""
        self._keepalive = self._loop.call_later(self._interval, self._send_keepalive)

    def stop(self) -> None:
        for handle in (self._keepalive, self._liveness):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._liveness = None

    def _send_keepalive(self) -> None:
        self._keepalive = None
        if self._pinger.terminated or self.peer_gone():
            return
        self._pinger.send_ping()
        self._keepalive = self._loop.call_later(self._interval, self._send_keepalive)
        if self._liveness is None:
            self._liveness = self._loop.call_later(settings.LIVENESS_CHECK, self._check_liveness)

    def _check_liveness(self) -> None:
        self._liveness = None
        if self._pinger.terminated or self.peer_gone():
            return
        self._liveness = self._loop.call_later(settings.LIVENESS_CHECK, self._check_liveness)

    def peer_gone(self) -> bool:
        """Close if the peer has been silent too long; True if we did."""
        silent = self._loop.time() - self.last_rx
        limit = self._silence_timeout
        pto = self._pinger.probe_timeout_in_flight() if self._pinger.connected else None
        if pto is not None:
            limit = min(limit, max(settings.BUSY_SILENCE_FLOOR, 4 * pto))
        if silent <= limit:
            return False
        log.debug("QUIC peer silent; closing", extra={"attrs": {"silent": f"{silent:.1f}s"}})
        self._pinger.close_silent(f"peer silent for {silent:.1f}s")
        return True
