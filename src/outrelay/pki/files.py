"""Writing and loading PEM certificates and keys.

Private keys are written with mode 0600 from the moment the file exists: the
data goes to a temporary file created with ``O_CREAT | O_EXCL`` and mode 0600
in the target directory, which is then linked (no overwrite) or renamed (with
``force``) into place. A reader therefore never sees a partial file, and a key
is never briefly world-readable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from outrelay.pki.issue import Issued

__all__ = [
    "PkiError",
    "PrivateKey",
    "load_ca",
    "load_certificates",
    "load_identity",
    "load_private_key",
    "write_identity",
]

#: Private-key types usable for a TLS 1.3 certificate (and for signing certificates).
PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_PRIVATE_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


class PkiError(Exception):
    """A certificate or key file is missing, unreadable, malformed or inconsistent."""


def write_identity(
    dir: Path, name: str, issued: Issued, *, force: bool = False
) -> tuple[Path, Path]:
    """Write ``<dir>/<name>.crt`` (PEM certificate) and ``<dir>/<name>.key`` (PEM PKCS#8).

    ``dir`` is created with mode 0700 if it does not exist. The key file has
    mode 0600 from its creation; the certificate 0644. Both files are checked
    before anything is written, so a refusal leaves the directory untouched.

    Args:
        dir: Target directory.
        name: Base name, without directory separators or extension.
        issued: Certificate and key to write.
        force: Replace existing files instead of refusing.

    Returns:
        ``(cert_path, key_path)``.

    Raises:
        FileExistsError: A target file exists and ``force`` is false; the
            message names the file and suggests ``--force``.
        ValueError: ``name`` is not a plain file name.
        OSError: The directory or a file could not be created.
    """
    _check_name(name)
    ensure_private_dir(dir)
    cert_path = dir / f"{name}.crt"
    key_path = dir / f"{name}.key"
    if not force:
        refuse_existing([cert_path, key_path])
    created_key = not key_path.exists()
    write_file_atomic(key_path, issued.key_pem(), mode=_KEY_MODE, force=force)
    try:
        write_file_atomic(cert_path, issued.cert_pem(), mode=_CERT_MODE, force=force)
    except BaseException:
        # Do not leave a fresh key without its certificate behind.
        if created_key:
            with contextlib.suppress(OSError):
                key_path.unlink()
        raise
    return cert_path, key_path


def load_certificates(path: Path | str) -> list[x509.Certificate]:
    """Load every certificate of a PEM bundle (or a single DER certificate).

    Args:
        path: File to read.

    Returns:
        The certificates, in file order (at least one).

    Raises:
        PkiError: The file cannot be read, is malformed, or holds no
            certificate (``"no certificate in <path>"``).
    """
    data = _read(path)
    if b"-----BEGIN" not in data:
        if not data.strip():
            raise PkiError(f"no certificate in {path}")
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise PkiError(f"no certificate in {path}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        # The loader raises ValueError both for "no PEM CERTIFICATE block" and
        # for a malformed block; tell the two apart for the message.
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise PkiError(f"no certificate in {path}") from None
        raise PkiError(f"malformed certificate in {path}: {exc}") from None
    if not certs:
        raise PkiError(f"no certificate in {path}")
    return certs


def load_private_key(path: Path | str) -> PrivateKey:
    """Load an unencrypted private key (PEM PKCS#8, SEC1 or PKCS#1; or DER PKCS#8).

    Args:
        path: File to read.

    Returns:
        The private key.

    Raises:
        PkiError: The file cannot be read, holds no usable key, the key is
            encrypted, or its type cannot sign certificates/handshakes.
    """
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"private key in {path} is encrypted; provide it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"no usable private key in {path}: {exc}") from None
    if not isinstance(key, _PRIVATE_KEY_TYPES):
        raise PkiError(f"unsupported private key type in {path}: {type(key).__name__}")
    return key


def load_identity(
    cert_path: Path | str, key_path: Path | str
) -> tuple[list[x509.Certificate], PrivateKey]:
    """Load a certificate chain and its key, and check that they belong together.

    Args:
        cert_path: PEM file with the leaf first, optionally followed by
            intermediates.
        key_path: The leaf's private key.

    Returns:
        ``(chain, key)`` with ``chain[0]`` the leaf.

    Raises:
        PkiError: A file cannot be loaded, or the key does not match the leaf
            certificate's public key.
    """
    chain = load_certificates(cert_path)
    key = load_private_key(key_path)
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise PkiError(
            f"private key {key_path} does not match the certificate in {cert_path} "
            "(were they issued together?)"
        )
    return chain, key


def load_ca(ca_dir: Path | str) -> Issued:
    """Load ``<ca_dir>/ca.crt`` and ``<ca_dir>/ca.key`` as an issuing CA.

    Args:
        ca_dir: Directory written by ``outrelay pki ca`` or ``outrelay pki dev``.

    Returns:
        The CA, usable with :func:`~outrelay.pki.issue_relay` and
        :func:`~outrelay.pki.issue_agent`.

    Raises:
        PkiError: Files missing or mismatched, the certificate is not a CA, or
            the key is not an ECDSA key.
    """
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PkiError(f"{path} not found; create a CA with 'outrelay pki ca --out {ca_dir}'")
    chain, key = load_identity(cert_path, key_path)
    cert = chain[0]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"{cert_path} is not a CA certificate (BasicConstraints CA:TRUE missing)")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: only ECDSA CA keys are supported, got {type(key).__name__}")
    return Issued(cert=cert, key=key)


# --------------------------------------------------------------------------- shared helpers
# Used by outrelay.pki.cli as well (same package).


def ensure_private_dir(path: Path) -> bool:
    """Create ``path`` (and parents) with mode 0700 if missing.

    Args:
        path: Directory to create.

    Returns:
        ``True`` if the directory was created, ``False`` if it existed.

    Raises:
        PkiError: ``path`` exists and is not a directory.
        OSError: It could not be created.
    """
    if path.is_dir():
        return False
    if path.exists():
        raise PkiError(f"{path} exists and is not a directory")
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)  # mkdir's mode is filtered by the umask
    return True


def refuse_existing(paths: list[Path]) -> None:
    """Raise :class:`FileExistsError` naming every path of ``paths`` that exists.

    Raises:
        FileExistsError: At least one path exists.
    """
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if not existing:
        return
    parents = {p.parent for p in existing}
    if len(existing) > 1 and len(parents) == 1:
        what = f"files in {parents.pop()}: " + ", ".join(p.name for p in existing)
    else:
        what = ", ".join(str(p) for p in existing)
    raise FileExistsError(
        f"refusing to overwrite existing {what}; use --force to replace (the old keys are lost)"
    )


def write_file_atomic(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode``.

    Args:
        path: Destination.
        data: Contents.
        mode: Permission bits, applied at creation (not widened later).
        force: Replace an existing file; otherwise fail if it exists.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
        OSError: Any other I/O error (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails if path exists
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise ValueError(f"invalid identity name {name!r}: must be a plain file name")


def _read(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from None


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
