"""The agent's check of its own TLS material, before any network I/O.

A certificate the relay will refuse is found here, with the exact reason,
instead of as a connection the relay closes: the files parse, the key belongs
to the certificate, the certificate is inside its validity window, it chains
to the CA bundle under the client-auth policy (:class:`ClientVerifier`, the
relay's own check), and its first URI SAN is the ``--uri`` the agent will send
in HELLO (spec 02 §2.2, §2.3).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from outrelay.pki.files import PkiError, load_certificates, load_identity
from outrelay.pki.verify import CertificateRejected, ClientVerifier

__all__ = ["IdentityCheckFailed", "check_own_identity"]


class IdentityCheckFailed(PkiError):
    """The material loads, but the relay would refuse it; ``str()`` says why."""


def check_own_identity(
    cert_path: Path | str,
    key_path: Path | str,
    ca_path: Path | str,
    uri: str,
    *,
    now: _dt.datetime | None = None,
) -> None:
    """Check an agent's certificate, key and CA bundle as the relay will.

    Args:
        cert_path: PEM certificate, leaf first (``--cert``).
        key_path: Its private key (``--key``).
        ca_path: The CA bundle (``--ca``); the relay is expected to trust the
            same CA.
        uri: The identity the agent announces (``--uri``).
        now: Validation time (default: the current time).

    Raises:
        PkiError: A file cannot be read or parsed, or the key does not match
            the certificate.
        IdentityCheckFailed: The certificate is expired or not yet valid, does
            not chain to ``ca_path``, or its first URI SAN is not ``uri``.
    """
    chain, _key = load_identity(cert_path, key_path)
    verifier = ClientVerifier(load_certificates(ca_path))
    try:
        identity = verifier.verify(chain[0], chain[1:], now=now)
    except CertificateRejected as exc:
        raise IdentityCheckFailed(f"{cert_path}: {exc.reason}") from None
    if identity != uri:
        raise IdentityCheckFailed(
            f"{cert_path}: its first URI SAN {identity} is not --uri {uri} "
            "(the relay would refuse the HELLO)"
        )
