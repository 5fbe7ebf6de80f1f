"""Chain verification of peer certificates against the configured CA.

Theory of operation
-------------------
aioquic can *request* a client certificate but does not verify the chain it
receives, and it accepts an empty client Certificate message (DESIGN.md,
"server-side mTLS on QUIC"). The relay, and an agent's P2P and forward
listeners, therefore verify the presented chain themselves, after the
handshake and before reading any stream:

1. no leaf: reject ("no client certificate");
2. the leaf's own validity window: reject as "certificate expired" or
   "certificate not yet valid" (checked first so the log says which);
3. the chain, with :mod:`cryptography.x509.verification`: client-auth policy
   (EKU clientAuth when the leaf has an EKU extension, BasicConstraints,
   KeyUsage, signatures, validity of every certificate). Any failure is
   "chain does not verify against CA: <detail>";
4. the identity: the leaf's **first URI SAN** (spec 02 §2.2), which must be an
   ``outrelay://`` identity URI (spec 01 "Identity URIs").

Policy differences from the library's WebPKI defaults, for end-entity
certificates only: a missing AuthorityKeyIdentifier is tolerated (Go's
verifier, which the reference relay uses, does not require it), and a missing
subjectAltName passes the chain step so that step 4 can report "no URI SAN"
instead of an extension error. CA certificates keep the WebPKI defaults.

The :class:`~cryptography.x509.verification.Store` and the extension policies
are built once per :class:`ClientVerifier`; each call only builds a policy for
its validation time, which costs tens of microseconds.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import verification as xv

__all__ = [
    "CertificateRejected",
    "ClientVerifier",
    "first_uri_san",
]

_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_IDENTITY_RE = re.compile(r"^outrelay://(?P<host>[^/?#]*)/(?P<role>[^/?#]*)/(?P<id>[^/?#]*)$")
#: Noise in the library's messages that says nothing useful in a log line.
_ENCOUNTERED_RE = re.compile(r"\s*\(encountered processing <Certificate\(.*\)>\)\s*$", re.DOTALL)
_NOISE_PREFIXES = ("validation failed: ", "candidates exhausted: ")


class CertificateRejected(Exception):
    """A peer certificate (chain) was rejected.

    Attributes:
        reason: A short, log-friendly reason, e.g. ``"no client certificate"``,
            ``"certificate expired (notAfter 2024-01-01T00:00:00+00:00)"``,
            ``"chain does not verify against CA: signature does not match"``,
            ``"no URI SAN"`` or
            ``"URI SAN is not an outrelay identity: https://example.com"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def first_uri_san(cert: x509.Certificate) -> str | None:
    """Return the first URI SAN of ``cert``, in the extension's order, or ``None``.

    Per spec 01 "Identity URIs" and spec 02 §2.2 this is the peer's identity.

    Args:
        cert: Any certificate.

    Returns:
        The URI string as written in the certificate, or ``None`` when the
        certificate has no SAN extension or no URI entry in it.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class ClientVerifier:
    """Verifies peer certificate chains against a fixed set of CA certificates.

    Build one per configured CA bundle and call :meth:`verify` once per
    accepted connection (relay edge, agent P2P/forward listeners).
    :meth:`verify_server` checks the other direction with the same store.
    """

    def __init__(self, ca_certs: Sequence[x509.Certificate]) -> None:
        """Build the trust store.

        Args:
            ca_certs: Trust anchors, e.g. ``load_certificates(ca_path)``.

        Raises:
            ValueError: ``ca_certs`` is empty.
        """
        if not ca_certs:
            raise ValueError("ClientVerifier needs at least one CA certificate")
        self._store = xv.Store(list(ca_certs))
        self._ca_policy = xv.ExtensionPolicy.webpki_defaults_ca()
        agnostic = xv.Criticality.AGNOSTIC
        self._server_ee_policy = xv.ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.AuthorityKeyIdentifier, agnostic, None
        )
        self._client_ee_policy = self._server_ee_policy.may_be_present(
            x509.SubjectAlternativeName, agnostic, None
        )

    def verify(
        self,
        leaf: x509.Certificate | None,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        now: _dt.datetime | None = None,
    ) -> str:
        """Verify a client's chain and return its identity.

        Args:
            leaf: The peer's leaf certificate, or ``None`` if it sent none.
            intermediates: Further certificates the peer sent (may be empty).
            now: Validation time (default: the current time). A naive datetime
                is taken as UTC.

        Returns:
            The leaf's first URI SAN, e.g. ``outrelay://acme/agent/<uuid>`` or
            ``outrelay://local/relay/relay-1``. The caller parses the role from it
            (spec 02 §2.2 step 4).

        Raises:
            CertificateRejected: No leaf; leaf expired or not yet valid; chain
                does not verify against the CA (includes a missing clientAuth
                EKU); no URI SAN; first URI SAN not an outrelay identity.
                The caller closes the connection (spec 02 §2.2: application
                error code 0, empty reason).
        """
        if leaf is None:
            raise CertificateRejected("no client certificate")
        when = _utc(now)
        _check_validity(leaf, when)
        builder = (
            xv.PolicyBuilder()
            .store(self._store)
            .time(when)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._client_ee_policy)
        )
        try:
            builder.build_client_verifier().verify(leaf, list(intermediates))
        except xv.VerificationError as exc:
            raise CertificateRejected(
                f"chain does not verify against CA: {_clean(str(exc))}"
            ) from exc
        uri = first_uri_san(leaf)
        if uri is None:
            raise CertificateRejected("no URI SAN")
        problem = _identity_problem(uri)
        if problem is not None:
            raise CertificateRejected(f"URI SAN is not an outrelay identity: {uri} ({problem})")
        return uri

    def verify_server(
        self,
        leaf: x509.Certificate | None,
        intermediates: Sequence[x509.Certificate] = (),
        server_name: str = "localhost",
        *,
        now: _dt.datetime | None = None,
    ) -> list[x509.Certificate]:
        """Verify a server's chain and its name, as a dialling client does.

        This is the check of spec 03 §2.1/§2.4 (chain plus hostname, no URI
        check); use it where the TLS library does not already do it.

        Args:
            leaf: The server's leaf certificate, or ``None`` if it sent none.
            intermediates: Further certificates the server sent.
            server_name: The expected name: a DNS name, or an IP address
                literal matched against IP SANs.
            now: Validation time (default: the current time).

        Returns:
            The verified chain, leaf first, trust anchor last.

        Raises:
            CertificateRejected: No leaf; leaf expired or not yet valid; the
                chain or the name does not verify.
        """
        if leaf is None:
            raise CertificateRejected("no server certificate")
        when = _utc(now)
        _check_validity(leaf, when)
        subject: xv.Subject
        try:
            subject = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            subject = x509.DNSName(server_name)
        builder = (
            xv.PolicyBuilder()
            .store(self._store)
            .time(when)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._server_ee_policy)
        )
        try:
            return builder.build_server_verifier(subject).verify(leaf, list(intermediates))
        except xv.VerificationError as exc:
            raise CertificateRejected(
                f"chain does not verify against CA for {server_name!r}: {_clean(str(exc))}"
            ) from exc


# --------------------------------------------------------------------------- helpers


def _utc(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=_dt.UTC)
    return now.astimezone(_dt.UTC)


def _check_validity(leaf: x509.Certificate, when: _dt.datetime) -> None:
    if when > leaf.not_valid_after_utc:
        raise CertificateRejected(
            f"certificate expired (notAfter {leaf.not_valid_after_utc.isoformat()})"
        )
    if when < leaf.not_valid_before_utc:
        raise CertificateRejected(
            f"certificate not yet valid (notBefore {leaf.not_valid_before_utc.isoformat()})"
        )


def _clean(message: str) -> str:
    message = _ENCOUNTERED_RE.sub("", message)
    changed = True
    while changed:
        changed = False
        for prefix in _NOISE_PREFIXES:
            if message.startswith(prefix):
                message = message[len(prefix) :]
                changed = True
    return message


def _identity_problem(uri: str) -> str | None:
    """Return why ``uri`` is not an identity URI of spec 01, or ``None`` if it is one.

    Uses :func:`outrelay.identity.parse_identity` (imported lazily, so this layer
    does not need it at import time); falls back to an equivalent private check
    (spec 02 §2.2 step 3) if that module is unavailable.
    """
    try:
        from outrelay.identity import parse_identity
    except ImportError:  # pragma: no cover - only while identity.py is absent
        return _fallback_identity_problem(uri)
    try:
        parse_identity(uri)
    except ValueError as exc:  # InvalidIdentity is a ValueError
        return str(getattr(exc, "reason", exc))
    return None


def _fallback_identity_problem(uri: str) -> str | None:
    match = _IDENTITY_RE.fullmatch(uri)
    if match is None:
        if not uri.startswith("outrelay://"):
            return "scheme must be outrelay"
        return "expected outrelay://<host>/<agent|relay>/<id>"
    host, role, ident = match.group("host", "role", "id")
    if not _LABEL_RE.fullmatch(host):
        return f"host {host!r} is not a lower-case DNS label"
    if role == "agent":
        if not _UUID_RE.fullmatch(ident):
            return f"agent id {ident!r} is not a UUID (8-4-4-4-12 hex)"
        return None
    if role == "relay":
        if not _LABEL_RE.fullmatch(ident):
            return f"relay id {ident!r} is not a lower-case DNS label"
        return None
    return f"role {role!r} is neither agent nor relay"
