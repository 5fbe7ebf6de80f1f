"""Certificate and key reload: validate new files, snapshot them, report the outcome.

Every TLS context in the process is built from file *paths* (aioquic, qh3 and
``ssl`` all load PEM files by name), and client contexts are built afresh for
each dial. Pointing them at the operator's files directly would let a half
written or wrong file reach the next handshake, so the process runs on a
private *snapshot* of the files instead (:class:`IdentitySnapshot`): a reload
validates the operator's files first (key matches certificate, the certificate
chains to the CA bundle and is inside its validity window, and for an agent its
first URI SAN is still the running ``--uri``) and only then replaces the
snapshot. A reload that fails leaves the snapshot, and so the running identity,
untouched.

:class:`FileWatch` is the optional ``--watch-certs`` poller. Kubernetes Secret
volumes swap files through a symlinked directory (``..data``), which can leave
the mtime the same, so it compares the resolved path, inode, size, mtime and a
content hash. Neither class does network I/O; the CLIs run them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from outrelay.pki.files import PkiError, load_certificates, load_identity
from outrelay.pki.verify import CertificateRejected, ClientVerifier

__all__ = [
    "FileWatch",
    "IdentitySnapshot",
    "LoadedIdentity",
    "ReloadError",
    "ReloadStatus",
    "chains_to_ca",
    "validate_identity",
]


class ReloadError(PkiError):
    """The new files cannot be used; ``str()`` says why. The old identity stays."""


@dataclass(frozen=True)
class LoadedIdentity:
    """What a validated set of files holds (for the log line and the status)."""

    serial: str
    """The leaf's serial number, hex."""
    not_after: _dt.datetime
    """The leaf's expiry (UTC)."""
    uri: str | None
    """The leaf's first URI SAN, if any."""


@dataclass
class ReloadStatus:
    """The outcome of the last reload, for the admin endpoint and tests.

    ``last_ok is None`` until the first reload. Mutated only by the reload
    code on the event loop thread.
    """

    reloads: int = 0
    """Reload attempts (SIGHUP or file change)."""
    failures: int = 0
    """Attempts that kept the old identity."""
    last_ok: bool | None = None
    last_at: _dt.datetime | None = None
    last_reason: str = ""
    """Why the last reload failed, or what triggered a successful one."""
    current: LoadedIdentity | None = None
    """The identity in use."""

    def record(self, ok: bool, reason: str, loaded: LoadedIdentity | None = None) -> None:
        """Note one attempt."""
        self.reloads += 1
        self.failures += 0 if ok else 1
        self.last_ok = ok
        self.last_at = _dt.datetime.now(_dt.UTC)
        self.last_reason = reason
        if ok and loaded is not None:
            self.current = loaded


def validate_identity(
    cert_path: str,
    key_path: str,
    ca_path: str,
    *,
    expect_uri: str | None = None,
    server: bool = False,
    check_chain: bool = True,
    now: _dt.datetime | None = None,
) -> LoadedIdentity:
    """Check a certificate, its key and a CA bundle the way the peers will.

    Args:
        expect_uri: the agent's running ``--uri``: the new certificate's first
            URI SAN must be the same identity (the relay binds the session to it).
        server: the relay's server certificate: chain and validity are checked
            as a dialling agent does, against its first DNS SAN.
        check_chain: with ``server``, False checks only the validity window: a
            relay whose own certificate never chained to its ``--ca`` (the bundle
            that verifies agents) must not have every reload refused for it.

    Raises:
        ReloadError: the files are missing or malformed, the key does not match,
            the certificate is expired, not yet valid, does not chain to the CA,
            or names another identity.
    """
    try:
        chain, _key = load_identity(cert_path, key_path)
        verifier = ClientVerifier(load_certificates(ca_path))
    except (OSError, PkiError, ValueError) as exc:
        raise ReloadError(str(exc)) from None
    leaf = chain[0]
    try:
        if server:
            if check_chain:
                verifier.verify_server(leaf, chain[1:], _first_dns_name(leaf), now=now)
            else:
                _check_window(leaf, now)
            uri = None
        else:
            uri = verifier.verify(leaf, chain[1:], now=now)
    except CertificateRejected as exc:
        raise ReloadError(f"{cert_path}: {exc.reason}") from None
    if expect_uri is not None and uri != expect_uri:
        raise ReloadError(
            f"{cert_path}: its first URI SAN {uri} is not the running identity {expect_uri}"
        )
    return LoadedIdentity(
        serial=f"{leaf.serial_number:x}", not_after=leaf.not_valid_after_utc, uri=uri
    )


