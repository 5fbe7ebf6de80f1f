"""Shared fixtures for the PKI tests: a dev CA, a foreign CA, and a subprocess env."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Until the package is installed in the venv (pip install -e .), import it from
# the source tree. Harmless once it is installed.
_SRC = Path(__file__).resolve().parents[2] / "src"
if importlib.util.find_spec("outrelay") is None:  # pragma: no cover - depends on the venv
    sys.path.insert(0, str(_SRC))

from outrelay.pki import Issued, create_ca  # noqa: E402


@pytest.fixture(scope="session")
def ca() -> Issued:
    """The dev CA most tests issue from (EC keys are cheap; one per session is enough)."""
    return create_ca()


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
