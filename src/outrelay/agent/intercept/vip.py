"""Virtual IPs for consumed services (spec 03 §6.4). Sans-IO: no sockets, no clock.

Theory of operation. In tproxy mode every consumed service gets one address
from the CGNAT range 100.64.0.0/10. The embedded DNS server answers
``<svc>.<suffix>`` with it; an iptables REDIRECT rule sends every TCP
connection to the range to the agent's tproxy listener, which recovers the
original destination and maps it back to the service here. The port is never
looked at, so any port on a VIP reaches the same service.

Allocation follows the reference so that VIPs are predictable across the two
implementations:

* the first candidate is the network address + 1 (**100.64.0.1**);
* candidates are handed out in order; any address whose last octet is 0 or
  255 is skipped in every /24 (some stacks treat ``x.y.z.0``/``x.y.z.255`` as
  network/broadcast addresses even inside a /10);
* the last address of the prefix is never handed out (for the /10 it is
  100.127.255.255, which the previous rule skips anyway);
* the same name always gets the same VIP; VIPs are never released, so a VIP
  is stable for the life of the process;
* past the end: :class:`VipPoolExhausted` ("intercept: VIP pool exhausted").

[REC] (spec 03 §6.5): names are matched **case-insensitively**. The table is
keyed by the lower-cased name, so ``Web`` and ``web`` share one VIP, and the
reverse lookup returns the spelling first allocated (the name sent to the
relay in OPEN_STREAM). The reference keys the table case-sensitively while
its DNS server lower-cases queries, so a service with an upper-case letter
never resolves there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["CGNAT_NETWORK", "VipAllocator", "VipPoolExhausted", "VipStatistics"]

CGNAT_NETWORK = ipaddress.IPv4Network("100.64.0.0/10")
"""RFC 6598 shared address space: not routed on the Internet and rarely used
inside a pod, so redirecting all of it is safe (spec 03 §6.4: fixed, no flag)."""


class VipPoolExhausted(Exception):
    """Every address of the prefix is taken (fatal at start-up, spec 03 §6.4)."""


@dataclass(frozen=True)
class VipStatistics:
    allocated: int
    """VIPs handed out so far."""
    network: str
    """The prefix they come from, e.g. ``100.64.0.0/10``."""


class VipAllocator:
    """Hands out one IPv4 address per service name from ``network``.

    Args:
        network: an IPv4 prefix; the default is 100.64.0.0/10. Tests pass small
            prefixes to reach exhaustion quickly.

    Raises:
        ValueError: ``network`` is not an IPv4 prefix (IPv6 VIPs do not exist,
            spec 03 §6.3).
    """

    def __init__(self, network: ipaddress.IPv4Network | str = CGNAT_NETWORK) -> None:
        net = ipaddress.ip_network(network, strict=True)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"VIP network must be an IPv4 prefix, got {network!s}")
        self.network = net
        self._next = int(net.network_address) + 1
        self._last = int(net.broadcast_address) - 1  # last usable candidate
        self._by_key: dict[str, ipaddress.IPv4Address] = {}
        self._by_vip: dict[ipaddress.IPv4Address, str] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.lower()

    def allocate(self, name: str) -> ipaddress.IPv4Address:
        """The VIP for ``name``, allocating the next free one on first use.

        Returns:
            The same address for the same name (case-insensitively) every time.

        Raises:
            VipPoolExhausted: no address is left; nothing was allocated.
        """
        key = self._key(name)
        found = self._by_key.get(key)
        if found is not None:
            return found
        candidate = self._next
        while candidate <= self._last:
            last_octet = candidate & 0xFF
            if last_octet not in (0, 255):
                vip = ipaddress.IPv4Address(candidate)
                if vip not in self._by_vip:
                    self._next = candidate + 1
                    self._by_key[key] = vip
                    self._by_vip[vip] = name
                    return vip
            candidate += 1
        self._next = candidate
        raise VipPoolExhausted(
            f"intercept: VIP pool exhausted ({self.network} has no address left for {name!r}; "
            f"{len(self._by_vip)} allocated)"
        )

    def lookup(self, name: str) -> ipaddress.IPv4Address | None:
        """Forward lookup (case-insensitive); never allocates (DNS uses this)."""
        return self._by_key.get(self._key(name))

    def reverse(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str | None:
        """The service name behind ``address``, or ``None``.

        An IPv4-mapped IPv6 address (``::ffff:100.64.0.1``, seen by a dual-stack
        listener) is looked up as its IPv4 address; any other IPv6 address
        misses. A string that is not an address misses too.
        """
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address)
            except ValueError:
                return None
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return None
            address = mapped
        return self._by_vip.get(address)

    def items(self) -> list[tuple[str, ipaddress.IPv4Address]]:
        """(name as first allocated, VIP) in allocation order."""
        return [(name, vip) for vip, name in self._by_vip.items()]

    def __len__(self) -> int:
        return len(self._by_vip)

    def statistics(self) -> VipStatistics:
        return VipStatistics(allocated=len(self._by_vip), network=str(self.network))
