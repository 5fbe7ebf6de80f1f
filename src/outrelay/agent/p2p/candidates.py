"""Candidates for P2P promotion (spec 03 §7.1–§7.3), pure functions.

Host candidates come from the local interface addresses, filtered and
ranked as the reference does (§7.1). The server-reflexive (srflx) candidate
is what the relay's STUN-lite saw (§7.2); the advertised one comes from
``--p2p-advertise`` (§7.3).

[REC] (§7.5, §11 item 9): the reference gives srflx priority 20, below every
host candidate, so a NATed peer's unreachable private addresses use up the
check budget before the one address that works. We send srflx with
:data:`SRFLX_PRIORITY_REC`, above private and "other" host candidates and
below public host candidates (which are directly reachable). A reference
peer sorts by that same priority field, so it benefits too.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ADVERTISED_PRIORITY",
    "CAPABILITY_KIND",
    "IDENTITY_KIND",
    "PUNCH_MAX",
    "SRFLX_PRIORITY",
    "SRFLX_PRIORITY_REC",
    "Candidate",
    "PeerMarkers",
    "RequestIds",
    "capability_marker",
    "host_candidates",
    "host_priority",
    "identity_marker",
    "local_candidates",
    "order_remote",
    "punch_targets",
    "split_capabilities",
]

ADVERTISED_PRIORITY = 100  # spec 03 §7.3 / §10
SRFLX_PRIORITY = 20  # spec 03 §7.2 / §10 (the reference's)
SRFLX_PRIORITY_REC = 65
"""Ours ([REC] §7.5): above private (30/40) and other (50/60) host
candidates, below global host candidates (70/80)."""
_PRIVATE_V4 = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_PRIVATE_V6 = ipaddress.ip_network("fc00::/7")


@dataclass(frozen=True)
class Candidate:
    """One transport address offered for a direct path (proto ``Candidate``)."""

    kind: str
    """``host`` or ``srflx`` (advertised candidates are ``host`` on the wire)."""
    ip: str
    port: int
    priority: int


def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def host_priority(ip: str) -> int | None:
    """The host-candidate priority of ``ip`` (spec 03 §7.1), or None when it is filtered.

    Filtered: unparseable, loopback, link-local unicast, multicast, unspecified.
    """
    addr = _parse(ip)
    if addr is None or addr.is_loopback or addr.is_link_local or addr.is_multicast:
        return None
    if addr.is_unspecified:
        return None
    v6 = isinstance(addr, ipaddress.IPv6Address)
    private = addr in _PRIVATE_V6 if v6 else any(addr in net for net in _PRIVATE_V4)
    if private:
        return 40 if v6 else 30
    # "Global unicast" in Go's sense: not broadcast; 100.64/10 counts as global.
    if v6 or addr != ipaddress.IPv4Address("255.255.255.255"):
        return 80 if v6 else 70
    return 60 if v6 else 50


def host_candidates(addresses: Iterable[str], port: int) -> list[Candidate]:
    """Interface addresses, in order, as host candidates (filtered, mapped v4 unmapped)."""
    out: list[Candidate] = []
    for raw in addresses:
        priority = host_priority(raw)
        if priority is None:
            continue
        addr = _parse(raw)
        assert addr is not None
        out.append(Candidate("host", str(addr), port, priority))
    return out


def local_candidates(
    hosts: Iterable[Candidate],
    *,
    srflx: tuple[str, int] | None = None,
    advertised: tuple[str, int] | None = None,
    rec: bool = True,
) -> list[Candidate]:
    """The offered list: advertised, srflx, then hosts (spec 03 §7.3).

    With ``rec`` the srflx priority is :data:`SRFLX_PRIORITY_REC` and the list
    is sorted by descending priority (stable), so advertised and srflx come
    before private host candidates.
    """
    out: list[Candidate] = []
    if advertised is not None:
        out.append(Candidate("host", advertised[0], advertised[1] & 0xFFFF, ADVERTISED_PRIORITY))
    if srflx is not None:
        priority = SRFLX_PRIORITY_REC if rec else SRFLX_PRIORITY
        out.append(Candidate("srflx", srflx[0], srflx[1] & 0xFFFF, priority))
    out.extend(hosts)
    if rec:
        out.sort(key=lambda c: -c.priority)
        # One entry per address: srflx often equals a host or the advertised one.
        unique: dict[tuple[str, int], Candidate] = {}
        for c in out:
            unique.setdefault((c.ip, c.port), c)
        out = list(unique.values())
    return out


CAPABILITY_KIND = "outrelay-cap"
"""Kind of the marker entry that carries a capability in CANDIDATE_OFFER/ANSWER.

