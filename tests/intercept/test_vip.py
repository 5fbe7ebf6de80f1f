"""VIP allocator (spec 03 §6.4): order, skips, stability, reverse lookup, exhaustion."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.agent.intercept import CGNAT_NETWORK, VipAllocator, VipPoolExhausted

IP = ipaddress.IPv4Address


def test_first_vips_follow_flag_order() -> None:
    vips = VipAllocator()
    assert vips.allocate("svc-web") == IP("100.64.0.1")
    assert vips.allocate("svc-payments") == IP("100.64.0.2")
    assert vips.allocate("svc-db") == IP("100.64.0.3")
    assert vips.network == CGNAT_NETWORK == ipaddress.IPv4Network("100.64.0.0/10")


def test_same_name_same_vip_and_lookup_never_allocates() -> None:
    vips = VipAllocator()
    assert vips.lookup("svc-web") is None
    assert len(vips) == 0
    first = vips.allocate("svc-web")
    assert vips.allocate("svc-web") == first
    assert vips.lookup("svc-web") == first
    assert len(vips) == 1
    assert vips.statistics().allocated == 1


def test_names_are_case_insensitive_and_reverse_keeps_first_spelling() -> None:
    vips = VipAllocator()
    vip = vips.allocate("Svc-Web")
    assert vips.allocate("svc-web") == vip
    assert vips.lookup("SVC-WEB") == vip
    assert vips.reverse(vip) == "Svc-Web"


def test_reverse_lookup() -> None:
    vips = VipAllocator()
    a = vips.allocate("a")
    b = vips.allocate("b")
    assert vips.reverse(a) == "a"
    assert vips.reverse(b) == "b"
    assert vips.reverse("100.64.0.2") == "b"
    assert vips.reverse(ipaddress.IPv6Address("::ffff:100.64.0.1")) == "a"
    assert vips.reverse(IP("100.64.99.99")) is None
    assert vips.reverse(ipaddress.IPv6Address("2001:db8::1")) is None
    assert vips.reverse("not an address") is None
    assert vips.items() == [("a", a), ("b", b)]


def test_last_octets_0_and_255_are_skipped() -> None:
    vips = VipAllocator()
    got = [vips.allocate(f"s{i}") for i in range(254 + 254 + 1)]
    assert got[253] == IP("100.64.0.254")
    assert got[254] == IP("100.64.1.1")  # 100.64.0.255 and 100.64.1.0 skipped
    assert got[254 + 253] == IP("100.64.1.254")
    assert got[254 + 254] == IP("100.64.2.1")
    assert all(int(v) & 0xFF not in (0, 255) for v in got)


def test_exhaustion_is_a_clear_error_and_allocates_nothing() -> None:
    vips = VipAllocator("10.9.8.0/29")  # candidates .1 … .6 (.7 is the prefix's last)
    got = [vips.allocate(f"s{i}") for i in range(6)]
    assert got == [IP(f"10.9.8.{i}") for i in range(1, 7)]
    with pytest.raises(VipPoolExhausted, match="intercept: VIP pool exhausted"):
        vips.allocate("one-too-many")
    assert vips.lookup("one-too-many") is None
    assert len(vips) == 6
    with pytest.raises(VipPoolExhausted):
        vips.allocate("still-none")
    assert vips.allocate("s3") == IP("10.9.8.4")  # existing names still answer


def test_end_of_the_cgnat_range() -> None:
    # The last /24 of 100.64.0.0/10 behaves like the whole range's tail: the
    # last VIP ever handed out is 100.127.255.254.
    vips = VipAllocator("100.127.255.0/24")
    got = [vips.allocate(f"s{i}") for i in range(254)]
    assert got[0] == IP("100.127.255.1")
    assert got[-1] == IP("100.127.255.254")
    with pytest.raises(VipPoolExhausted):
        vips.allocate("more")


def test_tiny_prefixes_are_exhausted_at_once() -> None:
    for prefix in ("10.0.0.0/31", "10.0.0.1/32"):
        with pytest.raises(VipPoolExhausted):
            VipAllocator(prefix).allocate("x")


def test_ipv6_or_bad_prefixes_are_refused() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        VipAllocator("fd00::/64")
    with pytest.raises(ValueError):
        VipAllocator("100.64.0.1/10")  # host bits set


@given(st.lists(st.text(min_size=1, max_size=20), max_size=60))
def test_property_unique_stable_in_range(names: list[str]) -> None:
    vips = VipAllocator()
    first = {name: vips.allocate(name) for name in names}
    keys = {name.lower() for name in names}
    assert len(set(first.values())) == len(keys) == len(vips)
    for name, vip in first.items():
        assert vip in CGNAT_NETWORK
        assert int(vip) & 0xFF not in (0, 255)
        assert vips.allocate(name) == vip
        assert vips.lookup(name) == vip
        reverse = vips.reverse(vip)
        assert reverse is not None and reverse.lower() == name.lower()
