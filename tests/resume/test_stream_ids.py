"""Tests for outrelay.resume.ids (spec 03 §3.4 [REC])."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.resume import STREAM_ID_MAX, new_stream_id


def scripted(values: Iterable[int]) -> Callable[[int], bytes]:
    """A ``rand`` that returns the given 64-bit values in order."""
    it = iter(values)

    def rand(n: int) -> bytes:
        assert n == 8
        return next(it).to_bytes(8, "big")

    return rand


def test_default_source() -> None:
    active = {new_stream_id() for _ in range(100)}
    assert all(1 <= sid <= STREAM_ID_MAX for sid in active)
    assert new_stream_id(active) not in active


def test_skips_zero_and_active_ids() -> None:
    rand = scripted([0, 0, 5, 7, 0, STREAM_ID_MAX, 9])
    assert new_stream_id({5, 7, STREAM_ID_MAX}, rand=rand) == 9


def test_extremes_are_allowed() -> None:
    assert new_stream_id(rand=scripted([1])) == 1
    assert new_stream_id(rand=scripted([STREAM_ID_MAX])) == STREAM_ID_MAX


def test_broken_source() -> None:
    with pytest.raises(RuntimeError, match="random source is broken"):
        new_stream_id(rand=lambda n: bytes(n))
    with pytest.raises(RuntimeError):
        new_stream_id({3}, rand=scripted([3] * 1000))
    with pytest.raises(ValueError, match="returned 4 bytes"):
        new_stream_id(rand=lambda n: bytes(4))


@given(
    active=st.frozensets(st.integers(min_value=0, max_value=20), max_size=15),
    draws=st.lists(st.integers(min_value=0, max_value=20), max_size=10),
)
def test_never_zero_never_active(active: frozenset[int], draws: list[int]) -> None:
    # Scripted draws from a tiny range collide often; a fresh value ends the script.
    rand = scripted([*draws, 21])
    sid = new_stream_id(active, rand=rand)
    assert sid != 0
    assert sid not in active
    expected = next((d for d in draws if d != 0 and d not in active), 21)
    assert sid == expected
