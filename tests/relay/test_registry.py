"""Tests for outrelay.relay.registry, the embedded service registry (spec 02 §4, §10.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.relay.registry import (
    RegistrationRejected,
    ServiceBinding,
    ServiceRegistry,
    service_id,
)

AGENT_1 = "outrelay://acme/agent/11111111-1111-1111-1111-111111111111"
AGENT_2 = "outrelay://acme/agent/22222222-2222-2222-2222-222222222222"
OTHER_TENANT_AGENT = "outrelay://other/agent/33333333-3333-3333-3333-333333333333"


def test_registry_facade() -> None:
    """TestRegistryFacade: register, resolve to the agent, deregister, then not found."""
    registry = ServiceRegistry("relay-1")
    sid = registry.register("acme", "svc-x", AGENT_1, "127.0.0.1:8080")
    assert sid == "acme/svc-x"
    binding = registry.resolve("acme", "svc-x")
    assert binding == ServiceBinding("acme", "svc-x", AGENT_1, "relay-1", "127.0.0.1:8080")
    assert binding.agent_uri == AGENT_1
    assert binding.service_id == sid
    assert registry.deregister_agent("acme", AGENT_1) == ["svc-x"]
    assert registry.resolve("acme", "svc-x") is None
    assert len(registry) == 0


def test_service_id_format() -> None:
    """Spec 02 §4 step 4: the controller's id is "<tenant>/<service_name>"."""
    assert service_id("acme", "svc-echo") == "acme/svc-echo"


def test_register_is_idempotent_upsert() -> None:
    registry = ServiceRegistry("relay-1")
    assert registry.register("acme", "svc", AGENT_1, "127.0.0.1:1") == "acme/svc"
    assert registry.register("acme", "svc", AGENT_1, "127.0.0.1:2") == "acme/svc"
    assert len(registry) == 1
    binding = registry.resolve("acme", "svc")
    assert binding is not None
    assert binding.local_addr == "127.0.0.1:2"


def test_last_writer_takes_over_the_name() -> None:
    """Spec 02 §4: another agent registering the same name takes it over."""
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "svc", AGENT_1, "a:1")
    registry.register("acme", "svc", AGENT_2, "b:2")
    binding = registry.resolve("acme", "svc")
    assert binding is not None
    assert binding.agent_uri == AGENT_2
    # [REC] The agent that lost the name is kept underneath; its teardown removes only itself.
    assert registry.deregister_agent("acme", AGENT_1) == ["svc"]
    assert registry.resolve("acme", "svc") == binding
    assert registry.providers("acme", "svc") == (binding,)


def test_services_are_per_tenant() -> None:
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "svc", AGENT_1, "")
    assert registry.resolve("other", "svc") is None
    registry.register("other", "svc", OTHER_TENANT_AGENT, "")
    assert registry.resolve("acme", "svc") != registry.resolve("other", "svc")
    # Deregistering is scoped by tenant as well.
    assert registry.deregister_agent("other", AGENT_1) == []
    assert len(registry) == 2


def test_deregister_agent_removes_all_its_services() -> None:
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "a", AGENT_1, "")
    registry.register("acme", "b", AGENT_2, "")
    registry.register("acme", "c", AGENT_1, "")
    assert registry.deregister_agent("acme", AGENT_1) == ["a", "c"]
    assert [b.service_name for b in registry.services()] == ["b"]
    assert registry.deregister_agent("acme", AGENT_1) == []


@pytest.mark.parametrize(
    ("tenant", "name", "uri", "field"),
    [
        ("acme", "", AGENT_1, "service_name"),
        ("", "svc", AGENT_1, "tenant"),
        ("acme", "svc", "", "agent_uri"),
    ],
)
def test_empty_fields_are_rejected(tenant: str, name: str, uri: str, field: str) -> None:
    """Spec 02 §4 step 5, §18.1 item 4: an empty service_name is refused (no REGISTER_ACK)."""
    registry = ServiceRegistry("relay-1")
    with pytest.raises(RegistrationRejected) as info:
        registry.register(tenant, name, uri, "127.0.0.1:1")
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)
    assert len(registry) == 0


