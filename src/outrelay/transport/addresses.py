"""Socket addresses: folding, resolving and binding, for every backend."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

from outrelay.transport.base import BrokenResourceError

__all__ = ["bind_udp", "fold_address", "resolve_udp"]


def fold_address(addr: Any) -> tuple[str, int]:
    """``(host, port)`` of a socket address; an IPv4-mapped IPv6 host becomes IPv4."""
    host, port = str(addr[0]), int(addr[1])
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
    return host, port


async def resolve_udp(host: str, port: int, family: int = 0) -> tuple[int, Any]:
    """``(family, sockaddr)`` of ``host:port`` for a UDP socket.

    Raises:
        BrokenResourceError: the name does not resolve (in ``family``, if given).
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise BrokenResourceError(f"cannot resolve {host}:{port}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    return family, addr


async def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` (an IPv6 wildcard is dual-stack).

    Raises:
        OSError: the address does not resolve or could not be bound.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock
