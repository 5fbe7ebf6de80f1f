"""ClientVerifier: the relay's (and P2P listener's) own client-chain check.

DESIGN.md requires proof that a missing certificate, a certificate from another
CA, an expired certificate and a URI mismatch are all rejected.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from outrelay.pki import (
    CertificateRejected,
    ClientVerifier,
    Issued,
    create_ca,
    first_uri_san,
    issue_agent,
    issue_relay,
)

UTC = dt.UTC


@pytest.fixture(scope="module")
def verifier(ca: Issued) -> ClientVerifier:
    return ClientVerifier([ca.cert])


def _rejected(
    verifier: ClientVerifier, leaf: x509.Certificate | None, *, now: dt.datetime | None = None
) -> str:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify(leaf, now=now)
    reason = info.value.reason
    assert str(info.value) == reason
    assert "encountered processing" not in reason  # library noise is trimmed
    return reason


def _custom_leaf(
    ca: Issued,
    *,
    eku: list[x509.ObjectIdentifier] | None,
    sans: list[x509.GeneralName],
    aki: bool = True,
) -> x509.Certificate:
    """A leaf built by hand, for shapes the issuing API deliberately cannot make."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    return builder.sign(ca.key, hashes.SHA256())


# --------------------------------------------------------------------------- accepted


def test_accepts_agent_leaf(ca: Issued, verifier: ClientVerifier) -> None:
    agent, uri = issue_agent(ca, tenant="acme")
    assert verifier.verify(agent.cert) == uri


def test_accepts_relay_leaf(ca: Issued, verifier: ClientVerifier) -> None:
    # A relay dialling a peer relay presents its server cert as client cert (spec 02 §10.2).
    relay = issue_relay(ca, region="eu", relay_id="r2")
    assert verifier.verify(relay.cert, []) == "outrelay://eu/relay/r2"


def test_returns_first_uri_in_san_order(ca: Issued, verifier: ClientVerifier) -> None:
    first = "outrelay://acme/agent/00000000-0000-4000-8000-000000000001"
    second = "outrelay://acme/agent/00000000-0000-4000-8000-000000000002"
    leaf = _custom_leaf(
        ca,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[
            x509.DNSName("localhost"),
            x509.UniformResourceIdentifier(first),
            x509.UniformResourceIdentifier(second),
        ],
    )
    assert verifier.verify(leaf) == first


def test_tolerates_leaf_without_eku_or_aki(ca: Issued, verifier: ClientVerifier) -> None:
    # Go's verifier (the reference relay) accepts these; so do we.
    uri = "outrelay://acme/agent/00000000-0000-4000-8000-000000000003"
    leaf = _custom_leaf(ca, eku=None, sans=[x509.UniformResourceIdentifier(uri)], aki=False)
    assert verifier.verify(leaf) == uri


def test_accepts_any_of_several_cas(ca: Issued, other_ca: Issued) -> None:
    both = ClientVerifier([other_ca.cert, ca.cert])
    agent, uri = issue_agent(ca, tenant="acme")
    other, other_uri = issue_agent(other_ca, tenant="acme")
    assert both.verify(agent.cert) == uri
    assert both.verify(other.cert) == other_uri


