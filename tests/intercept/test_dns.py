"""DNS answers, sans-IO (spec 03 §6.5 with the [REC]s of §11 item 8).

Every reply is parsed back with dnspython. The garbage tests hold
:meth:`DnsResponder.answer` to its promise: bytes or ``None``, never an
exception.
"""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outrelay.agent.intercept import (
    DNS_TTL,
    DnsResponder,
    Forward,
    Reply,
    VipAllocator,
    normalise_suffix,
    pick_upstream,
)


@pytest.fixture
def vips() -> VipAllocator:
    v = VipAllocator()
    v.allocate("svc-web")
    v.allocate("svc-payments")
    v.allocate("a.b")
    return v


@pytest.fixture
def responder(vips: VipAllocator) -> DnsResponder:
    return DnsResponder(vips.lookup, "outrelay")


def query(name: str, rdtype: str = "A", **kw: object) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kw)


def ask(responder: DnsResponder, q: dns.message.Message) -> dns.message.Message:
    wire = responder.answer(q.to_wire())
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == q.id
    assert reply.flags & dns.flags.QR
    return reply


# -- A ------------------------------------------------------------------------------------


def test_a_for_a_consumed_service(responder: DnsResponder) -> None:
    q = query("svc-web.outrelay.")
    r = ask(responder, q)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    assert r.flags & dns.flags.RD  # copied
    assert not r.flags & dns.flags.RA  # no upstream: no recursion
    assert r.opcode() == dns.opcode.QUERY
    assert len(r.question) == 1 and r.question[0].name == q.question[0].name
    assert len(r.answer) == 1
    rrset = r.answer[0]
    assert rrset.rdtype == dns.rdatatype.A and rrset.rdclass == dns.rdataclass.IN
    assert rrset.ttl == DNS_TTL == 60
    assert [rd.address for rd in rrset] == ["100.64.0.1"]
    assert not r.authority and not r.additional


def test_second_service_gets_its_own_vip(responder: DnsResponder) -> None:
    r = ask(responder, query("svc-payments.outrelay"))
    assert [rd.address for rd in r.answer[0]] == ["100.64.0.2"]


def test_rd_is_copied_not_invented(responder: DnsResponder) -> None:
    q = query("svc-web.outrelay")
    q.flags &= ~dns.flags.RD
    assert not ask(responder, q).flags & dns.flags.RD


def test_names_are_case_insensitive_and_case_is_preserved(responder: DnsResponder) -> None:
    q = query("SVC-Web.OutRelay.")
    r = ask(responder, q)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rd.address for rd in r.answer[0]] == ["100.64.0.1"]
    assert r.question[0].name.labels == (b"SVC-Web", b"OutRelay", b"")
    assert r.answer[0].name.labels == (b"SVC-Web", b"OutRelay", b"")


def test_upper_case_consumed_name_resolves() -> None:
    vips = VipAllocator()
    vips.allocate("Svc-Web")  # the reference never resolves this one
    r = ask(DnsResponder(vips.lookup), query("svc-web.outrelay"))
    assert [rd.address for rd in r.answer[0]] == ["100.64.0.1"]


def test_multi_label_remainder_is_looked_up_as_is(responder: DnsResponder) -> None:
    assert ask(responder, query("a.b.outrelay")).rcode() == dns.rcode.NOERROR
    assert ask(responder, query("b.outrelay")).rcode() == dns.rcode.NXDOMAIN


def test_unknown_service_is_nxdomain(responder: DnsResponder) -> None:
    r = ask(responder, query("svc-nope.outrelay"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.flags & dns.flags.AA
    assert not r.answer


def test_bare_suffix_and_bare_service_are_nxdomain(responder: DnsResponder) -> None:
    assert ask(responder, query("outrelay.")).rcode() == dns.rcode.NXDOMAIN
    # With the default suffix a bare service name is outside the zone.
    assert ask(responder, query("svc-web.")).rcode() == dns.rcode.REFUSED


# -- AAAA and other types ------------------------------------------------------------------


def test_aaaa_for_a_known_service_is_nodata(responder: DnsResponder) -> None:
    r = ask(responder, query("svc-web.outrelay", "AAAA"))
    assert r.rcode() == dns.rcode.NOERROR  # the reference says NXDOMAIN (breaks musl)
    assert not r.answer
    assert r.question[0].rdtype == dns.rdatatype.AAAA


def test_aaaa_for_an_unknown_service_is_nxdomain(responder: DnsResponder) -> None:
    assert ask(responder, query("svc-nope.outrelay", "AAAA")).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "HTTPS", "SVCB", "PTR", "SRV", "CNAME", "ANY"])
