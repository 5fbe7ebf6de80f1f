"""The addresses of this host's interfaces, for host candidates (spec 03 §7.1).

Linux only, without a subprocess: IPv4 addresses through the ``SIOCGIFADDR``
ioctl for each interface of :func:`socket.if_nameindex` (one address per
interface, the primary), IPv6 addresses from ``/proc/net/if_inet6``.
Elsewhere, or when both fail, the names the host name resolves to.
Filtering (loopback, link-local, …) is :func:`~.candidates.host_candidates`' job.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from pathlib import Path

__all__ = ["interface_addresses", "parse_if_inet6"]

_SIOCGIFADDR = 0x8915
_IF_INET6 = Path("/proc/net/if_inet6")


def parse_if_inet6(text: str) -> list[str]:
    """Addresses of ``/proc/net/if_inet6`` lines (32 hex digits first), in order."""
    out: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return out


def _ipv4_addresses() -> list[str]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux
        return []
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            out.append(socket.inet_ntoa(reply[20:24]))
    return out


def interface_addresses() -> list[str]:
    """Every local address we can find, in interface order, IPv4 first."""
    addresses: list[str] = []
    with contextlib.suppress(OSError):
        addresses += _ipv4_addresses()
    with contextlib.suppress(OSError):
        addresses += parse_if_inet6(_IF_INET6.read_text())
    if not addresses:
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(socket.gethostname(), None)
            addresses = [str(i[4][0]) for i in infos]
    return list(dict.fromkeys(addresses))
