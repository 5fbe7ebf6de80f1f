"""``outrelay pki``: layout, printed URIs, exit codes, and OpenSSL's view of the files."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from outrelay.pki import ClientVerifier, first_uri_san, load_certificates, load_identity
from outrelay.pki.cli import add_pki_commands, main, run_pki

AGENT_URI_RE = re.compile(
    r"outrelay://acme/agent/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
)
DEV_FILES = [
    "agent-a.crt",
    "agent-a.key",
    "agent-b.crt",
    "agent-b.key",
    "ca.crt",
    "ca.key",
    "identities.json",
    "relay.crt",
    "relay.key",
]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outrelay.pki.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory, subprocess_env: dict[str, str]) -> Path:
    """One ``pki dev`` run through the real command line, shared by the read-only checks."""
    out = tmp_path_factory.mktemp("dev") / "pki"
    proc = _cli(subprocess_env, "pki", "dev", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    (out / "stdout.txt").write_text(proc.stdout)
    return out


# --------------------------------------------------------------------------- pki dev


def test_dev_layout_and_output(dev_dir: Path) -> None:
    stdout = (dev_dir / "stdout.txt").read_text()
    (dev_dir / "stdout.txt").unlink()
    assert sorted(p.name for p in dev_dir.iterdir()) == DEV_FILES
    assert _mode(dev_dir) == 0o700
    for key in ("ca.key", "relay.key", "agent-a.key", "agent-b.key"):
        assert _mode(dev_dir / key) == 0o600, key

    manifest = json.loads((dev_dir / "identities.json").read_text())
    agent_uris = [a["uri"] for a in manifest["agents"]]
    assert [a["name"] for a in manifest["agents"]] == ["agent-a", "agent-b"]
    assert all(AGENT_URI_RE.fullmatch(u) for u in agent_uris)
    assert len(set(agent_uris)) == 2
    assert manifest["relay"]["uri"] == "outrelay://local/relay/relay-1"
    assert manifest["ca"]["cert"] == str(dev_dir.resolve() / "ca.crt")

    # The printed agent URIs: one per line, after a header, same as the manifest.
    lines = stdout.splitlines()
    printed = [line for line in lines if line.startswith("outrelay://")]
    assert printed == agent_uris
    header = lines.index(printed[0]) - 1
    assert "Agent identities" in lines[header]
    assert str(dev_dir.resolve()) in stdout

    # Every file in the manifest matches its certificate's first URI SAN.
    for entry in [manifest["relay"], *manifest["agents"]]:
        chain, _key = load_identity(entry["cert"], entry["key"])
        assert first_uri_san(chain[0]) == entry["uri"]


def test_dev_leaves_pass_client_verifier(dev_dir: Path) -> None:
    verifier = ClientVerifier(load_certificates(dev_dir / "ca.crt"))
    manifest = json.loads((dev_dir / "identities.json").read_text())
    for entry in [manifest["relay"], *manifest["agents"]]:
        (leaf,) = load_certificates(entry["cert"])
        assert verifier.verify(leaf) == entry["uri"]
        assert verifier.verify_server(leaf, server_name="localhost")[0] == leaf


@needs_openssl
@pytest.mark.parametrize("leaf", ["relay", "agent-a", "agent-b"])
@pytest.mark.parametrize("purpose", [None, "sslclient", "sslserver"])
def test_dev_openssl_verify(dev_dir: Path, leaf: str, purpose: str | None) -> None:
    cmd = ["openssl", "verify", "-CAfile", str(dev_dir / "ca.crt")]
    if purpose is not None:
        cmd += ["-purpose", purpose]
    proc = subprocess.run(
        [*cmd, str(dev_dir / f"{leaf}.crt")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK")


@needs_openssl
def test_dev_openssl_shows_uri_sans(dev_dir: Path) -> None:
    manifest = json.loads((dev_dir / "identities.json").read_text())
    for entry in [manifest["relay"], *manifest["agents"]]:
        proc = subprocess.run(
            ["openssl", "x509", "-in", entry["cert"], "-text", "-noout"],
            capture_output=True,
            text=True,
            check=True,
        )
        san_line = proc.stdout.split("X509v3 Subject Alternative Name:")[1].splitlines()[1]
        # the identity is the first SAN entry, then DNS:localhost
        assert san_line.strip().startswith(f"URI:{entry['uri']}, DNS:localhost")
    ca_text = subprocess.run(
        ["openssl", "x509", "-in", manifest["ca"]["cert"], "-text", "-noout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CA:TRUE, pathlen:0" in ca_text


def test_dev_refuses_overwrite_then_force(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "pki"
    first = _cli(subprocess_env, "pki", "dev", "--out", str(out), "--tenant", "acme")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = _cli(subprocess_env, "pki", "dev", "--out", str(out))
    assert again.returncode == 1
    assert "Traceback" not in again.stderr
    assert "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert again.stdout == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    forced = _cli(subprocess_env, "pki", "dev", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(after) == DEV_FILES
    assert all(after[name] != before[name] for name in DEV_FILES)
    assert _mode(out / "ca.key") == 0o600


def test_dev_partial_existing_key_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.joinpath("agent-b.key").write_text("keep me")
    assert main(["pki", "dev", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "agent-b.key" in err and "--force" in err
    assert [p.name for p in tmp_path.iterdir()] == ["agent-b.key"]


def test_dev_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "pki",
                "dev",
                "--out",
                str(tmp_path),
                "--tenant",
                "t2",
                "--region",
                "eu",
                "--days",
                "7",
            ]
        )
        == 0
    )
    printed = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("outrelay://")
    ]
    assert len(printed) == 2 and all(u.startswith("outrelay://t2/agent/") for u in printed)
    manifest = json.loads((tmp_path / "identities.json").read_text())
    assert manifest["relay"]["uri"] == "outrelay://eu/relay/relay-1"
    (leaf,) = load_certificates(tmp_path / "agent-a.crt")
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert days == 7


def test_dev_bad_tenant_writes_nothing(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "pki"
    proc = _cli(subprocess_env, "pki", "dev", "--out", str(out), "--tenant", "Acme_Corp")
    assert proc.returncode == 1
    assert "invalid tenant 'Acme_Corp'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_usage_errors_exit_2(subprocess_env: dict[str, str]) -> None:
    assert _cli(subprocess_env, "pki", "dev").returncode == 2  # --out missing
    assert _cli(subprocess_env, "pki").returncode == 2
    proc = _cli(subprocess_env, "pki", "dev", "--out", "x", "--days", "0")
    assert proc.returncode == 2
    assert "must be at least 1" in proc.stderr


def test_help_shows_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pki", "dev", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ("DIR/ca.crt", "DIR/relay.key", "DIR/agent-b.crt", "DIR/identities.json", "0600"):
        assert name in text


# --------------------------------------------------------------------------- ca / relay / agent


def test_ca_relay_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["pki", "ca", "--out", str(ca_dir), "--days", "30"]) == 0
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    assert _mode(ca_dir / "ca.key") == 0o600
    capsys.readouterr()

    out = tmp_path / "leaves"
    rc = main(
        [
            "pki", "relay", "--ca-dir", str(ca_dir), "--out", str(out), "--region", "us",
            "--id", "r9", "--dns", "relay.internal", "--dns", "localhost", "--ip", "10.1.2.3",
            "--name", "edge",
        ]
    )  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[0] == "outrelay://us/relay/r9"
    verifier = ClientVerifier(load_certificates(ca_dir / "ca.crt"))
    (relay,) = load_certificates(out / "edge.crt")
    assert verifier.verify(relay) == "outrelay://us/relay/r9"
    verifier.verify_server(relay, server_name="relay.internal")
    verifier.verify_server(relay, server_name="10.1.2.3")

    agent_id = "6f1c0c57-6c1b-4c55-9a8e-0c2f6b1f7a10"
    rc = main(
        [
            "pki",
            "agent",
            "--ca-dir",
            str(ca_dir),
            "--out",
            str(out),
            "--tenant",
            "acme",
            "--uuid",
            agent_id,
        ]
    )
    assert rc == 0
    uri = f"outrelay://acme/agent/{agent_id}"
    assert capsys.readouterr().out.splitlines()[0] == uri
    (agent,) = load_certificates(out / "agent.crt")
    assert verifier.verify(agent) == uri
    assert _mode(out / "agent.key") == 0o600

    # same name again: refused, then --force
    args = ["pki", "agent", "--ca-dir", str(ca_dir), "--out", str(out), "--tenant", "acme"]
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    new_uri = capsys.readouterr().out.splitlines()[0]
    assert AGENT_URI_RE.fullmatch(new_uri) and new_uri != uri


def test_agent_errors(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    missing = _cli(
        subprocess_env, "pki", "agent", "--ca-dir", str(tmp_path / "nope"), "--out", str(tmp_path),
        "--tenant", "acme",
    )  # fmt: skip
    assert missing.returncode == 1
    assert "ca.crt not found" in missing.stderr and "Traceback" not in missing.stderr

    assert _cli(subprocess_env, "pki", "ca", "--out", str(tmp_path / "ca")).returncode == 0
    bad_uuid = _cli(
        subprocess_env, "pki", "agent", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path),
        "--tenant", "acme", "--uuid", "xyz",
    )  # fmt: skip
    assert bad_uuid.returncode == 1
    assert "not a valid UUID" in bad_uuid.stderr
    assert not (tmp_path / "agent.key").exists()


def test_add_pki_commands_on_foreign_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # How the umbrella CLI wires it: any parser, dispatch through args.func.
    parser = argparse.ArgumentParser(prog="outrelay")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo")
    add_pki_commands(sub)
    args = parser.parse_args(["pki", "ca", "--out", str(tmp_path)])
    assert args.func is run_pki
    assert args.func(args) == 0
    assert (tmp_path / "ca.crt").exists()
