"""The forward plane (mini-TURN, spec 02 §8): a sans-IO core and its UDP shell.

Theory of operation. The relay hands each side of a forward-mode stream an
allocation id (``ALLOC_GRANTED``, spec 02 §6.4). An agent *registers* by
sending ``00000000 || my_alloc`` from its UDP socket; the plane remembers that
source address under ``my_alloc``. Every other datagram starts with the
*peer's* allocation id: the plane strips those 4 bytes and sends the rest to
the address registered under that id. Nothing is authenticated and nothing is
answered; the payload is the agents' end-to-end QUIC, so the relay only ever
sees ciphertext.

Ours beyond the reference:

* a registration that carries no traffic for :data:`REGISTRATION_IDLE` is
  forgotten (the reference keeps entries until the stream ends, for ever for
  ids registered without a stream). Agents refresh every 15 s (spec 03 §8.2
  [REC]), so a live session never expires;
* :meth:`PlaneCore.statistics` counts datagrams and bytes, and the shell takes
  an optional ``observer`` that sees every forwarded payload (tests use it to
  prove that no plaintext crosses the plane).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outrelay.observe import kv

__all__ = [
    "REGISTRATION_IDLE",
    "ForwardPlane",
    "PlaneCore",
    "PlaneStatistics",
    "format_endpoint",
]

log = logging.getLogger("outrelay.relay.plane")

Address = tuple[str, int]

PREFIX_SIZE = 4  # spec 02 §8: uint32 BE allocation id
REGISTRATION_SIZE = 8  # spec 02 §8: 00000000 || my_alloc
READ_BUFFER = 65536  # spec 02 §12
MAX_ALLOCATION = 0xFFFFFFFF
REGISTRATION_IDLE = 120.0
"""Ours: seconds without a registration refresh or a datagram from the
registered address before the entry is dropped. Agents refresh every 15 s
and QUIC keep-alives flow more often, so only dead sessions expire."""
EXPIRY_PERIOD = 10.0
"""How often the shell sweeps idle registrations."""


@dataclass
class _Entry:
    address: Address
    last_seen: float


@dataclass(frozen=True)
class PlaneStatistics:
    registrations: int
    """Entries in the table now."""
    forwarded_datagrams: int
    forwarded_bytes: int
    """Payload bytes sent on (prefix stripped)."""
    dropped_datagrams: int
    """Too short, or addressed to an unknown allocation."""
    next_allocation: int


class PlaneCore:
    """Allocation counter and table; datagrams in, datagrams out. No I/O, no clock."""

    def __init__(
        self, *, idle_timeout: float = REGISTRATION_IDLE, next_allocation: int = 1
    ) -> None:
        """Args:
        idle_timeout: seconds a registration may stay silent (0: forever).
        next_allocation: what :meth:`allocate` returns first; spec 02 §8 starts the
            counter at 1 (another start shows the wrap in tests).
        """
        if not 1 <= next_allocation <= MAX_ALLOCATION:
            raise ValueError(f"next_allocation {next_allocation} is not in 1..{MAX_ALLOCATION}")
        self._next = next_allocation
        self._table: dict[int, _Entry] = {}
        self.idle_timeout = idle_timeout
        self._forwarded = 0
        self._forwarded_bytes = 0
        self._dropped = 0

    def allocate(self) -> int:
        """The next allocation id (1, 2, …; 0 is skipped on wrap). No table entry yet."""
        alloc = self._next
        self._next = self._next + 1 if self._next < MAX_ALLOCATION else 1
        return alloc

    def release(self, *allocations: int) -> None:
        """Forget these ids (spec 02 §6.4 step 6); unknown ids are ignored."""
        for alloc in allocations:
            self._table.pop(alloc, None)

    def lookup(self, allocation: int) -> Address | None:
        entry = self._table.get(allocation)
        return entry.address if entry is not None else None

    def datagram_received(
        self, data: bytes, source: Address, now: float
    ) -> tuple[bytes, Address] | None:
        """Handle one datagram read from the plane socket.

        Returns:
            ``(payload, destination)`` to send from the plane socket, or None
            (a registration, or a dropped datagram).
        """
        if len(data) < PREFIX_SIZE:
            self._dropped += 1
            return None
        prefix = int.from_bytes(data[:PREFIX_SIZE], "big")
        if prefix == 0:
            if len(data) < REGISTRATION_SIZE:
                self._dropped += 1
                return None
            alloc = int.from_bytes(data[PREFIX_SIZE:REGISTRATION_SIZE], "big")
            entry = self._table.get(alloc)
            if entry is None or entry.address != source:
                self._table[alloc] = _Entry(source, now)
            else:
                entry.last_seen = now
            return None
        entry = self._table.get(prefix)
        if entry is None:
            self._dropped += 1
            return None
        # The sender is not checked (spec 02 §8); traffic keeps its own entry fresh.
        for own in self._table.values():
            if own.address == source:
                own.last_seen = now
                break
        payload = data[PREFIX_SIZE:]
        self._forwarded += 1
        self._forwarded_bytes += len(payload)
        return payload, entry.address

    def expire(self, now: float) -> list[int]:
        """Drop registrations idle for longer than ``idle_timeout``; returns their ids."""
        if self.idle_timeout <= 0:
            return []
        stale = [a for a, e in self._table.items() if now - e.last_seen > self.idle_timeout]
        for alloc in stale:
            del self._table[alloc]
        return stale

    def statistics(self) -> PlaneStatistics:
        return PlaneStatistics(
            registrations=len(self._table),
            forwarded_datagrams=self._forwarded,
            forwarded_bytes=self._forwarded_bytes,
            dropped_datagrams=self._dropped,
            next_allocation=self._next,
        )


def format_endpoint(address: tuple[Any, ...]) -> str:
    """``host:port`` with IPv6 in brackets (spec 02 §6.4)."""
    host, port = str(address[0]), int(address[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ForwardPlane(asyncio.DatagramProtocol):
    """The UDP shell around :class:`PlaneCore` (``--listen-forward``)."""

    def __init__(
        self,
        core: PlaneCore | None = None,
        *,
        observer: Callable[[bytes], None] | None = None,
    ) -> None:
        self.core = core or PlaneCore()
        self._observer = observer
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.address: Address = ("", 0)

    @classmethod
    async def bind(
        cls, host: str, port: int, *, observer: Callable[[bytes], None] | None = None
    ) -> ForwardPlane:
        """Bind the plane socket.

        Raises:
            OSError: the address could not be bound.
        """
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(observer=observer), local_addr=(host or "0.0.0.0", port)
        )
        return protocol

    @property
    def endpoint(self) -> str:
        """The bound address as ALLOC_GRANTED's ``forward_endpoint`` (spec 02 §6.4)."""
        return format_endpoint(self.address)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram transport
        sockname = transport.get_extra_info("sockname")
        self.address = (str(sockname[0]), int(sockname[1]))
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(EXPIRY_PERIOD, self._sweep)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self._loop is not None
        source = (str(addr[0]), int(addr[1]))
        out = self.core.datagram_received(data, source, self._loop.time())
        if out is None or self._transport is None:
            return
        payload, destination = out
        if self._observer is not None:
            self._observer(payload)
        self._transport.sendto(payload, destination)

    def error_received(self, exc: Exception) -> None:
        log.debug("forward plane socket error", extra=kv(err=str(exc)))

    def _sweep(self) -> None:
        assert self._loop is not None
        for alloc in self.core.expire(self._loop.time()):
            log.info("forward registration expired", extra=kv(allocation=alloc))
        self._sweeper = self._loop.call_later(EXPIRY_PERIOD, self._sweep)

    def allocate_pair(self) -> tuple[int, int]:
        """Spec 02 §6.4 step 2: the consumer's id, then the provider's."""
        return self.core.allocate(), self.core.allocate()

    def release(self, *allocations: int) -> None:
        self.core.release(*allocations)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