def test_empty_local_addr_is_accepted() -> None:
    """A reconnect replay may carry no local_addr (and the reference's own test uses none)."""
    registry = ServiceRegistry("relay-1")
    assert registry.register("acme", "svc-y", AGENT_1, "") == "acme/svc-y"
    binding = registry.resolve("acme", "svc-y")
    assert binding is not None
    assert binding.local_addr == ""


def test_bindings_carry_the_relay_id() -> None:
    """Locality is relay_id string equality (spec 02 §6.1 step 3a)."""
    registry = ServiceRegistry("relay-r")
    assert registry.relay_id == "relay-r"
    registry.register("acme", "svc", AGENT_1, "")
    binding = registry.resolve("acme", "svc")
    assert binding is not None
    assert binding.relay_id == "relay-r"


def test_services_in_registration_order() -> None:
    registry = ServiceRegistry("relay-1")
    for name in ("z", "a", "m"):
        registry.register("acme", name, AGENT_1, "")
    registry.register("acme", "a", AGENT_2, "")  # a second provider stacks on the name's slot
    assert [(b.service_name, b.agent_uri) for b in registry.services()] == [
        ("z", AGENT_1),
        ("a", AGENT_1),
        ("a", AGENT_2),
        ("m", AGENT_1),
    ]
    assert len(registry) == 3


# --- every live provider is kept ([REC], see the module docstring) -----------------------------

AGENT_3 = "outrelay://acme/agent/44444444-4444-4444-4444-444444444444"


def agents_of(registry: ServiceRegistry, name: str) -> list[str]:
    return [b.agent_uri for b in registry.providers("acme", name)]


def served_by(registry: ServiceRegistry, name: str) -> str | None:
    binding = registry.resolve("acme", name)
    return None if binding is None else binding.agent_uri


def test_stack_of_providers_newest_serves() -> None:
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "a:1")
    registry.register("acme", "web", AGENT_2, "b:2")
    registry.register("acme", "web", AGENT_3, "c:3")
    assert agents_of(registry, "web") == [AGENT_1, AGENT_2, AGENT_3]
    assert served_by(registry, "web") == AGENT_3
    assert len(registry) == 1
    assert registry.providers("acme", "nope") == ()
    assert registry.providers("other", "web") == ()


def test_fallback_to_the_next_most_recent_live_provider() -> None:
    """The taker leaves: the provider it took the name from serves again (no 404)."""
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "a:1")
    registry.register("acme", "web", AGENT_2, "b:2")
    registry.register("acme", "web", AGENT_3, "c:3")
    assert registry.deregister_agent("acme", AGENT_3) == ["web"]
    binding = registry.resolve("acme", "web")
    assert binding == ServiceBinding("acme", "web", AGENT_2, "relay-1", "b:2")
    assert registry.deregister_agent("acme", AGENT_2) == ["web"]
    assert served_by(registry, "web") == AGENT_1
    assert registry.deregister_agent("acme", AGENT_1) == ["web"]
    assert registry.resolve("acme", "web") is None
    assert len(registry) == 0
    assert registry.services() == []


def test_deregistering_a_provider_that_does_not_serve_keeps_the_server() -> None:
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "a:1")
    registry.register("acme", "web", AGENT_2, "b:2")
    registry.register("acme", "web", AGENT_3, "c:3")
    assert registry.deregister_agent("acme", AGENT_2) == ["web"]  # from the middle
    assert agents_of(registry, "web") == [AGENT_1, AGENT_3]
    assert served_by(registry, "web") == AGENT_3
    assert registry.deregister_agent("acme", AGENT_1) == ["web"]  # from the bottom
    assert agents_of(registry, "web") == [AGENT_3]
    assert served_by(registry, "web") == AGENT_3
    # After its last provider went away, the next one to register starts a new stack.
    assert registry.deregister_agent("acme", AGENT_3) == ["web"]
    registry.register("acme", "web", AGENT_1, "a:9")
    assert agents_of(registry, "web") == [AGENT_1]


