"""Candidate filters and priorities (spec 03 §7.1–§7.3); the check schedule (§7.4, §7.5)."""

from __future__ import annotations

import random

import pytest

from outrelay.agent.p2p import (
    Candidate,
    CheckOutcome,
    CheckPlan,
    RequestIds,
    host_candidates,
    host_priority,
    local_candidates,
    order_remote,
)
from outrelay.agent.p2p.candidates import (
    CAPABILITY_KIND,
    capability_marker,
    identity_marker,
    punch_targets,
    split_capabilities,
)
from outrelay.agent.p2p.interfaces import interface_addresses, parse_if_inet6


@pytest.mark.parametrize(
    ("ip", "priority"),
    [
        ("10.1.2.3", 30),
        ("172.16.0.1", 30),
        ("172.31.255.254", 30),
        ("192.168.1.1", 30),
        ("fd00::1", 40),
        ("8.8.8.8", 70),
        ("100.64.0.1", 70),  # CGNAT counts as global (§7.1)
        ("172.32.0.1", 70),
        ("2001:db8::1", 80),
        ("255.255.255.255", 50),
        ("::ffff:10.0.0.1", 30),  # mapped v4 is unmapped first
        ("127.0.0.1", None),
        ("::1", None),
        ("169.254.1.1", None),
        ("fe80::1", None),
        ("224.0.0.1", None),
        ("ff02::1", None),
        ("0.0.0.0", None),
        ("::", None),
        ("not-an-ip", None),
    ],
)
def test_host_priority(ip: str, priority: int | None) -> None:
    assert host_priority(ip) == priority


def test_host_candidates_keep_interface_order_and_unmap() -> None:
    got = host_candidates(["127.0.0.1", "::ffff:192.168.1.5", "fe80::1", "8.8.4.4"], 4500)
    assert got == [
        Candidate("host", "192.168.1.5", 4500, 30),
        Candidate("host", "8.8.4.4", 4500, 70),
    ]


def test_local_list_reference_order() -> None:
    hosts = host_candidates(["192.168.1.5"], 4500)
    got = local_candidates(
        hosts, srflx=("203.0.113.9", 70000), advertised=("198.51.100.1", 4500), rec=False
    )
    assert [(c.kind, c.ip, c.port, c.priority) for c in got] == [
        ("host", "198.51.100.1", 4500, 100),
        ("srflx", "203.0.113.9", 70000 & 0xFFFF, 20),
        ("host", "192.168.1.5", 4500, 30),
    ]
    # The reference peer sorts by priority: srflx ends up last (the defect).
    assert order_remote(got)[-1].kind == "srflx"


def test_local_list_rec_order_puts_srflx_before_private_hosts() -> None:
    hosts = host_candidates(["192.168.1.5", "fd00::5", "8.8.4.4"], 4500)
    got = local_candidates(hosts, srflx=("203.0.113.9", 5000), advertised=("198.51.100.1", 4500))
    assert [c.ip for c in got] == [
        "198.51.100.1",
        "8.8.4.4",
        "203.0.113.9",
        "fd00::5",
        "192.168.1.5",
    ]
    assert [c.ip for c in order_remote(got)] == [c.ip for c in got]


def test_order_remote_is_stable_drops_bad_ips_and_cuts_ports() -> None:
    offered = [
        Candidate("host", "10.0.0.1", 1, 30),
        Candidate("host", "bogus", 2, 99),
        Candidate("host", "10.0.0.2", 3, 30),
        Candidate("srflx", "203.0.113.1", 65536 + 7, 20),
        Candidate("host", "8.8.8.8", 0, 70),  # port 0 is not filtered (§7.4)
    ]
    got = order_remote(offered)
    assert [(c.ip, c.port) for c in got] == [
        ("8.8.8.8", 0),
        ("10.0.0.1", 1),
        ("10.0.0.2", 3),
        ("203.0.113.1", 7),
    ]


def test_request_ids_start_at_one_and_wrap_to_random_odd() -> None:
    ids = RequestIds()
    assert [ids.next() for _ in range(3)] == [1, 2, 3]
    wrapped = RequestIds(start=(1 << 64) - 1, rng=random.Random(1))
    assert wrapped.next() == (1 << 64) - 1
    value = wrapped.next()
    assert value % 2 == 1 and value != 0


A = Candidate("host", "198.51.100.1", 1, 100)
B = Candidate("srflx", "203.0.113.1", 2, 65)
C = Candidate("host", "10.0.0.1", 3, 30)


def test_checks_start_staggered_in_priority_order() -> None:
    plan = CheckPlan([C, B, A])
    plan.start(0.0)
    assert plan.poll(0.0) == [A]
    assert plan.next_deadline() == pytest.approx(0.1)
    assert plan.poll(0.05) == []
    assert plan.poll(0.1) == [B]
    assert plan.poll(0.25) == [C]
    assert plan.pending() == [A, B, C]


