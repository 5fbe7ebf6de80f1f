"""``--config FILE`` end to end: a relay and two agents started from TOML files only.

No identity flag on any command line: the certificate paths come from
``$OUTRELAY_CERT``/``$OUTRELAY_KEY``/``$OUTRELAY_CA`` (as a sidecar is
configured), everything else from the file; an echo passes through. A file
with an unknown key exits 2 naming the key and the file, as a bad flag does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from devpki import DevPki, Identity

from .harness import (
    AGENT_CMD,
    AGENT_SHUTDOWN_GRACE,
    LOG_LEVEL,
    RELAY_CMD,
    Agent,
    Backends,
    Cluster,
    Relay,
    connect,
    free_udp_port,
    run_cli,
)

pytestmark = pytest.mark.e2e


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _identity_env(monkeypatch: pytest.MonkeyPatch, cert: Path, key: Path, ca: Path) -> None:
    """Children copy ``os.environ`` when they start (``harness.child_env``)."""
    monkeypatch.setenv("OUTRELAY_CERT", str(cert))
    monkeypatch.setenv("OUTRELAY_KEY", str(key))
    monkeypatch.setenv("OUTRELAY_CA", str(ca))


def _start_agent(
    cluster: Cluster, name: str, identity: Identity, config: Path, relay: Relay
) -> Agent:
    agent = Agent(
        name, [*AGENT_CMD, "--config", str(config)], cluster.workdir / f"{name}.log",
        identity, identity.uri,
    )  # fmt: skip
    cluster.procs.append(agent)
    agent.wait_for("agent started")
    return agent


@pytest.mark.timeout(90)
def test_relay_and_agents_from_config_files_and_environment_carry_an_echo(
    cluster: Cluster,
    backends: Backends,
    pki: DevPki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    echo = backends.echo()
    port = free_udp_port()
    relay_toml = _toml(
        tmp_path / "relay.toml",
        f'listen = "127.0.0.1:{port}"\nregion = "from-config"\n'
        f'log-format = "json"\nlog-level = "{LOG_LEVEL}"\n',
    )
    _identity_env(monkeypatch, pki.relay_cert, pki.relay_key, pki.ca_cert)
    relay = Relay(
        "relay", [*RELAY_CMD, "--config", str(relay_toml)], cluster.workdir / "r.log", port
    )
    cluster.procs.append(relay)
    relay.wait_for("relay listening", addr=relay.addr, region="from-config")

    common = (
        f'relay = "{relay.addr}"\nlog-format = "json"\nlog-level = "{LOG_LEVEL}"\n'
        f"shutdown-grace = {AGENT_SHUTDOWN_GRACE}\n"
    )
    provider_id, consumer_id = pki.agent(0), pki.agent(1)
    _identity_env(monkeypatch, provider_id.cert, provider_id.key, pki.ca_cert)
    provider_toml = _toml(
        tmp_path / "provider.toml",
        f'{common}uri = "{provider_id.uri}"\nexpose = ["e={echo.addr}"]\n',
    )
    provider = _start_agent(cluster, "provider", provider_id, provider_toml, relay)
    provider.wait_for("service registered", name="e")

    _identity_env(monkeypatch, consumer_id.cert, consumer_id.key, pki.ca_cert)
    consumer_toml = _toml(
        tmp_path / "consumer.toml",
        f'{common}uri = "{consumer_id.uri}"\nconsume = ["e@127.0.0.1:0"]\n',
    )
    consumer = _start_agent(cluster, "consumer", consumer_id, consumer_toml, relay)
    consumer.read_bound_ports()
    relay.wait_for("agent connected", uri=consumer_id.uri)

    for proc in (relay, provider, consumer):
        assert "--cert" not in " ".join(proc.argv)
    payload = os.urandom(256 * 1024)
    got = b""
    with connect(consumer.port("e")) as sock:
        sock.sendall(payload)
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, f"echo closed after {len(got)} bytes\n{cluster.log_tail()}"
            got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("json_logs", [False, True], ids=["text", "json"])
def test_unknown_config_key_exits_2_naming_key_and_file(tmp_path: Path, json_logs: bool) -> None:
    bad = _toml(tmp_path / "bad.toml", 'log-level = "info"\nexpsoe = ["x=127.0.0.1:1"]\n')
    for cmd in (AGENT_CMD, RELAY_CMD):
        argv = [*cmd, "--config", str(bad)]
        if json_logs:
            argv += ["--log-format", "json"]
        proc = run_cli(argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert f"config {bad}: unknown key 'expsoe'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    syntax = _toml(tmp_path / "syntax.toml", "relay = \n")
    proc = run_cli([*AGENT_CMD, "--config", str(syntax)])
    assert proc.returncode == 2, proc.stderr
    assert "not valid TOML" in proc.stderr and "line 1" in proc.stderr, proc.stderr
    proc = run_cli([*RELAY_CMD, "--config", str(tmp_path / "absent.toml")])
    assert proc.returncode == 2, proc.stderr
    assert "cannot read it" in proc.stderr, proc.stderr
