"""Interception: how local connections find their way to a consumed service.

Tproxy mode (spec 03 §6.3–§6.5, Linux only): every tproxy ``--consume`` gets
a virtual IP from 100.64.0.0/10 (:mod:`.vip`), an embedded DNS server answers
``<svc>.<suffix>`` with it (:mod:`.dns`, sans-IO; :mod:`.dns_server`, the UDP
shell), and an iptables REDIRECT rule sends TCP connections to the range to a
listener that recovers the original destination with ``SO_ORIGINAL_DST`` and
maps it back to the service (:mod:`.tproxy`). :class:`TransparentCapture`
(:mod:`.capture`) starts and stops the three together.

Explicit mode (one TCP listener per ``--consume svc@addr``) lives in
:mod:`outrelay.agent.agent`.
"""

from __future__ import annotations

from outrelay.agent.intercept.capture import (
    DEFAULT_DNS_LISTEN,
    DEFAULT_DNS_SUFFIX,
    DEFAULT_DNS_UPSTREAM,
    DEFAULT_TPROXY_LISTEN,
    InterceptError,
    TproxyConfig,
    TransparentCapture,
    check_platform,
    parse_dns_upstream,
)
from outrelay.agent.intercept.dns import (
    DNS_TTL,
    DnsResponder,
    Forward,
    Reply,
    normalise_suffix,
    pick_upstream,
)
from outrelay.agent.intercept.dns_server import DnsServer, DnsServerStatistics
from outrelay.agent.intercept.tproxy import (
    OriginalDstError,
    TproxyListener,
    TproxyStatistics,
    original_dst,
    parse_sockaddr,
)
from outrelay.agent.intercept.vip import (
    CGNAT_NETWORK,
    VipAllocator,
    VipPoolExhausted,
    VipStatistics,
)

__all__ = [
    "CGNAT_NETWORK",
    "DEFAULT_DNS_LISTEN",
    "DEFAULT_DNS_SUFFIX",
    "DEFAULT_DNS_UPSTREAM",
    "DEFAULT_TPROXY_LISTEN",
    "DNS_TTL",
    "DnsResponder",
    "DnsServer",
    "DnsServerStatistics",
    "Forward",
    "InterceptError",
    "OriginalDstError",
    "Reply",
    "TproxyConfig",
    "TproxyListener",
    "TproxyStatistics",
    "TransparentCapture",
    "VipAllocator",
    "VipPoolExhausted",
    "VipStatistics",
    "check_platform",
    "normalise_suffix",
    "original_dst",
    "parse_dns_upstream",
    "parse_sockaddr",
    "pick_upstream",
]