def test_first_success_wins_and_records_rtt() -> None:
    plan = CheckPlan([A, B, C])
    plan.start(0.0)
    plan.poll(0.0)
    plan.poll(0.1)
    plan.failed(A, 0.12)
    assert plan.succeeded(B, 0.15)
    assert plan.outcome is CheckOutcome.SUCCEEDED and plan.winner == B
    assert plan.rtt == pytest.approx(0.05)
    assert not plan.succeeded(A, 0.2)  # too late, decided
    assert plan.poll(0.3) == []  # C never started
    assert plan.next_deadline() is None


def test_per_pair_timeout_then_no_pair() -> None:
    plan = CheckPlan([A, B], pair_timeout=0.5)
    plan.start(0.0)
    plan.poll(0.0)
    plan.poll(0.1)
    assert plan.next_deadline() == pytest.approx(0.5)
    plan.poll(0.5)  # A timed out
    assert plan.pending() == [B]
    assert not plan.succeeded(A, 0.55)  # a late handshake does not win
    plan.poll(0.6)
    assert plan.outcome is CheckOutcome.NO_PAIR


def test_budget_expiry() -> None:
    plan = CheckPlan([A], pair_timeout=10.0, budget=5.0)
    plan.start(0.0)
    plan.poll(0.0)
    assert plan.next_deadline() == pytest.approx(5.0)
    plan.poll(5.0)
    assert plan.outcome is CheckOutcome.BUDGET_EXPIRED


def test_empty_answer_is_no_pair_at_once_and_nonpositive_timeout_ignored() -> None:
    plan = CheckPlan([])
    plan.start(0.0)
    assert plan.outcome is CheckOutcome.NO_PAIR
    plan = CheckPlan([A], pair_timeout=0)
    plan.start(0.0)
    assert plan.pair_timeout == 2.0


# -- capability markers, punch targets, de-duplication, interfaces ------------------------


def test_capability_marker_round_trip_and_never_dialled() -> None:
    marker = capability_marker("p2p-resume-v2")
    assert marker.kind == CAPABILITY_KIND
    offered = [Candidate("srflx", "203.0.113.7", 4000, 65), marker]
    real, markers = split_capabilities(
        [*offered, identity_marker("outrelay://acme/agent/1f0e6c8e-0000-4000-8000-000000000001")]
    )
    assert real == offered[:1]
    assert markers.capabilities == {"p2p-resume-v2"}
    assert markers.identity == "outrelay://acme/agent/1f0e6c8e-0000-4000-8000-000000000001"
    assert split_capabilities(offered[:1])[1].identity == ""  # a reference peer tells nothing
    # A peer that does not know the marker (the reference) drops it: the ip does not parse.
    assert order_remote(offered) == offered[:1]


def test_punch_targets_follow_the_spec_filters() -> None:
    offered = [
        Candidate("host", "", 5000, 30),  # empty ip
        Candidate("host", "10.0.0.1", 0, 30),  # port 0
        Candidate("host", "10.0.0.1", 70000, 30),  # above 65535
        Candidate("host", "not-an-ip", 5000, 30),
        capability_marker("p2p-resume-v2"),
        Candidate("srflx", "203.0.113.7", 4000, 65),
        Candidate("host", "::ffff:10.0.0.2", 4001, 30),  # mapped v4 is unmapped
        Candidate("host", "203.0.113.7", 4000, 100),  # the same address twice: once
    ]
    assert punch_targets(offered) == [("203.0.113.7", 4000), ("10.0.0.2", 4001)]
    many = [Candidate("host", f"10.0.{i // 250}.{i % 250 + 1}", 5000, 30) for i in range(2000)]
    assert len(punch_targets(many)) == 8


def test_local_candidates_keep_one_entry_per_address_highest_priority_first() -> None:
    hosts = host_candidates(["192.168.1.5", "198.51.100.9"], 7000)
    got = local_candidates(hosts, srflx=("198.51.100.9", 7000), advertised=("203.0.113.1", 7000))
    assert [(c.kind, c.ip, c.priority) for c in got] == [
        ("host", "203.0.113.1", 100),
        ("host", "198.51.100.9", 70),  # the public host candidate beats the equal srflx
        ("host", "192.168.1.5", 30),
    ]


def test_srflx_comes_before_private_hosts() -> None:
    hosts = host_candidates(["10.1.0.2", "fd00::2"], 7000)
    got = local_candidates(hosts, srflx=("198.51.100.20", 61000))
    assert got[0] == Candidate("srflx", "198.51.100.20", 61000, 65)


def test_parse_if_inet6() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "garbage\n"
        "20010db8000000000000000000000002 03 40 00 00     eth1\n"
    )
    assert parse_if_inet6(text) == ["::1", "fe80::1", "2001:db8::2"]


def test_interface_addresses_include_loopback() -> None:
    # Every Linux host (and namespace with lo up) has 127.0.0.1; host_candidates filters it.
    addresses = interface_addresses()
    assert addresses == list(dict.fromkeys(addresses))
    assert "127.0.0.1" in addresses or not addresses