def test_same_agent_re_registering_moves_to_the_top_with_its_new_address() -> None:
    """Re-registering is a write: the agent serves again (last writer wins), once in the stack."""
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "a:1")
    registry.register("acme", "web", AGENT_2, "b:2")
    assert registry.register("acme", "web", AGENT_1, "a:2") == "acme/web"
    assert agents_of(registry, "web") == [AGENT_2, AGENT_1]
    binding = registry.resolve("acme", "web")
    assert binding is not None
    assert (binding.agent_uri, binding.local_addr) == (AGENT_1, "a:2")
    # Re-registering at the top changes only the address.
    registry.register("acme", "web", AGENT_1, "a:3")
    assert [(b.agent_uri, b.local_addr) for b in registry.providers("acme", "web")] == [
        (AGENT_2, "b:2"),
        (AGENT_1, "a:3"),
    ]
    assert registry.deregister_agent("acme", AGENT_1) == ["web"]
    assert served_by(registry, "web") == AGENT_2


def test_deregister_agent_leaves_other_names_and_tenants_alone() -> None:
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "")
    registry.register("acme", "api", AGENT_2, "")
    registry.register("acme", "web", AGENT_2, "")
    registry.register("other", "web", OTHER_TENANT_AGENT, "")
    assert registry.deregister_agent("acme", AGENT_2) == ["web", "api"]  # name order
    assert served_by(registry, "web") == AGENT_1
    assert registry.resolve("acme", "api") is None
    other = registry.resolve("other", "web")
    assert other is not None and other.agent_uri == OTHER_TENANT_AGENT


def test_resolve_skips_providers_that_are_not_live() -> None:
    """The relay passes its agent map: a binding without a connection never hides a live one."""
    registry = ServiceRegistry("relay-1")
    registry.register("acme", "web", AGENT_1, "")
    registry.register("acme", "web", AGENT_2, "")
    live = {AGENT_1}
    binding = registry.resolve("acme", "web", is_live=live.__contains__)
    assert binding is not None and binding.agent_uri == AGENT_1
    assert registry.resolve("acme", "web", is_live=lambda _uri: False) is None
    binding = registry.resolve("acme", "web", is_live=lambda _uri: True)
    assert binding is not None and binding.agent_uri == AGENT_2


def test_validate_checks_fields_without_registering() -> None:
    registry = ServiceRegistry("relay-1")
    registry.validate("acme", "web", AGENT_1)
    with pytest.raises(RegistrationRejected) as info:
        registry.validate("acme", "", AGENT_1)
    assert info.value.field == "service_name"
    assert len(registry) == 0


AGENTS = [AGENT_1, AGENT_2, AGENT_3]
NAMES = ["web", "api"]

operations = st.lists(
    st.tuples(
        st.sampled_from(["register", "leave"]), st.sampled_from(AGENTS), st.sampled_from(NAMES)
    ),
    max_size=40,
)


@given(operations)
def test_resolve_is_the_most_recent_registration_of_a_connected_agent(
    ops: list[tuple[str, str, str]],
) -> None:
    """Against a model with clocks: the server of a name is the agent whose latest
    registration of it is the most recent among the agents that have not left since."""
    registry = ServiceRegistry("relay-1")
    registered_at: dict[tuple[str, str], int] = {}  # (agent, name) -> op index
    for clock, (op, agent, name) in enumerate(ops):
        if op == "register":
            registry.register("acme", name, agent, f"addr-{clock}")
            registered_at[(agent, name)] = clock
        else:
            removed = registry.deregister_agent("acme", agent)
            had = sorted(n for (a, n) in registered_at if a == agent)
            assert sorted(removed) == had
            for key in [k for k in registered_at if k[0] == agent]:
                del registered_at[key]
        for each in NAMES:
            candidates = {a: t for (a, n), t in registered_at.items() if n == each}
            want = max(candidates, key=candidates.__getitem__) if candidates else None
            binding = registry.resolve("acme", each)
            assert (None if binding is None else binding.agent_uri) == want
            if binding is not None:
                assert binding.local_addr == f"addr-{candidates[binding.agent_uri]}"
            assert sorted(agents_of(registry, each)) == sorted(candidates)
    assert len(registry) == len({n for (_a, n) in registered_at})
