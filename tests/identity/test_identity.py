"""Tests for outrelay.identity (spec 01 "Identity URIs", spec 02 §2.2)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay import identity as identity_module
from outrelay.identity import (
    AgentIdentity,
    InvalidIdentity,
    RelayIdentity,
    format_agent_uri,
    format_relay_uri,
    is_valid_label,
    parse_agent_uri,
    parse_identity,
    tenant_of,
)

UUID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
PATH_CHARS = "agentrly/-:?#%0123456789abfABF"
LABELS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


def test_exports() -> None:
    for name in identity_module.__all__:
        assert hasattr(identity_module, name), name


# -- valid URIs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "tenant", "agent_id"),
    [
        (f"outrelay://acme/agent/{UUID}", "acme", UUID),
        (f"outrelay://0/agent/{UUID}", "0", UUID),
        (f"outrelay://a-b-/agent/{UUID}", "a-b-", UUID),
        (f"outrelay://{'x' * 63}/agent/{UUID}", "x" * 63, UUID),
        (
            "outrelay://t/agent/00000000-0000-0000-0000-000000000000",
            "t",
            "00000000-0000-0000-0000-000000000000",
        ),
    ],
)
def test_agent_round_trip(uri: str, tenant: str, agent_id: str) -> None:
    parsed = parse_identity(uri)
    assert parsed == AgentIdentity(tenant, uuid.UUID(agent_id))
    assert isinstance(parsed, AgentIdentity)
    assert parsed.role == "agent"
    assert parsed.tenant == parsed.authority == tenant
    assert parsed.uri == str(parsed) == uri
    assert parse_agent_uri(uri) == parsed
    assert tenant_of(uri) == tenant
    assert format_agent_uri(tenant, uuid.UUID(agent_id)) == uri
    assert format_agent_uri(tenant, agent_id) == uri


@pytest.mark.parametrize(
    ("uri", "region", "relay_id"),
    [
        ("outrelay://eu-west/relay/r1", "eu-west", "r1"),
        ("outrelay://us/relay/0-relay-", "us", "0-relay-"),
        (f"outrelay://us/relay/{'9' * 63}", "us", "9" * 63),
    ],
)
def test_relay_round_trip(uri: str, region: str, relay_id: str) -> None:
    parsed = parse_identity(uri)
    assert parsed == RelayIdentity(region, relay_id)
    assert isinstance(parsed, RelayIdentity)
    assert parsed.role == "relay"
    assert parsed.region == parsed.authority == region
    assert parsed.uri == str(parsed) == uri
    assert tenant_of(uri) == region
    assert format_relay_uri(region, relay_id) == uri


def test_upper_case_uuid_parses_but_renders_lower_case() -> None:
    uri = f"outrelay://acme/agent/{UUID.upper()}"
    parsed = parse_agent_uri(uri)
    assert parsed.agent_id == uuid.UUID(UUID)
    assert parsed.uri == f"outrelay://acme/agent/{UUID}" != uri
    assert format_agent_uri("acme", UUID.upper()) == f"outrelay://acme/agent/{UUID}"


def test_identities_are_frozen_and_hashable() -> None:
    agent = AgentIdentity("acme", uuid.UUID(UUID))
    with pytest.raises(AttributeError):
        agent.tenant = "other"  # type: ignore[misc]
    assert {agent, parse_identity(agent.uri)} == {agent}


# -- invalid URIs ----------------------------------------------------------------------------

INVALID = [
    pytest.param("", "is empty", id="empty"),
    pytest.param(
        f"https://acme/agent/{UUID}", "scheme must be 'outrelay', got 'https'", id="scheme"
    ),
    pytest.param(f"OUTRELAY://acme/agent/{UUID}", "got 'OUTRELAY'", id="scheme-upper"),
    pytest.param(f"acme/agent/{UUID}", "has no scheme", id="no-scheme"),
    pytest.param(f"outrelay:acme/agent/{UUID}", "must start with 'outrelay://'", id="no-slashes"),
    pytest.param(
        f"outrelay://Acme/agent/{UUID}", "tenant 'Acme' must be lower case", id="host-upper"
    ),
    pytest.param("outrelay://EU/relay/r1", "region 'EU' must be lower case", id="region-upper"),
    pytest.param(f"outrelay://acme:443/agent/{UUID}", "has a port", id="port"),
    pytest.param(f"outrelay://acme:/agent/{UUID}", "has a port", id="empty-port"),
    pytest.param(f"outrelay://u@acme/agent/{UUID}", "has userinfo 'u'", id="userinfo"),
    pytest.param(f"outrelay://[::1]/agent/{UUID}", "IP literal", id="ipv6"),
    pytest.param(f"outrelay:///agent/{UUID}", "tenant must not be empty", id="empty-host"),
    pytest.param(
        f"outrelay://{'a' * 64}/agent/{UUID}", "is 64 characters long; at most 63", id="label-64"
    ),
    pytest.param(
        f"outrelay://-acme/agent/{UUID}",
        "tenant '-acme' must start with a lower-case letter or a digit",
        id="label-dash",
    ),
    pytest.param(f"outrelay://ac_me/agent/{UUID}", "contains '_'", id="label-underscore"),
    pytest.param(f"outrelay://ac.me/agent/{UUID}", "contains '.'", id="label-dot"),
    pytest.param(f"outrelay://acmé/agent/{UUID}", "contains 'é'", id="label-non-ascii"),
    pytest.param(
        "outrelay://acme/agent",
        "path must be exactly two segments 'agent/<uuid>' or 'relay/<id>', got 'agent'",
        id="one-segment",
    ),
    pytest.param("outrelay://acme", "got ''", id="no-path"),
    pytest.param("outrelay://acme/", "got ''", id="root-path"),
    pytest.param(f"outrelay://acme/agent/{UUID}/x", f"got 'agent/{UUID}/x'", id="three-segments"),
    pytest.param(f"outrelay://acme/agent/{UUID}/", "(trailing slash)", id="trailing-slash"),
    pytest.param("outrelay://acme/agent/", "(trailing slash)", id="missing-uuid"),
    pytest.param(f"outrelay://acme//agent/{UUID}", "(empty segment)", id="empty-segment"),
    pytest.param(f"outrelay://acme/service/{UUID}", "role 'service' must be", id="bad-role"),
    pytest.param(f"outrelay://acme/Agent/{UUID}", "role 'Agent' must be", id="role-upper"),
    pytest.param("outrelay://acme/agent/xyz", "'xyz' is not a valid UUID", id="bad-uuid"),
    pytest.param(f"outrelay://acme/agent/{UUID[:-1]}g", "is not a valid UUID", id="uuid-non-hex"),
    pytest.param(
        f"outrelay://acme/agent/{UUID.replace('-', '')}", "is not a valid UUID", id="uuid-32-hex"
    ),
    pytest.param(f"outrelay://acme/agent/{{{UUID}}}", "is not a valid UUID", id="uuid-braces"),
    pytest.param(f"outrelay://acme/agent/urn:uuid:{UUID}", "is not a valid UUID", id="uuid-urn"),
    pytest.param(f"outrelay://acme/agent/{UUID}\n", "is not a valid UUID", id="uuid-newline"),
    pytest.param(
        f"outrelay://acme/agent/{UUID}?x=1", "has a query '?x=1'; none is allowed", id="query"
    ),
    pytest.param(f"outrelay://acme/agent/{UUID}?", "has a query", id="empty-query"),
    pytest.param(
        f"outrelay://acme/agent/{UUID}#frag", "has a fragment '#frag'; none is allowed", id="frag"
    ),
    pytest.param(
        "outrelay://acme/agent/%36f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
        "percent-encoded",
        id="percent",
    ),
    pytest.param("outrelay://us/relay/R1", "relay id 'R1' must be lower case", id="relay-upper"),
    pytest.param("outrelay://us/relay/-r1", "relay id '-r1' must start", id="relay-dash"),
    pytest.param(f"outrelay://us/relay/{'r' * 64}", "relay id 'rrrr", id="relay-64"),
    pytest.param("outrelay://us/relay/r1\n", "relay id 'r1\\n' contains '\\n'", id="relay-nl"),
]


@pytest.mark.parametrize(("uri", "fragment"), INVALID)
def test_invalid(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        parse_identity(uri)
    message = str(info.value)
    assert message.startswith(f"identity {uri!r}: ")
    assert fragment in message
    assert info.value.uri == uri
    assert fragment in info.value.reason or fragment in repr(uri)
    assert isinstance(info.value, ValueError)


def test_parse_agent_uri_rejects_relay() -> None:
    with pytest.raises(InvalidIdentity, match="names a relay"):
        parse_agent_uri("outrelay://eu/relay/r1")


def test_tenant_of_invalid() -> None:
    with pytest.raises(InvalidIdentity, match="must be lower case"):
        tenant_of(f"outrelay://Acme/agent/{UUID}")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: format_agent_uri("Acme", UUID), "tenant 'Acme' must be lower case"),
        (lambda: format_agent_uri("acme", "xyz"), "'xyz' is not a valid UUID"),
        (lambda: format_agent_uri("", uuid.UUID(UUID)), "tenant must not be empty"),
        (lambda: format_relay_uri("eu", "r_1"), "relay id 'r_1' contains '_'"),
        (lambda: format_relay_uri("e u", "r1"), "region 'e u' contains ' '"),
        (lambda: AgentIdentity("-a", uuid.UUID(UUID)), "tenant '-a' must start"),
        (lambda: RelayIdentity("eu", ""), "relay id must not be empty"),
    ],
)
def test_constructors_validate(call: object, fragment: str) -> None:
    assert callable(call)
    with pytest.raises(InvalidIdentity) as info:
        call()
    assert fragment in str(info.value)


def test_agent_id_must_be_uuid() -> None:
    with pytest.raises(TypeError, match=r"agent_id must be a uuid\.UUID"):
        AgentIdentity("acme", UUID)  # type: ignore[arg-type]


def test_is_valid_label() -> None:
    assert is_valid_label("a")
    assert is_valid_label("a" * 63)
    assert not is_valid_label("a" * 64)
    assert not is_valid_label("-a")
    assert not is_valid_label("a\n")
    assert not is_valid_label("")


# -- properties ------------------------------------------------------------------------------


@given(tenant=LABELS, agent_id=st.uuids())
def test_agent_format_parse_property(tenant: str, agent_id: uuid.UUID) -> None:
    uri = format_agent_uri(tenant, agent_id)
    assert uri == f"outrelay://{tenant}/agent/{agent_id}"
    parsed = parse_agent_uri(uri)
    assert (parsed.tenant, parsed.agent_id) == (tenant, agent_id)
    assert parsed.uri == uri
    assert format_agent_uri(tenant, str(agent_id).upper()) == uri


@given(region=LABELS, relay_id=LABELS)
def test_relay_format_parse_property(region: str, relay_id: str) -> None:
    uri = format_relay_uri(region, relay_id)
    parsed = parse_identity(uri)
    assert parsed == RelayIdentity(region, relay_id)
    assert parsed.uri == uri


@given(
    st.one_of(
        st.text(),
        st.builds(lambda s: "outrelay://" + s, st.text()),
        st.builds(lambda s: "outrelay://acme/" + s, st.text(alphabet=PATH_CHARS)),
    )
)
def test_arbitrary_text_parses_or_raises_invalid_identity(text: str) -> None:
    try:
        parsed = parse_identity(text)
    except InvalidIdentity as exc:
        assert exc.uri == text
        return
    # Anything accepted re-renders to the input, up to the case of the UUID's hex digits.
    if isinstance(parsed, AgentIdentity):
        assert parsed.uri == text.lower()
    else:
        assert parsed.uri == text
