"""Writing and loading PEM files: modes, refusal to overwrite, bundle and key loading."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from outrelay.pki import (
    Issued,
    PkiError,
    issue_agent,
    issue_relay,
    load_ca,
    load_certificates,
    load_identity,
    load_private_key,
    write_identity,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Run with umask 000 so that only our explicit modes protect the files."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_write_identity_modes(tmp_path: Path, ca: Issued) -> None:
    agent, _ = issue_agent(ca, tenant="acme")
    target = tmp_path / "new" / "certs"
    cert_path, key_path = write_identity(target, "agent-a", agent)
    assert (cert_path, key_path) == (target / "agent-a.crt", target / "agent-a.key")
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    assert _mode(target) == 0o700
    assert cert_path.read_bytes() == agent.cert_pem()
    assert key_path.read_bytes() == agent.key_pem()
    assert sorted(p.name for p in target.iterdir()) == ["agent-a.crt", "agent-a.key"]  # no temp


def test_write_identity_keeps_existing_dir_mode(tmp_path: Path, ca: Issued) -> None:
    tmp_path.chmod(0o755)
    write_identity(tmp_path, "relay", issue_relay(ca))
    assert _mode(tmp_path) == 0o755


@pytest.mark.parametrize("existing", ["agent.crt", "agent.key"])
def test_write_identity_refuses_overwrite(tmp_path: Path, ca: Issued, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"old")
    agent, _ = issue_agent(ca, tenant="acme")
    with pytest.raises(FileExistsError, match=r"--force") as info:
        write_identity(tmp_path, "agent", agent)
    assert existing in str(info.value)
    # nothing was written or changed
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_bytes() == b"old"


def test_write_identity_force(tmp_path: Path, ca: Issued) -> None:
    first, _ = issue_agent(ca, tenant="acme")
    second, _ = issue_agent(ca, tenant="acme")
    _, key_path = write_identity(tmp_path, "agent", first)
    key_path.chmod(0o644)  # a loose old key must not keep its mode
    cert_path, key_path = write_identity(tmp_path, "agent", second, force=True)
    assert cert_path.read_bytes() == second.cert_pem()
    assert key_path.read_bytes() == second.key_pem()
    assert _mode(key_path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.crt", "agent.key"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_write_identity_bad_name(tmp_path: Path, ca: Issued, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        write_identity(tmp_path, name, issue_relay(ca))


def test_write_identity_dir_is_a_file(tmp_path: Path, ca: Issued) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(PkiError, match="not a directory"):
        write_identity(tmp_path / "f", "relay", issue_relay(ca))


def test_load_bundle_and_identity(tmp_path: Path, ca: Issued) -> None:
    relay = issue_relay(ca)
    cert_path, key_path = write_identity(tmp_path, "relay", relay)
    assert load_certificates(cert_path) == [relay.cert]
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"# comment\n" + relay.cert_pem() + ca.cert_pem())
    assert load_certificates(bundle) == [relay.cert, ca.cert]
    der = tmp_path / "ca.der"
    der.write_bytes(ca.cert.public_bytes(serialization.Encoding.DER))
    assert load_certificates(der) == [ca.cert]

    key = load_private_key(key_path)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == relay.key.private_numbers()

    chain, key = load_identity(bundle, key_path)
    assert chain == [relay.cert, ca.cert]


@pytest.mark.parametrize("content", [b"", b"   \n", b"hello", b"-----BEGIN PRIVATE KEY-----\n"])
def test_load_certificates_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.pem"
    path.write_bytes(content)
    with pytest.raises(PkiError, match=f"no certificate in {path}"):
        load_certificates(path)


def test_load_certificates_malformed_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(PkiError, match="malformed certificate"):
        load_certificates(bad)
    with pytest.raises(PkiError, match=r"cannot read .*missing\.pem"):
        load_certificates(tmp_path / "missing.pem")


def test_load_private_key_errors(tmp_path: Path, ca: Issued) -> None:
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(PkiError, match="encrypted"):
        load_private_key(enc)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"junk")
    with pytest.raises(PkiError, match="no usable private key"):
        load_private_key(junk)
    with pytest.raises(PkiError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")


def test_load_private_key_rsa(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert isinstance(load_private_key(path), rsa.RSAPrivateKey)


def test_load_identity_mismatch(tmp_path: Path, ca: Issued) -> None:
    a, _ = issue_agent(ca, tenant="acme")
    b, _ = issue_agent(ca, tenant="acme")
    cert_a, _ = write_identity(tmp_path, "a", a)
    _, key_b = write_identity(tmp_path, "b", b)
    with pytest.raises(PkiError, match="does not match the certificate"):
        load_identity(cert_a, key_b)


def test_load_ca(tmp_path: Path, ca: Issued) -> None:
    with pytest.raises(PkiError, match=r"ca\.crt not found; create a CA"):
        load_ca(tmp_path)
    write_identity(tmp_path, "ca", ca)
    loaded = load_ca(tmp_path)
    assert loaded.cert == ca.cert
    assert loaded.key.private_numbers() == ca.key.private_numbers()

    leaf_dir = tmp_path / "leaf"
    agent, _ = issue_agent(ca, tenant="acme")
    write_identity(leaf_dir, "ca", agent)
    with pytest.raises(PkiError, match="not a CA certificate"):
        load_ca(leaf_dir)
