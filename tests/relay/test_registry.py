"""Tests for outrelay.relay.registry, the embedded service registry (spec 02 §4, §10.3)."""

from __future__ import annotations

import pytest

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
    # The first agent's teardown no longer removes the name it lost.
    assert registry.deregister_agent("acme", AGENT_1) == []
    assert registry.resolve("acme", "svc") == binding


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
    registry.register("acme", "a", AGENT_2, "")  # re-registration keeps the slot
    assert [(b.service_name, b.agent_uri) for b in registry.services()] == [
        ("z", AGENT_1),
        ("a", AGENT_2),
        ("m", AGENT_1),
    ]
