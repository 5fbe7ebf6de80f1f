"""Issuance of the dev PKI: one CA, relay leaves and agent leaves.

Every key is ECDSA P-256 and every signature ECDSA-with-SHA-256. The shapes
follow what the reference relay and agent expect (spec 01 "Identity URIs",
spec 02 §2.1-§2.2 and §10.2, spec 03 §2.1 and §2.4):

* the peer's identity is the certificate's **first URI SAN**, so the
  ``outrelay://`` URI is always written first in the SAN extension;
* every leaf carries DNS SAN ``localhost`` by default, because reference agents
  and inter-relay dials use ServerName ``localhost``;
* every leaf carries both EKUs: a relay's certificate is also its client
  certificate for inter-relay dials (spec 02 §10.2), and an agent's certificate
  is also the server certificate of its P2P and forward listeners (spec 03 §2.4);
* the CA is a root with ``pathLen=0`` that signs leaves directly.

This module does no I/O; see :mod:`outrelay.pki.files` for writing and loading.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Issued",
    "create_ca",
    "issue_agent",
    "issue_relay",
]

#: Host and relay-id rule of spec 01 "Identity URIs".
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: One DNS name in a SAN: dot-separated LDH labels, optionally a leading ``*.``.
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"^(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?$")

#: Leaves and CAs start a few minutes in the past to tolerate clock skew.
_BACKDATE = _dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as produced by the issuing functions.

    Attributes:
        cert: The X.509 certificate.
        key: Its ECDSA P-256 private key.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """Return the certificate as PEM bytes."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Return the private key as unencrypted PEM PKCS#8 bytes (keep them private)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def create_ca(common_name: str = "OutRelay Dev CA", *, days: int = 3650) -> Issued:
    """Create a self-signed development CA.

    The CA has BasicConstraints ``CA:TRUE, pathLen:0`` (critical), KeyUsage
    ``keyCertSign, cRLSign`` (critical), a SubjectKeyIdentifier and a matching
    AuthorityKeyIdentifier.

    Args:
        common_name: Subject CN of the CA.
        days: Validity in days, counted from now (``notBefore`` is backdated by
            five minutes for clock skew).

    Returns:
        The CA certificate and key.

    Raises:
        ValueError: ``days`` is not positive or ``common_name`` is empty.
    """
    if not common_name:
        raise ValueError("CA common name must not be empty")
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OutRelay"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
    )
    return Issued(cert=builder.sign(key, hashes.SHA256()), key=key)