A reference relay neither reads nor forwards HELLO capabilities (spec 03 §7.7
[REC]), so two of our agents tell each other in-band: an entry whose ``ip`` is
the capability name. A reference peer drops it, because the ip does not parse
(§7.4), and our checks never dial it."""


IDENTITY_KIND = "outrelay-id"
"""Kind of the marker entry whose ``ip`` is the sender's agent URI. The relay
forwards an offer or answer only between the two agents of a pair, so the
initiator learns whom it must reach and checks the certificate of the agent it
dialled against it (spec 03 §7.7 [REC]: a certificate from the same CA is not
enough)."""


def capability_marker(name: str) -> Candidate:
    return Candidate(CAPABILITY_KIND, name, 0, 0)


def identity_marker(uri: str) -> Candidate:
    return Candidate(IDENTITY_KIND, uri, 0, 0)


@dataclass(frozen=True)
class PeerMarkers:
    capabilities: frozenset[str] = frozenset()
    identity: str = ""
    """The peer's agent URI, when it told it ("" from a reference peer)."""


def split_capabilities(candidates: Iterable[Candidate]) -> tuple[list[Candidate], PeerMarkers]:
    """(the real candidates, what the peer's marker entries announced)."""
    real: list[Candidate] = []
    caps: set[str] = set()
    identity = ""
    for c in candidates:
        if c.kind == CAPABILITY_KIND:
            caps.add(c.ip)
        elif c.kind == IDENTITY_KIND:
            identity = c.ip
        else:
            real.append(c)
    return real, PeerMarkers(frozenset(caps), identity)


PUNCH_MAX = 8
"""Ours: at most this many punches per offer. The spec punches every offered
candidate; a peer could otherwise aim our socket at thousands of addresses."""


def punch_targets(candidates: Iterable[Candidate], limit: int = PUNCH_MAX) -> list[tuple[str, int]]:
    """Where the responder sends its warm-up byte (spec 03 §7.6), highest priority first.

    Skipped: an empty or unparseable ip, port 0 or above 65535; duplicates once;
    at most ``limit`` targets.
    """
    out: dict[tuple[str, int], None] = {}
    for c in sorted(candidates, key=lambda c: -c.priority):
        if len(out) >= limit:
            break
        if not c.ip or not 0 < c.port <= 0xFFFF:
            continue
        addr = _parse(c.ip)
        if addr is not None:
            out[(str(addr), c.port)] = None
    return list(out)


def order_remote(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Remote candidates to check: parseable ips, ports cut to 16 bits, by
    descending priority (stable: equal priorities keep the offered order, §7.4)."""
    usable = [
        Candidate(c.kind, str(addr), c.port & 0xFFFF, c.priority)
        for c in candidates
        if (addr := _parse(c.ip)) is not None
    ]
    return sorted(usable, key=lambda c: -c.priority)


class RequestIds:
    """OBSERVED_ADDR_QUERY request ids (spec 03 §7.2): 1, 2, …; on wrap a random odd value."""

    def __init__(self, start: int = 1, rng: random.Random | None = None) -> None:
        self._next = start
        self._rng = rng or random.Random()

    def next(self) -> int:
        value = self._next
        if value == 0:
            value = self._rng.randrange(1, 1 << 64, 2)
        self._next = (value + 1) & 0xFFFFFFFFFFFFFFFF
        return value
