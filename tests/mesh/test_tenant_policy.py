"""TenantPolicy: registry policy rules enforced per tenant (mesh/policy.py), sans-IO."""

from __future__ import annotations

import pytest

from outrelay.relay.mesh.policy import NO_TENANT_POLICY, TenantPolicy
from outrelay.relay.policy import (
    NO_MATCHING_PROVIDE_RULE,
    NO_MATCHING_RULE,
    PROVIDE_OPEN,
    Decision,
    PolicyDocument,
    ProvideRule,
    Rule,
)

A = "outrelay://acme/agent/11111111-1111-1111-1111-111111111111"
B = "outrelay://beta/agent/22222222-2222-2222-2222-222222222222"


def rule(rule_id: str, caller: str, target: str, decision: Decision = Decision.ALLOW) -> Rule:
    return Rule(id=rule_id, caller_pattern=caller, target_pattern=target, decision=decision)


def test_tenant_without_rules_is_not_enforced() -> None:
    policy = TenantPolicy()
    result = policy.decide(A, "web", "", 0)
    assert result.allowed and result.reason == NO_TENANT_POLICY
    provide = policy.may_provide(A, "acme", "web")
    assert provide.allowed and provide.reason == PROVIDE_OPEN and not provide.covered
    assert policy.tenants == frozenset()


def test_rules_apply_to_their_tenant_only() -> None:
    policy = TenantPolicy()
    policy.replace({"acme": PolicyDocument((rule("w", "outrelay://acme/*", "web"),))})
    assert policy.decide(A, "web", "", 0).reason == "w"
    denied = policy.decide(A, "db", "", 0)
    assert not denied.allowed and denied.reason == NO_MATCHING_RULE
    # beta has no rules: allowed, even for a target acme's rules would deny.
    assert policy.decide(B, "db", "", 0).reason == NO_TENANT_POLICY
    # A rule under acme matching every caller does not leak to beta.
    policy.replace({"acme": PolicyDocument((rule("all", "*", "*", Decision.DENY),))})
    assert policy.decide(B, "web", "", 0).allowed
    assert not policy.decide(A, "web", "", 0).allowed
    # Callee side: the caller is the provider; its tenant decides.
    assert not policy.decide(A, B, "", 0).allowed
    assert policy.decide(B, A, "", 0).allowed


def test_replace_swaps_and_flushes_changed_tenants() -> None:
    policy = TenantPolicy()
    policy.replace({"acme": PolicyDocument((rule("w", "*", "web"),))})
    assert policy.decide(A, "web", "", 0).allowed  # cached now
    policy.replace({"acme": PolicyDocument((rule("w", "*", "web", Decision.DENY),))})
    assert not policy.decide(A, "web", "", 0).allowed  # the change is not hidden by a cache
    policy.replace({"acme": PolicyDocument(), "beta": PolicyDocument((rule("x", "*", "*"),))})
    assert policy.tenants == {"beta"}  # an empty document is "no rules"
    assert policy.decide(A, "web", "", 0).reason == NO_TENANT_POLICY
    stats = policy.statistics()
    assert stats.rules == 1


def test_provide_rules_per_tenant() -> None:
    policy = TenantPolicy()
    only = ProvideRule("only", "outrelay://acme/agent/aaaa*", "web", Decision.ALLOW)
    policy.replace({"acme": PolicyDocument((), (only,))})
    refused = policy.may_provide(A, "acme", "web")
    assert not refused.allowed and refused.reason == NO_MATCHING_PROVIDE_RULE
    assert policy.may_provide(A, "acme", "db").allowed  # not covered
    assert policy.may_provide(B, "beta", "web").allowed  # other tenant
    # Provide rules alone enable the tenant's consume enforcement too (closed world).
    assert not policy.decide(A, "web", "", 0).allowed


def test_non_outrelay_caller_is_not_enforced() -> None:
    policy = TenantPolicy()
    policy.replace({"acme": PolicyDocument((rule("all", "*", "*", Decision.DENY),))})
    assert policy.decide("spiffe://acme/x", "web", "", 0).reason == NO_TENANT_POLICY


def test_load_is_refused() -> None:
    with pytest.raises(TypeError):
        TenantPolicy().load(PolicyDocument())
