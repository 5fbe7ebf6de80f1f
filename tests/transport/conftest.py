"""Shared fixtures for the transport tests: a dev PKI written to disk once per module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from outrelay.pki import Issued, create_ca, issue_agent, issue_relay, write_identity
from outrelay.transport import QuicTlsConfig


@dataclass
class Pki:
    dir: Path
    ca: Issued
    relay: QuicTlsConfig
    agent: QuicTlsConfig
    agent_uri: str
    ca_file: str

    def client(self, name: str, issued: Issued, ca_file: str | None = None) -> QuicTlsConfig:
        crt, key = write_identity(self.dir, name, issued, force=True)
        return QuicTlsConfig(str(crt), str(key), ca_file or self.ca_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca()
    ca_file, _ = write_identity(d, "ca", ca)
    relay_crt, relay_key = write_identity(d, "relay", issue_relay(ca))
    agent, uri = issue_agent(ca, tenant="acme")
    agent_crt, agent_key = write_identity(d, "agent", agent)
    return Pki(
        d,
        ca,
        QuicTlsConfig(str(relay_crt), str(relay_key), str(ca_file)),
        QuicTlsConfig(str(agent_crt), str(agent_key), str(ca_file)),
        uri,
        str(ca_file),
    )
