"""Hypothesis strategies shared by the resume tests."""

from __future__ import annotations

from hypothesis import strategies as st


def byte_strings(max_size: int) -> st.SearchStrategy[bytes]:
    """Byte strings up to ``max_size`` long, built from integers.

    ``st.binary`` is avoided on purpose: Hypothesis caches runs by their choice sequence, a tuple
    that then mixes bytes and ints; ``hash(b"") == hash(0)``, so two such keys can collide and be
    compared, which raises ``BytesWarning`` under ``python -bb`` (STYLE §4).
    """
    return st.lists(st.integers(min_value=0, max_value=255), max_size=max_size).map(bytes)
