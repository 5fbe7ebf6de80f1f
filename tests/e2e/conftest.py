"""Fixtures for the end-to-end tests (real processes on 127.0.0.1).

* ``pki``: the session's dev PKI (``dev_pki``, see ``tests/devpki.py``).
* ``cluster``: a :class:`~e2e.harness.Cluster` for one test; every process it
  started is stopped afterwards (SIGTERM, 5 s, SIGKILL), and on failure the tail
  of every log is attached to the report (see ``tests/conftest.py``).
* ``backends``: threaded loopback servers, closed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from devpki import DevPki

from .harness import Backends, Cluster


@pytest.fixture(scope="session")
def pki(dev_pki: DevPki) -> DevPki:
    return dev_pki


@pytest.fixture(scope="module")
def quic_backend() -> str | None:
    """``--quic-backend`` for the agents (None: the agent's default, ``auto``)."""
    return None


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, pki: DevPki, quic_backend: str | None
) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "procs", pki, quic_backend)
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