def _intermediate_ca(root: Issued) -> Issued:
    """A sub-CA signed by ``root`` (our dev CA has pathLen 0, so the root is built here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    ku = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sub CA")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def test_intermediates_are_used() -> None:
    # Root with pathLen 1: the dev CA (pathLen 0) cannot sign a sub-CA.
    root_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Root")])
    ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    root = Issued(cert=root_cert, key=root_key)
    sub = _intermediate_ca(root)
    leaf, uri = issue_agent(sub, tenant="acme")
    verifier = ClientVerifier([root.cert])
    assert verifier.verify(leaf.cert, [sub.cert]) == uri
    assert _rejected(verifier, leaf.cert).startswith("chain does not verify against CA: ")


def test_empty_ca_list() -> None:
    with pytest.raises(ValueError, match="at least one CA"):
        ClientVerifier([])


# --------------------------------------------------------------------------- rejected


def test_rejects_missing_certificate(verifier: ClientVerifier) -> None:
    assert _rejected(verifier, None) == "no client certificate"


def test_rejects_leaf_from_another_ca(other_ca: Issued, verifier: ClientVerifier) -> None:
    # Same CA subject name, different key: only the signature tells them apart.
    leaf, _ = issue_agent(other_ca, tenant="acme")
    reason = _rejected(verifier, leaf.cert)
    assert reason.startswith("chain does not verify against CA: ")


def test_rejects_leaf_from_differently_named_ca(verifier: ClientVerifier) -> None:
    leaf, _ = issue_agent(create_ca("Mallory CA"), tenant="acme")
    assert _rejected(verifier, leaf.cert).startswith("chain does not verify against CA: ")


def test_rejects_expired_leaf(ca: Issued, verifier: ClientVerifier) -> None:
    now = dt.datetime.now(UTC)
    leaf, _ = issue_agent(
        ca, tenant="acme", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(1)
    )
    assert _rejected(verifier, leaf.cert).startswith("certificate expired (notAfter ")


def test_rejects_not_yet_valid_leaf(ca: Issued, verifier: ClientVerifier) -> None:
    now = dt.datetime.now(UTC)
    leaf, _ = issue_agent(
        ca, tenant="acme", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(9)
    )
    assert _rejected(verifier, leaf.cert).startswith("certificate not yet valid (notBefore ")


def test_validation_time_is_honoured(ca: Issued, verifier: ClientVerifier) -> None:
    leaf, uri = issue_agent(ca, tenant="acme", days=30)
    later = dt.datetime.now(UTC) + dt.timedelta(days=31)
    assert _rejected(verifier, leaf.cert, now=later).startswith("certificate expired")
    naive_now = dt.datetime.now(UTC).replace(tzinfo=None)  # taken as UTC
    assert verifier.verify(leaf.cert, now=naive_now) == uri


def test_rejects_when_ca_expired(verifier: ClientVerifier) -> None:
    short_ca = create_ca(days=1)
    leaf, _ = issue_agent(short_ca, tenant="acme", not_after=dt.datetime(2100, 1, 1, tzinfo=UTC))
    short = ClientVerifier([short_ca.cert])
    later = dt.datetime.now(UTC) + dt.timedelta(days=2)
    reason = _rejected(short, leaf.cert, now=later)
    assert reason.startswith("chain does not verify against CA: ")


def test_rejects_leaf_without_uri_san(ca: Issued, verifier: ClientVerifier) -> None:
    leaf, _ = issue_agent(ca, tenant="acme", uri_sans=())  # DNS SAN localhost only
    assert _rejected(verifier, leaf.cert) == "no URI SAN"


def test_rejects_leaf_without_any_san(ca: Issued, verifier: ClientVerifier) -> None:
    leaf, _ = issue_agent(ca, tenant="acme", uri_sans=(), dns_names=())
    assert _rejected(verifier, leaf.cert) == "no URI SAN"


def test_rejects_non_outrelay_uri(ca: Issued, verifier: ClientVerifier) -> None:
    leaf, _ = issue_agent(ca, tenant="acme", uri_sans=("https://example.com/agent/x",))
    reason = _rejected(verifier, leaf.cert)
    assert reason.startswith("URI SAN is not an outrelay identity: https://example.com/agent/x")


def test_first_uri_decides_even_if_a_later_one_is_valid(
    ca: Issued, verifier: ClientVerifier
) -> None:
    good = "outrelay://acme/agent/00000000-0000-4000-8000-000000000004"
    leaf, _ = issue_agent(ca, tenant="acme", uri_sans=("spiffe://acme/x", good))
    assert _rejected(verifier, leaf.cert).startswith("URI SAN is not an outrelay identity: spiffe")


@pytest.mark.parametrize(
    "uri",
    [
        "outrelay://ACME/agent/00000000-0000-4000-8000-000000000005",  # upper case host
        "outrelay://acme:7443/agent/00000000-0000-4000-8000-000000000005",  # port
        "outrelay://acme/agent/not-a-uuid",
        "outrelay://acme/relay/Relay_1",
        "outrelay://acme/service/x",
        "outrelay://acme/agent/00000000-0000-4000-8000-000000000005/extra",
        "outrelay://acme/agent",
        "outrelay:///agent/00000000-0000-4000-8000-000000000005",
        "outrelay://acme/agent/{00000000-0000-4000-8000-000000000005}",
        "outrelay://acme/agent/00000000-0000-4000-8000-000000000005?x=1",
    ],
)
def test_rejects_malformed_outrelay_uris(ca: Issued, verifier: ClientVerifier, uri: str) -> None:
    leaf, _ = issue_agent(ca, tenant="acme", uri_sans=(uri,))
    assert _rejected(verifier, leaf.cert).startswith(f"URI SAN is not an outrelay identity: {uri}")


@pytest.mark.parametrize(
    "uri",
    [
        "outrelay://ACME/agent/00000000-0000-4000-8000-000000000005",
        "outrelay://acme/agent/{00000000-0000-4000-8000-000000000005}",
        "outrelay://acme/relay/r_1",
        "outrelay://acme/svc/x",
        "https://acme/agent/00000000-0000-4000-8000-000000000005",
        "outrelay://acme/agent",
    ],
)
def test_fallback_identity_check_agrees(uri: str) -> None:
    # The private fallback (used only if outrelay.identity is missing) rejects what it rejects.
    from outrelay.pki.verify import _fallback_identity_problem, _identity_problem

    assert _identity_problem(uri) is not None
    assert _fallback_identity_problem(uri) is not None
    good = "outrelay://acme/agent/00000000-0000-4000-8000-00000000000A"
    assert _identity_problem(good) is None
    assert _fallback_identity_problem(good) is None
    assert _fallback_identity_problem("outrelay://eu/relay/r-1") is None


def test_rejects_leaf_without_client_auth_eku(ca: Issued, verifier: ClientVerifier) -> None:
    uri = "outrelay://acme/agent/00000000-0000-4000-8000-000000000006"
    leaf = _custom_leaf(
        ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=[x509.UniformResourceIdentifier(uri)]
    )
    reason = _rejected(verifier, leaf)
    assert reason == "chain does not verify against CA: required EKU not found"


def test_rejects_ca_certificate_as_leaf(ca: Issued, verifier: ClientVerifier) -> None:
    assert _rejected(verifier, ca.cert).startswith("chain does not verify against CA: ")


def test_first_uri_san_helper(ca: Issued) -> None:
    agent, uri = issue_agent(ca, tenant="acme")
    assert first_uri_san(agent.cert) == uri
    assert first_uri_san(ca.cert) is None


# --------------------------------------------------------------------------- server side


def test_verify_server(ca: Issued, other_ca: Issued, verifier: ClientVerifier) -> None:
    relay = issue_relay(ca)
    chain = verifier.verify_server(relay.cert, [], "localhost")
    assert chain == [relay.cert, ca.cert]
    assert verifier.verify_server(relay.cert, server_name="127.0.0.1")[0] == relay.cert
    assert verifier.verify_server(relay.cert, server_name="::1")[0] == relay.cert
    # Agents serve P2P listeners with their cert, valid for localhost (spec 03 §2.4).
    agent, _ = issue_agent(ca, tenant="acme")
    assert verifier.verify_server(agent.cert)[0] == agent.cert

    with pytest.raises(CertificateRejected, match=r"for 'relay\.example'"):
        verifier.verify_server(relay.cert, server_name="relay.example")
    with pytest.raises(CertificateRejected, match="chain does not verify"):
        verifier.verify_server(issue_relay(other_ca).cert)
    with pytest.raises(CertificateRejected, match="no server certificate"):
        verifier.verify_server(None)
    now = dt.datetime.now(UTC)
    expired, _ = issue_agent(
        ca, tenant="acme", not_before=now - dt.timedelta(2), not_after=now - dt.timedelta(1)
    )
    with pytest.raises(CertificateRejected, match="certificate expired"):
        verifier.verify_server(expired.cert)
