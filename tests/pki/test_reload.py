"""outrelay.pki.reload: validation of new files, the snapshot, the file watch, the status."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path

import pytest
from devpki import DevPki

from outrelay.pki import create_ca, issue_relay, write_identity
from outrelay.pki.reload import (
    FileWatch,
    IdentitySnapshot,
    ReloadError,
    ReloadStatus,
    chains_to_ca,
    validate_identity,
)


def test_a_good_agent_identity_validates_with_its_serial(dev_pki: DevPki) -> None:
    ident = dev_pki.agent(0)
    got = validate_identity(str(ident.cert), str(ident.key), str(dev_pki.ca_cert))
    assert got.uri == ident.uri
    assert got.not_after > _dt.datetime.now(_dt.UTC)
    assert int(got.serial, 16) > 0


def test_another_identity_than_the_running_one_is_refused(dev_pki: DevPki) -> None:
    ident = dev_pki.agent(0)
    with pytest.raises(ReloadError, match="not the running identity"):
        validate_identity(
            str(ident.cert), str(ident.key), str(dev_pki.ca_cert), expect_uri=dev_pki.agent(1).uri
        )


def test_mismatched_key_garbage_missing_and_foreign_ca_are_refused(
    dev_pki: DevPki, tmp_path: Path
) -> None:
    a, b = dev_pki.agent(0), dev_pki.agent(1)
    ca = str(dev_pki.ca_cert)
    with pytest.raises(ReloadError, match="does not match"):
        validate_identity(str(a.cert), str(b.key), ca)
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(ReloadError, match=r"garbage\.crt"):
        validate_identity(str(garbage), str(a.key), ca)
    with pytest.raises(ReloadError, match="missing"):
        validate_identity(str(tmp_path / "missing.crt"), str(a.key), ca)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(create_ca("Other").cert_pem())
    with pytest.raises(ReloadError):
        validate_identity(str(a.cert), str(a.key), str(other_ca))


def test_an_expired_certificate_is_refused(dev_pki: DevPki, tmp_path: Path) -> None:
    now = _dt.datetime.now(_dt.UTC)
    old = dev_pki.issue_agent(
        "old",
        out=tmp_path,
        not_before=now - _dt.timedelta(days=3),
        not_after=now - _dt.timedelta(days=1),
    )
    with pytest.raises(ReloadError, match=r"expired|not valid|validity"):
        validate_identity(str(old.cert), str(old.key), str(dev_pki.ca_cert))


def test_relay_server_certificate_validates_against_its_dns_name(
    dev_pki: DevPki, tmp_path: Path
) -> None:
    got = validate_identity(
        str(dev_pki.relay_cert), str(dev_pki.relay_key), str(dev_pki.ca_cert), server=True
    )
    assert got.uri is None
    cert, key = write_identity(tmp_path, "r2", issue_relay(create_ca("Other")))
    with pytest.raises(ReloadError):
        validate_identity(str(cert), str(key), str(dev_pki.ca_cert), server=True)


def test_snapshot_copies_and_replaces_only_on_install(dev_pki: DevPki, tmp_path: Path) -> None:
    a, b = dev_pki.agent(0), dev_pki.agent(1)
    cert, key = tmp_path / "a.crt", tmp_path / "a.key"
    shutil.copyfile(a.cert, cert)
    shutil.copyfile(a.key, key)
    snap = IdentitySnapshot(str(cert), str(key), str(dev_pki.ca_cert))
    try:
        snap.install()
        assert Path(snap.cert_file).read_bytes() == a.cert.read_bytes()
        assert oct(os.stat(snap.key_file).st_mode & 0o777) == "0o600"
        shutil.copyfile(b.cert, cert)  # the operator's file changes ...
        assert Path(snap.cert_file).read_bytes() == a.cert.read_bytes()  # ... not ours
        shutil.copyfile(b.key, key)
        snap.install()
        assert Path(snap.cert_file).read_bytes() == b.cert.read_bytes()
        assert Path(snap.key_file).read_bytes() == b.key.read_bytes()
    finally:
        snap.remove()
    assert not snap.directory.exists()


def test_file_watch_sees_rewrites_and_symlink_swaps(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "tls.crt").write_bytes(b"one")
    (tmp_path / "v2" / "tls.crt").write_bytes(b"two")
    (tmp_path / "data").symlink_to("v1")
    path = tmp_path / "tls.crt"
    path.symlink_to("data/tls.crt")
    watch = FileWatch([str(path)])
    assert not watch.changed()
    # A Secret update: the data link moves, the visible path and its mtime do not.
    st = os.stat(tmp_path / "v1" / "tls.crt")
    os.utime(tmp_path / "v2" / "tls.crt", ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "data-new").symlink_to("v2")
    os.replace(tmp_path / "data-new", tmp_path / "data")
    assert watch.changed()
    assert not watch.changed()  # once per change
    # Same inode, same size, same mtime: only the content tells.
    target = tmp_path / "v2" / "tls.crt"
    st = os.stat(target)
    target.write_bytes(b"TWO")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert watch.changed()
    target.unlink()
    assert watch.changed()  # a vanished file is a change (the reload says why it fails)


def test_status_records_failures_and_the_current_identity(dev_pki: DevPki) -> None:
    status = ReloadStatus()
    assert status.last_ok is None
    status.record(False, "bad PEM")
    assert (status.reloads, status.failures) == (1, 1)
    assert status.last_ok is False
    assert status.last_reason == "bad PEM" and status.current is None
    ident = dev_pki.agent(0)
    loaded = validate_identity(str(ident.cert), str(ident.key), str(dev_pki.ca_cert))
    status.record(True, "SIGHUP", loaded)
    assert status.last_ok and status.current == loaded and status.failures == 1
    assert status.last_at is not None


def test_a_relay_certificate_outside_the_agent_ca_is_checked_for_validity_only(
    dev_pki: DevPki, tmp_path: Path
) -> None:
    now = _dt.datetime.now(_dt.UTC)
    cert, key = write_identity(tmp_path, "r2", issue_relay(create_ca("Public-ish")))
    assert not chains_to_ca(str(cert), str(key), str(dev_pki.ca_cert))
    got = validate_identity(
        str(cert), str(key), str(dev_pki.ca_cert), server=True, check_chain=False
    )
    assert got.uri is None
    old = issue_relay(
        create_ca("Old"),
        not_before=now - _dt.timedelta(days=3),
        not_after=now - _dt.timedelta(days=1),
    )
    cert, key = write_identity(tmp_path, "r3", old)
    with pytest.raises(ReloadError, match="expired"):
        validate_identity(str(cert), str(key), str(dev_pki.ca_cert), server=True, check_chain=False)
