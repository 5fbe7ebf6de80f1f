"""Keep-alive and peer-silence detection for one QUIC connection (both libraries).

A PING every ``interval`` keeps NATs and the relay's idle timer warm (spec 01).
Idle, a live peer answers every keep-alive, so ``silence_timeout`` without a
packet means it is gone. With bytes in flight a live peer acknowledges
within a few PTOs, so we give up sooner: a relay that was killed shows no
sign at all (aioquic sends no stateless reset), and every second here is a
second the application's stream stalls.

The busy rule counts from the later of the last packet received and the
moment bytes went in flight (``busy_since``): an idle connection heard
its peer last at the previous keep-alive, ~3 s ago, and a PING or the first
bytes after a pause must not find it "silent for 3 s" at once. A relay that
is merely slow (a flood, a loaded host) then has the full floor to answer.
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
        self.busy_since: float | None = None
        """When bytes went in flight after none were (None: nothing in flight)."""

    def received(self) -> None:
        """A datagram arrived."""
        self.last_rx = self._loop.time()

    def start(self) -> None:
        """The handshake completed: ping every ``interval``."""
        self._keepalive = self._loop.call_later(self._interval, self.on_keepalive_timer)

    def stop(self) -> None:
        for handle in (self._keepalive, self._liveness):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._liveness = None

    def on_keepalive_timer(self) -> None:
        """The keep-alive timer fired: PING (bytes go in flight) and re-arm."""
        self._keepalive = None
        if self._pinger.terminated or self.peer_gone():
            return
        self._pinger.send_ping()
        if self.busy_since is None:
            self.busy_since = self._loop.time()
        self._keepalive = self._loop.call_later(self._interval, self.on_keepalive_timer)
        if self._liveness is None:
            self._liveness = self._loop.call_later(settings.LIVENESS_CHECK, self._check_liveness)

    def _check_liveness(self) -> None:
        self._liveness = None
        if self._pinger.terminated or self.peer_gone():
            return
        self._liveness = self._loop.call_later(settings.LIVENESS_CHECK, self._check_liveness)

    def peer_gone(self) -> bool:
        """Close if the peer has been silent too long; True if we did."""
        now = self._loop.time()
        silent = now - self.last_rx
        pto = self._pinger.probe_timeout_in_flight() if self._pinger.connected else None
        if pto is None:
            self.busy_since = None
        elif self.busy_since is None:
            self.busy_since = now  # noticed at a check: at most LIVENESS_CHECK late
        if silent <= self._silence_timeout:
            if pto is None or self.busy_since is None:
                return False
            busy_silent = now - max(self.last_rx, self.busy_since)
            if busy_silent <= max(settings.BUSY_SILENCE_FLOOR, 4 * pto):
                return False
        busy = "-" if self.busy_since is None else f"{now - self.busy_since:.2f}s"
        log.debug(
            "QUIC peer silent; closing",
            extra={"attrs": {"silent": f"{silent:.2f}s", "busy_for": busy, "pto": pto}},
        )
        self._pinger.close_silent(f"peer silent for {silent:.1f}s")
        return True
