"""Shared fixtures for the transport tests: ``pki``, the session's dev PKI as ``tlspki.Pki``."""

from __future__ import annotations

import pytest
from devpki import DevPki

from .tlspki import Pki


@pytest.fixture(scope="session")
def pki(dev_pki: DevPki) -> Pki:
    return Pki(dev_pki)
