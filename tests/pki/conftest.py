"""Shared fixtures for the PKI tests: the session's dev CA, a foreign CA, and a subprocess env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from devpki import DevPki

from outrelay.pki import Issued, create_ca


@pytest.fixture(scope="session")
def ca(dev_pki: DevPki) -> Issued:
    """The dev CA most tests issue from: the session's (``tests/devpki.py``)."""
    return dev_pki.ca


@pytest.fixture(scope="session")
def other_ca() -> Issued:
    """An unrelated CA with the *same* subject name as ``ca``."""
    return create_ca()


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m outrelay.pki.cli`` that finds this source tree."""
    import outrelay

    pkg_root = str(Path(outrelay.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    return env
