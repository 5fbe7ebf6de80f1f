"""Fixtures for the relay tests: ``pki``, the session's dev PKI as ``rawagent.Pki``."""

from __future__ import annotations

import pytest
from devpki import DevPki

from .rawagent import Pki


@pytest.fixture(scope="session")
def pki(dev_pki: DevPki) -> Pki:
    return Pki(dev_pki)
