"""Fixtures for the Python API tests: a real relay (and, where needed, real agents).

* ``cluster``/``backends``: as in ``tests/e2e`` (every process stopped afterwards).
* ``api_identity``: the API agent's :class:`outrelay.Identity` (``agent-b`` of the dev PKI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from devpki import DevPki
from e2e.harness import Backends, Cluster

import outrelay


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, dev_pki: DevPki) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "procs", dev_pki)
    request.node.e2e_log_tail = c.log_tail
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture
def api_identity(dev_pki: DevPki) -> outrelay.Identity:
    agent = dev_pki.agent(1)
    return outrelay.Identity.from_files(agent.cert, agent.key, dev_pki.ca_cert)
