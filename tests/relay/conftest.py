"""Fixtures for the relay tests: a dev PKI per module (``pki``) for in-process relays."""

from __future__ import annotations

import pytest

from outrelay.pki import create_ca, issue_relay, write_identity

from .rawagent import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("p2p-pki")
    ca = create_ca()
    ca_file, _ = write_identity(d, "ca", ca)
    crt, key = write_identity(d, "relay", issue_relay(ca))
    return Pki(d, ca, str(crt), str(key), str(ca_file))