def test_other_types_known_nodata_unknown_nxdomain(responder: DnsResponder, rdtype: str) -> None:
    known = ask(responder, query("svc-web.outrelay", rdtype))
    assert known.rcode() == dns.rcode.NOERROR and not known.answer
    unknown = ask(responder, query("svc-nope.outrelay", rdtype))
    assert unknown.rcode() == dns.rcode.NXDOMAIN


def test_unknown_numeric_type(responder: DnsResponder) -> None:
    r = ask(responder, query("svc-web.outrelay", "TYPE65280"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_non_in_class_is_refused(responder: DnsResponder) -> None:
    q = dns.message.make_query("svc-web.outrelay", "A", rdclass="CH")
    assert ask(responder, q).rcode() == dns.rcode.REFUSED


# -- outside the suffix ------------------------------------------------------------------


def test_outside_the_suffix_is_refused_without_upstream(responder: DnsResponder) -> None:
    for name, rdtype in [("example.com", "A"), ("example.com", "AAAA"), ("svc-web.", "MX")]:
        r = ask(responder, query(name, rdtype))
        assert r.rcode() == dns.rcode.REFUSED
        assert not r.answer


def test_outside_the_suffix_is_forwarded_with_upstream(vips: VipAllocator) -> None:
    fwd = DnsResponder(vips.lookup, forwarding=True)
    q = query("example.com", "AAAA")
    wire = q.to_wire()
    result = fwd.route(wire)
    assert isinstance(result, Forward)
    assert result.query == wire
    fallback = dns.message.from_wire(result.fallback)
    assert fallback.id == q.id and fallback.rcode() == dns.rcode.SERVFAIL
    assert fallback.question[0].name == q.question[0].name
    # answer() never forwards
    assert dns.message.from_wire(fwd.answer(wire) or b"").rcode() == dns.rcode.REFUSED
    # our own names are still answered locally, with RA set
    local = fwd.route(query("svc-web.outrelay").to_wire())
    assert isinstance(local, Reply)
    reply = dns.message.from_wire(local.wire)
    assert reply.flags & dns.flags.RA
    assert reply.answer


def test_empty_suffix_bare_names() -> None:
    vips = VipAllocator()
    vips.allocate("svc-web")
    bare = DnsResponder(vips.lookup, "")
    assert bare.suffix == ""
    r = ask(bare, query("svc-web."))
    assert [rd.address for rd in r.answer[0]] == ["100.64.0.1"]
    assert ask(bare, query("svc-web.outrelay")).rcode() == dns.rcode.NXDOMAIN
    assert ask(bare, query("example.com")).rcode() == dns.rcode.NXDOMAIN
    forwarding = DnsResponder(vips.lookup, "", forwarding=True)
    assert isinstance(forwarding.route(query("example.com").to_wire()), Forward)
    assert isinstance(forwarding.route(query("svc-web").to_wire()), Reply)


@pytest.mark.parametrize(
    ("flag", "want"),
    [
        ("outrelay", ".outrelay"),
        (".outrelay", ".outrelay"),
        (" OutRelay ", ".outrelay"),
        ("outrelay.", ".outrelay"),  # the reference would match nothing
        ("svc.cluster.local", ".svc.cluster.local"),
        ("", ""),
        ("  ", ""),
    ],
)
def test_normalise_suffix(flag: str, want: str) -> None:
    assert normalise_suffix(flag) == want


def test_custom_suffix(vips: VipAllocator) -> None:
    r = DnsResponder(vips.lookup, "mesh.internal.")
    assert ask(r, query("svc-web.mesh.internal")).answer
    assert ask(r, query("svc-web.outrelay")).rcode() == dns.rcode.REFUSED
    assert ask(r, query("svc-web.xmesh.internal")).rcode() == dns.rcode.REFUSED


# -- malformed and odd packets --------------------------------------------------------------


def header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, 0, 0)


def test_short_packets_are_dropped(responder: DnsResponder) -> None:
    for n in range(12):
        assert responder.answer(b"\x00" * n) is None


def test_responses_are_dropped(responder: DnsResponder) -> None:
    wire = bytearray(query("svc-web.outrelay").to_wire())
    wire[2] |= 0x80
    assert responder.answer(bytes(wire)) is None


def _header_reply(wire: bytes | None) -> tuple[int, int, int]:
    assert wire is not None and len(wire) == 12
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", wire)
    assert (qd, an, ns, ar) == (0, 0, 0, 0)
    assert flags & 0x8000
    return qid, (flags >> 11) & 0xF, flags & 0xF


def test_no_question_is_formerr(responder: DnsResponder) -> None:
    assert _header_reply(responder.answer(header(qd=0))) == (0x1234, 0, dns.rcode.FORMERR)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # QDCOUNT=1 but nothing follows
        b"\x07svc-web",  # name not terminated
        b"\x07svc-web\x08outrelay\x00\x00",  # QTYPE cut short
        b"\xc0\x0c\x00\x01\x00\x01",  # pointer to itself
        b"\xc0\xff\x00\x01\x00\x01",  # pointer past the end
        b"\x80abc\x00\x00\x01\x00\x01",  # reserved label type
        b"\x3f" + b"a" * 63 + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",  # > 255
    ],
)
def test_unparsable_question_is_formerr(responder: DnsResponder, body: bytes) -> None:
    assert _header_reply(responder.answer(header() + body)) == (0x1234, 0, dns.rcode.FORMERR)