def _check_window(leaf: x509.Certificate, now: _dt.datetime | None) -> None:
    when = now or _dt.datetime.now(_dt.UTC)
    if when < leaf.not_valid_before_utc:
        raise CertificateRejected(f"certificate not valid before {leaf.not_valid_before_utc}")
    if when > leaf.not_valid_after_utc:
        raise CertificateRejected(f"certificate expired at {leaf.not_valid_after_utc}")


def chains_to_ca(cert_path: str, key_path: str, ca_path: str) -> bool:
    """Whether a server certificate validates against ``ca_path`` (see ``check_chain``)."""
    try:
        validate_identity(cert_path, key_path, ca_path, server=True)
    except ReloadError:
        return False
    return True


def _first_dns_name(leaf: x509.Certificate) -> str:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "localhost"
    names = san.get_values_for_type(x509.DNSName)
    if names:
        return names[0]
    ips = san.get_values_for_type(x509.IPAddress)
    return str(ips[0]) if ips else "localhost"


@dataclass
class IdentitySnapshot:
    """A private copy of the operator's cert, key and CA files that TLS contexts load.

    :attr:`cert_file`, :attr:`key_file` and :attr:`ca_file` are fixed paths in a
    private directory (mode 0700), so every :class:`QuicTlsConfig` built once
    from them keeps working across reloads. :meth:`install` replaces the three
    files one after another with ``os.replace``; contexts are built
    synchronously on the event loop thread that also runs the reload, so no
    handshake sees a mixed set.
    """

    source_cert: str
    source_key: str
    source_ca: str
    directory: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="outrelay-identity-"))
    )

    @property
    def cert_file(self) -> str:
        return str(self.directory / "cert.pem")

    @property
    def key_file(self) -> str:
        return str(self.directory / "key.pem")

    @property
    def ca_file(self) -> str:
        return str(self.directory / "ca.pem")

    def install(self) -> None:
        """Copy the source files into the snapshot (call after :func:`validate_identity`).

        Raises:
            ReloadError: a source file could not be read (it changed again).
        """
        try:
            blobs = [
                Path(p).read_bytes() for p in (self.source_cert, self.source_key, self.source_ca)
            ]
        except OSError as exc:
            raise ReloadError(str(exc)) from None
        for blob, target in zip(blobs, (self.cert_file, self.key_file, self.ca_file), strict=True):
            tmp = f"{target}.new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, target)

    def remove(self) -> None:
        """Delete the private directory (process exit)."""
        shutil.rmtree(self.directory, ignore_errors=True)


Fingerprint = tuple[str, int, int, int, str]


def _fingerprint(path: str) -> Fingerprint | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        digest = hashlib.sha256(Path(real).read_bytes()).hexdigest()
    except OSError:
        return None
    return (real, st.st_ino, st.st_size, st.st_mtime_ns, digest)


class FileWatch:
    """Polls files for a change of target, inode, size, mtime or content.

    Call :meth:`changed` every few seconds; it is True once per change. A file
    that disappears counts as a change too (the reload will then say why it
    failed); the content hash catches an in-place rewrite within one mtime tick.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = list(paths)
        self._seen = [_fingerprint(p) for p in self._paths]

    def changed(self) -> bool:
        now = [_fingerprint(p) for p in self._paths]
        if now == self._seen:
            return False
        self._seen = now
        return True
