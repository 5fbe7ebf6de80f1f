"""Tests for outrelay.relay.open_flow: the pure OPEN_STREAM decision (spec 02 §6.1, §6.2.4),
and the relay's statistics around a live pair."""

from __future__ import annotations

import pytest

from outrelay.orp import RejectCode
from outrelay.relay.open_flow import (
    AdmitOpen,
    OpenRequest,
    RejectOpen,
    decide_open,
)
from outrelay.relay.policy import Decision, P2PMode, PolicyResult, RelayMode

from .rawagent import MIGRATE_TO_P2P, Pki, frame, live_pair, pb_int, running_relay

CONSUMER = "outrelay://acme/agent/c"
PROVIDER = "outrelay://acme/agent/p"
REQUEST = OpenRequest(CONSUMER, "acme", "web", "GET /")

ALLOW = PolicyResult(Decision.ALLOW, "ok")


class Calls:
    """A policy stand-in that records its calls and answers from a table keyed by side."""

    def __init__(self, **results: PolicyResult | None) -> None:
        self.results = results
        self.calls: list[tuple[str, str, str, str]] = []

    def __call__(self, caller: str, target: str, method: str, side: str) -> PolicyResult | None:
        self.calls.append((caller, target, method, side))
        return self.results.get(side)


def found(_tenant: str, _service: str) -> str | None:
    return PROVIDER


def missing(_tenant: str, _service: str) -> str | None:
    return None


def test_no_policy_splices_with_p2p_allowed() -> None:
    policy = Calls()
    assert decide_open(REQUEST, decide=policy, resolve=found, forward_plane=True) == AdmitOpen(
        PROVIDER, P2PMode.ALLOWED, RelayMode.SPLICE
    )
    assert [c[3] for c in policy.calls] == ["caller", "callee"]


def test_caller_deny_rejects_403_before_the_registry() -> None:
    policy = Calls(caller=PolicyResult(Decision.DENY, "deny-web"))

    def resolve(_tenant: str, _service: str) -> str | None:
        raise AssertionError("the registry is not consulted after a caller-side deny")

    decision = decide_open(REQUEST, decide=policy, resolve=resolve, forward_plane=False)
    assert decision == RejectOpen(
        RejectCode.FORBIDDEN, "denied: deny-web", "open denied", "deny-web"
    )
    assert policy.calls == [(CONSUMER, "web", "GET /", "caller")]


def test_unknown_service_rejects_404_without_callee_check() -> None:
    policy = Calls(caller=ALLOW)
    decision = decide_open(REQUEST, decide=policy, resolve=missing, forward_plane=False)
    assert isinstance(decision, RejectOpen)
    assert (decision.code, decision.reason) == (RejectCode.NOT_FOUND, "service not found")
    assert decision.policy_reason is None
    assert [c[3] for c in policy.calls] == ["caller"]


def test_callee_deny_rejects_403_with_callee_reason() -> None:
    policy = Calls(caller=ALLOW, callee=PolicyResult(Decision.DENY, "no matching rule"))
    decision = decide_open(REQUEST, decide=policy, resolve=found, forward_plane=False)
    assert decision == RejectOpen(
        RejectCode.FORBIDDEN,
        "denied (callee): no matching rule",
        "open denied (callee)",
        "no matching rule",
    )
    assert policy.calls[1] == (PROVIDER, CONSUMER, "GET /", "callee")


@pytest.mark.parametrize(
    ("caller", "callee", "expected"),
    [
        (P2PMode.ALLOWED, P2PMode.ALLOWED, P2PMode.ALLOWED),
        (P2PMode.REQUIRED, P2PMode.ALLOWED, P2PMode.REQUIRED),
        (P2PMode.ALLOWED, P2PMode.REQUIRED, P2PMode.REQUIRED),
        (P2PMode.REQUIRED, P2PMode.FORBIDDEN, P2PMode.FORBIDDEN),
        (P2PMode.FORBIDDEN, P2PMode.ALLOWED, P2PMode.FORBIDDEN),
    ],
)
def test_p2p_mode_combines_both_sides(caller: P2PMode, callee: P2PMode, expected: P2PMode) -> None:
    policy = Calls(
        caller=PolicyResult(Decision.ALLOW, "c", caller),
        callee=PolicyResult(Decision.ALLOW, "p", callee),
    )
    decision = decide_open(REQUEST, decide=policy, resolve=found, forward_plane=False)
    assert isinstance(decision, AdmitOpen)
    assert decision.p2p_mode is expected


@pytest.mark.parametrize(("plane", "mode"), [(True, RelayMode.FORWARD), (False, RelayMode.SPLICE)])
def test_forward_rule_forwards_only_with_a_plane(plane: bool, mode: RelayMode) -> None:
    caller = PolicyResult(Decision.ALLOW, "fwd", relay_mode=RelayMode.FORWARD)
    # Only the caller side's relay mode counts (spec 02 §6.2.4).
    policy = Calls(caller=caller, callee=ALLOW)
    decision = decide_open(REQUEST, decide=policy, resolve=found, forward_plane=plane)
    assert isinstance(decision, AdmitOpen)
    assert decision.relay_mode is mode


async def test_statistics_count_agents_pairs_and_refused_frames(pki: Pki) -> None:
    async with running_relay(pki) as h:
        assert h.relay.statistics().agents == 0
        consumer, _provider, pair = await live_pair(h)
        stats = h.relay.statistics()
        assert (stats.agents, stats.services, stats.pairs) == (2, 1, 1)
        assert stats.refused_not_owner == 0
        stranger = await h.agent()
        await stranger.send(frame(MIGRATE_TO_P2P, pb_int(1, pair.sid)))
        await stranger.ping_pong()
        stats = h.relay.statistics()
        assert (stats.refused_not_owner, stats.migrated) == (1, 0)
        await consumer.send(frame(MIGRATE_TO_P2P, pb_int(1, pair.sid)))
        await consumer.ping_pong()
        assert h.relay.statistics().migrated == 1
