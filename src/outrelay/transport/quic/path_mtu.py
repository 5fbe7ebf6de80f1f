"""Larger QUIC datagrams where the path allows them (issue 16).

aioquic does the same Python work for every packet whatever its size, so
the datagram size sets the cost of a byte: raising it from 1,350 B to 16 KiB
on loopback cut the CPU seconds per GiB of the relay and both agents from
84 to 13 and made the bulk path 5x faster (BENCHMARKS.md, "dgram" rows).
Every QUIC connection starts at :data:`settings.MAX_DATAGRAM_SIZE` (1,350 B,
safe on any path). Once its handshake completes, each end chooses the size
of the datagrams *it sends* (:func:`choose_datagram_size`) from:

* the path MTU the kernel knows for the peer (:func:`kernel_path_payload`:
  ``IP_MTU``/``IPV6_MTU`` of a UDP socket connected to the peer address,
  which is the route's MTU lowered by any ICMP "fragmentation needed" the
  kernel has seen), minus the IP and UDP headers;
* the peer's ``max_udp_payload_size`` transport parameter (RFC 9000
  §18.2): a quic-go relay announces 1,452 B, qh3 1,472 B, aioquic nothing
  (65,527 B);
* :data:`settings.LARGE_DATAGRAM_MAX`, the operator's cap.

Only a path whose MTU is jumbo-sized (at least :data:`JUMBO_PAYLOAD`: loopback, a
jumbo-frame LAN) is upgraded; on an ordinary 1,500-byte path the size
stays 1,350 B as before, so nothing changes where a tunnel or PPPoE hop
hides a smaller MTU than the route's. The choice is re-checked every
:data:`RECHECK_INTERVAL` seconds so a smaller MTU the kernel learns later
brings the size down.

A jumbo route whose path silently drops large datagrams (a smaller MTU
further on and no ICMP back: a black hole, RFC 8899 §4.3) shows as large
packets lost while none is acknowledged: :class:`BlackHoleDetector` then
takes the connection back to the start size (aioquic sends the lost data
again in small packets), and :func:`note_black_hole` keeps that peer host
at the start size for :data:`SUSPECT_FOR` seconds, also for the next
connections. An upgraded connection that falls silent is noted the same way.

Only the sending side changes: every receiver reads datagrams of up to
64 KiB (``outrelay.transport.udp``), and a peer that announces a smaller
``max_udp_payload_size`` is never sent more.
"""

from __future__ import annotations

import socket

from outrelay.transport.quic import settings

__all__ = [
    "JUMBO_PAYLOAD",
    "RECHECK_INTERVAL",
    "SUSPECT_FOR",
    "BlackHoleDetector",
    "choose_datagram_size",
    "kernel_path_payload",
    "note_black_hole",
    "suspected",
]

JUMBO_PAYLOAD = 4096
"""The smallest path payload (MTU minus IP and UDP headers) worth leaving
1,350 B for: below it the gain is small and the risk (a hidden smaller MTU
on the path) is not."""
RECHECK_INTERVAL = 10.0
"""Seconds between two looks at the kernel's path MTU for an upgraded connection."""
SUSPECT_FOR = 600.0
"""Seconds a peer host stays at the start size after a black hole towards it."""
BLACK_HOLE_LOSSES = 3
BLACK_HOLE_AFTER = 1.0
"""A black hole: at least ``BLACK_HOLE_LOSSES`` large packets lost over at least
``BLACK_HOLE_AFTER`` seconds without one large packet acknowledged. Congestion
losses on a working path are followed by acknowledgements of later large
packets within a round trip, which end the streak."""
SUSPECTS_MAX = 1024
"""Hosts remembered at most (the oldest is forgotten first)."""
DEFAULT_PEER_PAYLOAD = 65527
"""``max_udp_payload_size`` of a peer that does not announce one (RFC 9000 §18.2)."""

_IP_MTU = getattr(socket, "IP_MTU", 14)
_IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
_UDP_HEADER = 8


def kernel_path_payload(address: tuple[str, int]) -> int | None:
    """The largest UDP payload the kernel would send to ``address`` unfragmented.

    Connecting a UDP socket sends nothing; it makes the kernel resolve the
    route, whose MTU (or the smaller path MTU it learned) ``IP_MTU`` reports.
    None when it cannot tell (not Linux, no route, an address it refuses).
    """
    host, port = address[0], address[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port or 9))
            if family == socket.AF_INET6:
                mtu = sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
                header = 40
            else:
                mtu = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
                header = 20
    except (OSError, ValueError, OverflowError):
        return None
    return int(mtu) - header - _UDP_HEADER


_suspects: dict[str, float] = {}
"""Peer host -> when it was noted silent (insertion order is age order)."""


class BlackHoleDetector:
    """Watches the fate of one connection's large packets (sans-IO: sizes and times in)."""

    def __init__(self, floor: int) -> None:
        self._floor = floor
        self._streak = 0
        self._since: float | None = None

    def acked(self, size: int) -> None:
        """A packet of ``size`` bytes was acknowledged."""
        if size > self._floor:
            self._streak = 0
            self._since = None

    def lost(self, size: int, now: float) -> bool:
        """A packet of ``size`` bytes was declared lost; True: the path is a black hole."""
        if size <= self._floor:
            return False
        if self._since is None:
            self._since = now
        self._streak += 1
        return self._streak >= BLACK_HOLE_LOSSES and now - self._since >= BLACK_HOLE_AFTER


def note_black_hole(host: str, now: float) -> None:
    """Large datagrams to ``host`` got lost: stay small with it for a while."""
    _suspects.pop(host, None)
    _suspects[host] = now
    while len(_suspects) > SUSPECTS_MAX:
        del _suspects[next(iter(_suspects))]


def suspected(host: str, now: float) -> bool:
    """Was a black hole towards ``host`` noted less than ``SUSPECT_FOR`` ago?"""
    since = _suspects.get(host)
    if since is None:
        return False
    if now - since < SUSPECT_FOR:
        return True
    del _suspects[host]
    return False


def choose_datagram_size(
    path_payload: int | None,
    peer_payload: int | None,
    *,
    cap: int | None = None,
    floor: int | None = None,
) -> int:
    """The datagram size to send with, given what the path and the peer allow.

    Args:
        path_payload: :func:`kernel_path_payload` (None: unknown).
        peer_payload: the peer's ``max_udp_payload_size`` (None: not announced).
        cap: the largest size we ever use (default ``settings.LARGE_DATAGRAM_MAX``).
        floor: the size every connection starts with (default
            ``settings.MAX_DATAGRAM_SIZE``); returned when the path is not
            known to be jumbo-sized.
    """
    cap = settings.LARGE_DATAGRAM_MAX if cap is None else cap
    floor = settings.MAX_DATAGRAM_SIZE if floor is None else floor
    if path_payload is None or path_payload < JUMBO_PAYLOAD:
        return floor
    peer = DEFAULT_PEER_PAYLOAD if peer_payload is None else peer_payload
    return max(floor, min(path_payload, peer, cap))