def test_other_opcodes_are_notimp(responder: DnsResponder) -> None:
    q = query("svc-web.outrelay")
    q.set_opcode(dns.opcode.NOTIFY)
    assert _header_reply(responder.answer(q.to_wire()))[1:] == (
        dns.opcode.NOTIFY,
        dns.rcode.NOTIMP,
    )


def test_only_the_first_question_counts_and_trailing_sections_are_ignored(
    responder: DnsResponder,
) -> None:
    wire = query("svc-web.outrelay", use_edns=0).to_wire()
    assert dns.message.from_wire(responder.answer(wire) or b"").answer
    # QDCOUNT=2 with garbage after the first question: still answered
    first = query("svc-web.outrelay").to_wire()
    odd = first[:4] + b"\x00\x02" + first[6:] + b"\xff\xff\xff"
    reply = responder.answer(odd)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert [rd.address for rd in parsed.answer[0]] == ["100.64.0.1"]


def test_reply_summary_for_logs(responder: DnsResponder) -> None:
    result = responder.route(query("svc-web.outrelay").to_wire())
    assert isinstance(result, Reply)
    assert (result.qname, result.qtype, result.rcode) == ("svc-web.outrelay.", "A", 0)


# -- garbage never crashes -----------------------------------------------------------------

VALID = [
    query("svc-web.outrelay").to_wire(),
    query("svc-web.outrelay", "AAAA", use_edns=0).to_wire(),
    query("example.com", "MX").to_wire(),
]


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
@example(b"")
@example(header())
@example(header(flags=0xFFFF))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for forwarding in (False, True):
        responder = DnsResponder(
            lambda name: ipaddress.IPv4Address("100.64.0.1"), forwarding=forwarding
        )
        result = responder.route(data)
        assert result is None or isinstance(result, Reply | Forward)
        answer = responder.answer(data)
        assert answer is None or isinstance(answer, bytes)
        if answer is not None:
            assert answer[:2] == data[:2]  # the ID is always copied
            assert len(answer) <= 512
            dns.message.from_wire(answer)  # and the reply is well-formed


@settings(max_examples=1000)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=8),
    st.integers(0, 600),
)
def test_mutated_queries_never_raise(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    mutated = bytes(data[: max(cut, 0)] if cut < len(data) else data)
    responder = DnsResponder(VipAllocator().lookup, forwarding=True)
    result = responder.route(mutated)
    assert result is None or isinstance(result, Reply | Forward)
    if isinstance(result, Reply):
        dns.message.from_wire(result.wire)


@given(
    st.lists(
        st.text(
            alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
            min_size=1,
            max_size=30,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_consumed_name_resolves_in_any_case(names: list[str]) -> None:
    vips = VipAllocator()
    for name in names:
        vips.allocate(name)
    responder = DnsResponder(vips.lookup)
    for name in names:
        for spelled in (name, name.upper(), name.lower()):
            r = ask(responder, query(f"{spelled}.outrelay"))
            assert [rd.address for rd in r.answer[0]] == [str(vips.lookup(name))]


# -- resolv.conf ------------------------------------------------------------------------------


def test_pick_upstream_skips_the_agent_itself() -> None:
    text = "# generated\nsearch outrelay\nnameserver 127.0.0.1\nnameserver 10.0.0.10\n"
    assert pick_upstream(text, ("127.0.0.1", 53)) == ("10.0.0.10", 53)
    assert pick_upstream(text, ("127.0.0.1", 5353)) == ("127.0.0.1", 53)  # not us: port differs
    assert pick_upstream(text, None) == ("127.0.0.1", 53)
    assert pick_upstream(text, ("0.0.0.0", 53)) == ("10.0.0.10", 53)
    assert pick_upstream("nameserver 127.0.0.1\n", ("127.0.0.1", 53)) is None
    assert pick_upstream("", ("127.0.0.1", 53)) is None


def test_pick_upstream_parsing() -> None:
    text = "nameserver bogus\n; nameserver 9.9.9.9\nnameserver   fe80::1%eth0  # link-local\n"
    assert pick_upstream(text, ("127.0.0.1", 53)) == ("fe80::1%eth0", 53)
    assert pick_upstream("nameserver 127.0.0.53\n", ("127.0.0.1", 53)) == ("127.0.0.53", 53)
    assert pick_upstream("nameserver ::1\n", ("::", 53)) is None
