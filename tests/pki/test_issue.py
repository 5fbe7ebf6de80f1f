"""Issuance: the certificate shapes spec 01/02/03 rely on."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from outrelay.pki import Issued, create_ca, first_uri_san, issue_agent, issue_relay

LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
UTC = dt.UTC


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    value = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(value, x509.SubjectAlternativeName)
    return value


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    value = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(value, x509.ExtendedKeyUsage)
    return set(value)


def _days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400


def test_ca_shape() -> None:
    ca = create_ca()
    cert = ca.cert
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "OutRelay Dev CA"
    )
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=0)
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    assert 3649 < _days(cert) < 3651
    # self-signed
    cert.verify_directly_issued_by(cert)


def test_ca_custom_name_and_days() -> None:
    ca = create_ca("Test CA", days=10)
    assert ca.cert.subject.rfc4514_string() == "CN=Test CA,O=OutRelay"
    assert 9.9 < _days(ca.cert) < 10.01


@pytest.mark.parametrize("days", [0, -1])
def test_ca_rejects_bad_days(days: int) -> None:
    with pytest.raises(ValueError, match="at least 1 day"):
        create_ca(days=days)


def test_relay_shape(ca: Issued) -> None:
    relay = issue_relay(ca, region="eu-west", relay_id="r-7")
    cert = relay.cert
    cert.verify_directly_issued_by(ca.cert)
    san = list(_san(cert))
    assert san[0] == x509.UniformResourceIdentifier("outrelay://eu-west/relay/r-7")
    assert x509.DNSName("localhost") in san
    assert x509.IPAddress(ipaddress.ip_address("127.0.0.1")) in san
    assert x509.IPAddress(ipaddress.ip_address("::1")) in san
    assert first_uri_san(cert) == "outrelay://eu-west/relay/r-7"
    # serverAuth for agents, clientAuth for inter-relay dials (spec 02 §10.2)
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign
    assert _ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    ca_ski = _ext(ca.cert, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    assert _ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(relay.key.public_key())
    )
    assert 364.9 < _days(cert) < 365.01


def test_relay_defaults_and_custom_names(ca: Issued) -> None:
    assert first_uri_san(issue_relay(ca).cert) == "outrelay://local/relay/relay-1"
    relay = issue_relay(ca, dns_names=("relay.example", "localhost"), ip_addresses=("10.0.0.1",))
    san = _san(relay.cert)
    assert san.get_values_for_type(x509.DNSName) == ["relay.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]


def test_agent_shape(ca: Issued) -> None:
    agent, uri = issue_agent(ca, tenant="acme")
    m = re.fullmatch(r"outrelay://acme/agent/([0-9a-f-]{36})", uri)
    assert m is not None
    assert uuid.UUID(m.group(1)).version == 4
    cert = agent.cert
    cert.verify_directly_issued_by(ca.cert)
    san = list(_san(cert))
    assert san[0] == x509.UniformResourceIdentifier(uri)
    assert san[1:] == [x509.DNSName("localhost")]
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert 364.9 < _days(cert) < 365.01
    now = dt.datetime.now(UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc


def test_agent_ids_are_fresh(ca: Issued) -> None:
    uris = {issue_agent(ca, tenant="acme")[1] for _ in range(5)}
    assert len(uris) == 5


@pytest.mark.parametrize(
    "agent_id",
    [
        uuid.UUID("0D3F1B2C-1111-4222-8333-444455556666"),
        "0D3F1B2C-1111-4222-8333-444455556666",
        "0d3f1b2c111142228333444455556666",
    ],
)
def test_agent_explicit_id_is_canonical(ca: Issued, agent_id: uuid.UUID | str) -> None:
    agent, uri = issue_agent(ca, tenant="t1", agent_id=agent_id)
    assert uri == "outrelay://t1/agent/0d3f1b2c-1111-4222-8333-444455556666"
    assert first_uri_san(agent.cert) == uri


def test_agent_bad_uuid(ca: Issued) -> None:
    with pytest.raises(ValueError, match="not a valid UUID"):
        issue_agent(ca, tenant="acme", agent_id="not-a-uuid")


def test_agent_uri_override(ca: Issued) -> None:
    agent, uri = issue_agent(
        ca, tenant="acme", uri_sans=("https://example.com/x", "outrelay://x/y")
    )
    uris = _san(agent.cert).get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["https://example.com/x", "outrelay://x/y"]
    assert uri.startswith("outrelay://acme/agent/")
    no_uri, _ = issue_agent(ca, tenant="acme", uri_sans=())
    assert first_uri_san(no_uri.cert) is None
    assert _san(no_uri.cert).get_values_for_type(x509.DNSName) == ["localhost"]


def test_agent_without_any_san(ca: Issued) -> None:
    agent, _ = issue_agent(ca, tenant="acme", uri_sans=(), dns_names=())
    with pytest.raises(x509.ExtensionNotFound):
        agent.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert first_uri_san(agent.cert) is None


def test_explicit_validity(ca: Issued) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=UTC)
    end = dt.datetime(2020, 1, 2, tzinfo=UTC)
    agent, _ = issue_agent(ca, tenant="acme", not_before=start, not_after=end)
    assert agent.cert.not_valid_before_utc == start
    assert agent.cert.not_valid_after_utc == end
    with pytest.raises(ValueError, match="never be valid"):
        issue_agent(ca, tenant="acme", not_before=end, not_after=start)
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_agent(ca, tenant="acme", not_after=dt.datetime(2030, 1, 1))


def test_leaf_capped_at_ca_expiry() -> None:
    short_ca = create_ca(days=3)
    agent, _ = issue_agent(short_ca, tenant="acme", days=365)
    assert agent.cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"region": "EU"}, "invalid region"),
        ({"region": ""}, "invalid region"),
        ({"region": "-eu"}, "invalid region"),
        ({"region": "a" * 64}, "invalid region"),
        ({"relay_id": "relay_1"}, "invalid relay id"),
        ({"relay_id": "r.1"}, "invalid relay id"),
        ({"dns_names": ("bad name",)}, "invalid DNS name"),
        ({"ip_addresses": ("300.1.1.1",)}, "invalid IP address"),
        ({"days": 0}, "at least 1 day"),
    ],
)
def test_relay_validation(ca: Issued, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        issue_relay(ca, **kwargs)  # type: ignore[arg-type]


# Hypothesis tests avoid pytest fixtures; they get their own module-level CA.
_HYPOTHESIS_CA = create_ca()


@given(st.text(alphabet="abcXYZ019-_.:/ ", max_size=70))
def test_tenant_label_rule(tenant: str) -> None:
    valid = LABEL_RE.fullmatch(tenant) is not None
    if valid:
        _, uri = issue_agent(_HYPOTHESIS_CA, tenant=tenant)
        assert uri.startswith(f"outrelay://{tenant}/agent/")
    else:
        with pytest.raises(ValueError, match="invalid tenant"):
            issue_agent(_HYPOTHESIS_CA, tenant=tenant)


def test_pem_helpers(ca: Issued) -> None:
    agent, _ = issue_agent(ca, tenant="acme")
    assert agent.cert_pem().startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificate(agent.cert_pem()) == agent.cert
    key_pem = agent.key_pem()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == agent.key.private_numbers()
