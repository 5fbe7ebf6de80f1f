"""Development PKI: CA and leaf issuance, PEM files, and peer chain verification.

Identities are ``outrelay://`` URIs carried as the certificate's first URI SAN
(spec 01 "Identity URIs"). Typical use::

    from outrelay import pki

    ca = pki.create_ca()
    relay = pki.issue_relay(ca, region="local", relay_id="relay-1")
    agent, uri = pki.issue_agent(ca, tenant="acme")
    pki.write_identity(Path("certs"), "agent-a", agent)

    verifier = pki.ClientVerifier(pki.load_certificates("certs/ca.crt"))
    peer_uri = verifier.verify(leaf, intermediates)  # raises CertificateRejected

The ``outrelay pki`` command (:mod:`outrelay.pki.cli`) writes the same files.
"""

from __future__ import annotations

from outrelay.pki.files import PkiError as PkiError
from outrelay.pki.files import PrivateKey as PrivateKey
from outrelay.pki.files import load_ca as load_ca
from outrelay.pki.files import load_certificates as load_certificates
from outrelay.pki.files import load_identity as load_identity
from outrelay.pki.files import load_private_key as load_private_key
from outrelay.pki.files import write_identity as write_identity
from outrelay.pki.issue import Issued as Issued
from outrelay.pki.issue import create_ca as create_ca
from outrelay.pki.issue import issue_agent as issue_agent
from outrelay.pki.issue import issue_relay as issue_relay
from outrelay.pki.selfcheck import IdentityCheckFailed as IdentityCheckFailed
from outrelay.pki.selfcheck import check_own_identity as check_own_identity
from outrelay.pki.verify import CertificateRejected as CertificateRejected
from outrelay.pki.verify import ClientVerifier as ClientVerifier
from outrelay.pki.verify import first_uri_san as first_uri_san

__all__ = [
    "CertificateRejected",
    "ClientVerifier",
    "IdentityCheckFailed",
    "Issued",
    "PkiError",
    "PrivateKey",
    "check_own_identity",
    "create_ca",
    "first_uri_san",
    "issue_agent",
    "issue_relay",
    "load_ca",
    "load_certificates",
    "load_identity",
    "load_private_key",
    "write_identity",
]