def issue_relay(
    ca: Issued,
    *,
    region: str = "local",
    relay_id: str = "relay-1",
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 365,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> Issued:
    """Issue a relay leaf with identity ``outrelay://<region>/relay/<relay_id>``.

    The SAN extension holds that URI first, then ``dns_names``, then
    ``ip_addresses``. EKU is serverAuth **and** clientAuth: the relay presents
    the same certificate when it dials a peer relay (spec 02 §10.2).

    Args:
        ca: The issuing CA (from :func:`create_ca` or :func:`~outrelay.pki.load_ca`).
        region: URI host; a DNS label (``^[a-z0-9][a-z0-9-]{0,62}$``).
        relay_id: Relay id; the same DNS-label rule.
        dns_names: DNS SANs. Keep ``localhost`` unless every agent and peer relay
            is configured with another server name (spec 02 §2.1).
        ip_addresses: IP SANs, as strings.
        days: Validity in days from now, capped at the CA's ``notAfter``.
        not_before: Explicit start of validity (overrides the default).
        not_after: Explicit end of validity (overrides ``days``; not capped).

    Returns:
        The relay certificate and key. Its URI is
        ``first_uri_san(result.cert)``.

    Raises:
        ValueError: A label, DNS name, IP address or validity is invalid.
    """
    _check_label("region", region)
    _check_label("relay id", relay_id)
    uri = f"outrelay://{region}/relay/{relay_id}"
    return _issue_leaf(
        ca,
        subject=_leaf_name(common_name=relay_id, unit=region),
        uris=(uri,),
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        days=days,
        not_before=not_before,
        not_after=not_after,
    )


def issue_agent(
    ca: Issued,
    *,
    tenant: str,
    agent_id: uuid.UUID | str | None = None,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    uri_sans: Sequence[str] | None = None,
) -> tuple[Issued, str]:
    """Issue an agent leaf with identity ``outrelay://<tenant>/agent/<uuid>``.

    EKU is clientAuth **and** serverAuth: the agent also serves its P2P and
    forward-mode listeners with this certificate (spec 03 §2.4), and the dialling
    peer checks the DNS SAN (``localhost`` by default).

    Args:
        ca: The issuing CA.
        tenant: URI host; a DNS label (``^[a-z0-9][a-z0-9-]{0,62}$``).
        agent_id: The agent UUID (a :class:`uuid.UUID` or any string
            :class:`uuid.UUID` accepts); a random UUID4 when ``None``. It is
            written in canonical lower-case form.
        dns_names: DNS SANs.
        ip_addresses: IP SANs, as strings.
        days: Validity in days from now, capped at the CA's ``notAfter``.
        not_before: Explicit start of validity (overrides the default).
        not_after: Explicit end of validity (overrides ``days``; not capped).
            Tests use these two to mint expired or not-yet-valid leaves.
        uri_sans: For tests only: the URI SANs to write *instead of* the
            identity URI (``()`` for none, or e.g. an ``https://`` URI). With
            neither URI, DNS nor IP SANs the certificate has no SAN extension.

    Returns:
        ``(issued, uri)`` where ``uri`` is the identity URI computed from
        ``tenant`` and ``agent_id``. Unless ``uri_sans`` overrides it, that is
        the certificate's first URI SAN.

    Raises:
        ValueError: The tenant, agent id, a DNS name, an IP address or the
            validity is invalid.
    """
    _check_label("tenant", tenant)
    if agent_id is None:
        agent_uuid = uuid.uuid4()
    elif isinstance(agent_id, uuid.UUID):
        agent_uuid = agent_id
    else:
        try:
            agent_uuid = uuid.UUID(agent_id)
        except ValueError:
            raise ValueError(f"agent id {agent_id!r} is not a valid UUID") from None
    uri = f"outrelay://{tenant}/agent/{agent_uuid}"
    issued = _issue_leaf(
        ca,
        subject=_leaf_name(common_name=str(agent_uuid), unit=tenant),
        uris=(uri,) if uri_sans is None else tuple(uri_sans),
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        days=days,
        not_before=not_before,
        not_after=not_after,
    )
    return issued, uri


# --------------------------------------------------------------------------- helpers


def _now() -> _dt.datetime:
    # Whole seconds: X.509 UTCTime has no fractions, and equal values compare
    # cleanly with what a parsed certificate reports.
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"validity must be at least 1 day, got {days}")


def _check_label(what: str, value: str) -> None:
    if not _LABEL_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: must be a DNS label of 1-63 characters "
            "from a-z, 0-9 and '-', starting with a letter or digit (lower case)"
        )


def _leaf_name(*, common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OutRelay"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san_names(
    uris: Sequence[str], dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> list[x509.GeneralName]:
    """Build the SAN list: URIs first (the identity is the first URI SAN), then DNS, then IP."""
    names: list[x509.GeneralName] = []
    for uri in uris:
        if not uri or not uri.isascii() or any(c.isspace() for c in uri):
            raise ValueError(f"invalid URI SAN {uri!r}")
        names.append(x509.UniformResourceIdentifier(uri))
    for dns in dns_names:
        if not _DNS_NAME_RE.fullmatch(dns) or len(dns) > 253:
            raise ValueError(f"invalid DNS name {dns!r}")
        names.append(x509.DNSName(dns))
    for ip in ip_addresses:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"invalid IP address {ip!r}") from None
        names.append(x509.IPAddress(addr))
    return names


def _issue_leaf(
    ca: Issued,
    *,
    subject: x509.Name,
    uris: Sequence[str],
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int,
    not_before: _dt.datetime | None,
    not_after: _dt.datetime | None,
) -> Issued:
    now = _now()
    start = not_before if not_before is not None else now - _BACKDATE
    if not_after is not None:
        end = not_after
    else:
        _check_days(days)
        # A leaf that outlives its CA is useless; cap it at the CA's end.
        end = min(now + _dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("not_before/not_after must be timezone-aware datetimes")
    if end <= start:
        raise ValueError(f"certificate would never be valid: notAfter {end} <= notBefore {start}")

    key = ec.generate_private_key(ec.SECP256R1())
    try:
        ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:  # a CA minted elsewhere, without SKI
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    sans = _san_names(uris, dns_names, ip_addresses)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(cert=builder.sign(ca.key, hashes.SHA256()), key=key)
