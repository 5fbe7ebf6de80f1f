"""The QUIC client libraries a test can run on: aioquic always, qh3 when installed.

``QUIC_BACKEND_PARAMS`` parametrizes a test or fixture over them (the qh3 case is
skipped, not failed, where qh3 is missing); ``HAVE_QH3`` is for tests that only make
sense on qh3. Servers are always aioquic.
"""

from __future__ import annotations

import pytest

__all__ = ["HAVE_QH3", "QUIC_BACKEND_PARAMS"]

try:
    import qh3  # noqa: F401

    HAVE_QH3 = True
except ImportError:  # pragma: no cover - qh3 is a dev dependency
    HAVE_QH3 = False

QUIC_BACKEND_PARAMS = [
    "aioquic",
    pytest.param("qh3", marks=pytest.mark.skipif(not HAVE_QH3, reason="qh3 is not installed")),
]
"""``@pytest.mark.parametrize("backend", QUIC_BACKEND_PARAMS)``, or a fixture's params."""
