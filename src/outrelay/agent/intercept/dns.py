"""DNS answers for consumed services (spec 03 §6.5). Sans-IO: bytes in, bytes out.

Theory of operation. :class:`DnsResponder` turns one query datagram into one
of three outcomes, and does no I/O:

* a reply to send back (:class:`Reply`, or just its bytes from :meth:`answer`);
* a query to forward to the upstream resolver (:class:`Forward`), only when
  the shell has an upstream and the name is outside our suffix;
* ``None``: drop the datagram, send nothing.

The shell (:mod:`.dns_server`) owns the UDP socket, the upstream sockets,
timeouts and the concurrency bound.

What is parsed. Like the reference, only the 12-byte header and the **first**
question are read (``dns.name.from_wire`` for the name, which follows and
checks compression pointers); additional questions, answer, authority and
additional sections (EDNS) are ignored, so an odd OPT record cannot make us
fail a query the reference would answer.

Decisions, with the reference's behaviour and our [REC] changes (spec 03
§6.5, §11 item 8):

======================================  ==========================  ==============================
query                                   reference                   here
======================================  ==========================  ==============================
shorter than a header                   dropped                     dropped
QR=1 (it is a response)                 answered                    dropped: never answer answers,
                                                                    so two servers cannot loop
opcode other than QUERY                 answered as a QUERY         NOTIMP, header only
no question / question unparsable       dropped                     FORMERR, header only (the
                                                                    client fails fast instead of
                                                                    timing out)
A ``<svc>.<suffix>``, consumed          NOERROR, A = VIP, TTL 60    same, AA=1
A ``<x>.<suffix>``, not consumed        NXDOMAIN                    NXDOMAIN, AA=1
AAAA (any name)                         NXDOMAIN                    known name: NOERROR, no answer
                                                                    (NODATA; musl treats NXDOMAIN
                                                                    in either of its parallel A/AAAA
                                                                    answers as "no such name");
                                                                    unknown: NXDOMAIN
other types (MX, TXT, HTTPS, ...)       NOTIMP                      as AAAA (NOTIMP is an opcode
                                                                    error, not a type error)
QCLASS other than IN/ANY in the suffix  not checked                 REFUSED
name outside the suffix                 NXDOMAIN (A, AAAA) or       forwarded upstream when one is
                                        NOTIMP                      configured, else REFUSED
======================================  ==========================  ==============================

Names are compared case-insensitively (ASCII case folding, as DNS does) with
one trailing dot stripped; the question in the reply keeps the client's case.
Replies copy ID and RD, set QR and AA, set RA only when forwarding is on,
carry the one question and no authority/additional records, and use name
compression. There is no SOA in negative answers, so resolvers do not cache
them (RFC 2308 §5); a service consumed a moment later resolves at once.

Suffix normalisation (:func:`normalise_suffix`): trimmed, lower-cased, a
leading dot added. Unlike the reference, a trailing dot is removed as well,
so ``--dns-suffix outrelay.`` means ``outrelay`` (the reference matches
nothing with it). An empty suffix makes bare names (``svc-web``) resolve;
with an upstream, names that are not consumed services are then forwarded.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = [
    "DNS_TTL",
    "DnsResponder",
    "Forward",
    "Reply",
    "normalise_suffix",
    "pick_upstream",
]

DNS_TTL = 60
"""TTL of every A answer, as the reference (spec 03 §10). VIPs never change
while the agent runs; a short TTL bounds staleness across agent restarts."""

HEADER = struct.Struct("!HHHHHH")
"""ID, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT (RFC 1035 §4.1.1)."""

_QR = 0x8000
_OPCODE_SHIFT = 11
_OPCODE_MASK = 0xF
_RD = 0x0100

_ANSWERED_CLASSES = frozenset({dns.rdataclass.IN, dns.rdataclass.ANY})

Lookup = Callable[[str], ipaddress.IPv4Address | None]


@dataclass(frozen=True)
class Reply:
    """Send ``wire`` back to the client."""

    wire: bytes
    rcode: int
    qname: str
    """The question name as text (``""`` for header-only replies), for logs."""
    qtype: str


@dataclass(frozen=True)
class Forward:
    """Send ``query`` to the upstream resolver and relay its answer.

    If the upstream does not answer in time (or cannot be reached), send
    ``fallback``, a SERVFAIL for the same question.
    """

    query: bytes
    fallback: bytes
    qname: str
    qtype: str


def normalise_suffix(value: str) -> str:
    """``outrelay`` -> ``.outrelay``; ``" OutRelay. "`` -> ``.outrelay``; ``""`` -> ``""``."""
    text = value.strip().lower().rstrip(".")
    if not text:
        return ""
    return text if text.startswith(".") else "." + text


def pick_upstream(resolv_conf: str, own: tuple[str, int] | None = None) -> tuple[str, int] | None:
    """The first ``nameserver`` of a resolv.conf text that is not the agent itself.

    Args:
        resolv_conf: the file's text.
        own: the address the agent's DNS server listens on. A nameserver is
            "the agent itself" when ``own`` is on port 53 (resolv.conf has no
            ports) and the addresses are equal, or ``own`` is a wildcard
            (``0.0.0.0``/``::``) and the nameserver is a loopback address.

    Returns:
        ``(ip, 53)`` or ``None`` when there is no other nameserver.
    """
    own_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if own is not None and own[1] == 53:
        try:
            own_ip = ipaddress.ip_address(own[0])
        except ValueError:
            own_ip = None
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        text = words[1]
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if own_ip is not None:
            if ip == own_ip:
                continue
            if own_ip.is_unspecified and ip.is_loopback:
                continue
        return text, 53
    return None


class DnsResponder:
    """Answers queries for ``<svc><suffix>`` from a name -> VIP lookup.

    Args:
        lookup: forward lookup, case-insensitive (``VipAllocator.lookup``).
            Never allocates.
        suffix: the ``--dns-suffix`` value (normalised here).
        forwarding: an upstream resolver exists; names outside the suffix
            yield :class:`Forward` from :meth:`route` instead of REFUSED.
    """

    def __init__(self, lookup: Lookup, suffix: str = "outrelay", *, forwarding: bool = False):
        self._lookup = lookup
        self.suffix = normalise_suffix(suffix)
        self._suffix_wire = self.suffix.encode("utf-8")
        self.forwarding = forwarding

    # -- public entry points ------------------------------------------------------------

    def answer(self, query: bytes) -> bytes | None:
        """The reply to send for ``query``, or ``None`` to drop it.

        Never forwards: a name outside the suffix gets REFUSED. Never raises
        on any input (a hypothesis test holds it to that).
        """
        result = self._decide(query, forwarding=False)
        return result.wire if isinstance(result, Reply) else None

    def route(self, query: bytes) -> Reply | Forward | None:
        """Like :meth:`answer`, but names outside the suffix are :class:`Forward`
        when ``forwarding`` is on. Never raises on any input."""
        return self._decide(query, forwarding=self.forwarding)

    # -- the decision ---------------------------------------------------------------------

    def _decide(self, query: bytes, *, forwarding: bool) -> Reply | Forward | None:
        if len(query) < HEADER.size:
            return None
        qid, flags, qdcount, _, _, _ = HEADER.unpack_from(query)
        if flags & _QR:
            return None
        opcode = (flags >> _OPCODE_SHIFT) & _OPCODE_MASK
        if opcode != dns.opcode.QUERY:
            return self._header_only(qid, flags, dns.rcode.NOTIMP)
        if qdcount == 0:
            return self._header_only(qid, flags, dns.rcode.FORMERR)
        try:
            qname, used = dns.name.from_wire(query, HEADER.size)
            qtype, qclass = struct.unpack_from("!HH", query, HEADER.size + used)
        except (dns.exception.DNSException, struct.error):
            return self._header_only(qid, flags, dns.rcode.FORMERR)

        labels = [label.lower() for label in qname.labels if label]
        text = b".".join(labels)
        suffix = self._suffix_wire
        if suffix:
            in_zone = text == suffix[1:] or text.endswith(suffix)
            remainder = text[: -len(suffix)] if text.endswith(suffix) else b""
        else:
            in_zone = True
            remainder = text
        vip = self._find(remainder) if in_zone else None
        if not suffix and vip is None and forwarding:
            in_zone = False  # empty suffix: only consumed names are ours

        if not in_zone:
            if forwarding:
                servfail = self._reply(qid, flags, qname, qtype, qclass, dns.rcode.SERVFAIL)
                return Forward(
                    query=query,
                    fallback=servfail.wire,
                    qname=servfail.qname,
                    qtype=servfail.qtype,
                )
            return self._reply(qid, flags, qname, qtype, qclass, dns.rcode.REFUSED)
        if qclass not in _ANSWERED_CLASSES:
            return self._reply(qid, flags, qname, qtype, qclass, dns.rcode.REFUSED)
        if vip is None:
            return self._reply(qid, flags, qname, qtype, qclass, dns.rcode.NXDOMAIN)
        if qtype == dns.rdatatype.A:
            return self._reply(qid, flags, qname, qtype, qclass, dns.rcode.NOERROR, vip)
        return self._reply(qid, flags, qname, qtype, qclass, dns.rcode.NOERROR)  # NODATA

    def _find(self, remainder: bytes) -> ipaddress.IPv4Address | None:
        if not remainder:
            return None
        try:
            name = remainder.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return self._lookup(name)

    # -- building replies ---------------------------------------------------------------

    def _flags(self, query_flags: int) -> int:
        flags = dns.flags.QR | dns.flags.AA | (query_flags & _RD)
        if self.forwarding:
            flags |= dns.flags.RA
        return int(flags)

    def _header_only(self, qid: int, query_flags: int, rcode: dns.rcode.Rcode) -> Reply:
        opcode = (query_flags >> _OPCODE_SHIFT) & _OPCODE_MASK
        flags = self._flags(query_flags) | (opcode << _OPCODE_SHIFT) | int(rcode)
        return Reply(HEADER.pack(qid, flags, 0, 0, 0, 0), int(rcode), "", "")

    def _reply(
        self,
        qid: int,
        query_flags: int,
        qname: dns.name.Name,
        qtype: int,
        qclass: int,
        rcode: dns.rcode.Rcode,
        vip: ipaddress.IPv4Address | None = None,
    ) -> Reply:
        msg = dns.message.Message(id=qid)
        msg.flags = self._flags(query_flags)
        msg.set_rcode(rcode)
        rdtype = dns.rdatatype.RdataType.make(qtype)
        rdclass = dns.rdataclass.RdataClass.make(qclass)
        msg.find_rrset(msg.question, qname, rdclass, rdtype, create=True, force_unique=True)
        if vip is not None:
            msg.answer.append(
                dns.rrset.from_text(qname, DNS_TTL, dns.rdataclass.IN, dns.rdatatype.A, str(vip))
            )
        # A single question with at most one A record: always well under 512 bytes
        # (a 255-byte name, a 2-byte compressed owner, 14 bytes of record).
        wire = msg.to_wire()
        return Reply(wire, int(rcode), qname.to_text(), dns.rdatatype.to_text(rdtype))
