"""Fixtures for the end-to-end tests (real processes on 127.0.0.1).

* ``pki``: one dev PKI per session (``outrelay pki dev``).
* ``cluster``: a :class:`~e2e.harness.Cluster` for one test; every process it
  started is stopped afterwards (SIGTERM, 5 s, SIGKILL), and on failure the tail
  of every log is attached to the report (see ``tests/conftest.py``).
* ``backends``: threaded loopback servers, closed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Backends, Cluster, Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("e2e-pki") / "pki")


try:
    import qh3  # noqa: F401

    HAVE_QH3 = True
except ImportError:  # pragma: no cover - qh3 is a dev dependency
    HAVE_QH3 = False

QUIC_BACKEND_PARAMS = [
    "aioquic",
    pytest.param("qh3", marks=pytest.mark.skipif(not HAVE_QH3, reason="qh3 is not installed")),
]
"""For modules that run every agent on each QUIC client backend: override
``quic_backend`` with ``@pytest.fixture(scope="module", params=QUIC_BACKEND_PARAMS)``."""


@pytest.fixture(scope="module")
def quic_backend() -> str | None:
    """``--quic-backend`` for the agents (None: the agent's default, ``auto``)."""
    return None


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Pki, quic_backend: str | None
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
