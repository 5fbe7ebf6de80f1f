"""Stream ids (spec 01 "Resume primitives", spec 03 §3.4).

A stream id is a 64-bit unsigned integer that follows a stream across a resume or a P2P
migration; 0 means "unset" and disables pair routing on the relay (spec 02 §5). The reference
hashes tenant, agent URIs, a counter and the clock; the spec's [REC] is a uniformly random
non-zero id unique among the session's active streams, which is wire-compatible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from typing import Final

__all__ = ["STREAM_ID_MAX", "new_stream_id"]

STREAM_ID_MAX: Final = (1 << 64) - 1
"""The largest stream id: ``stream_id`` is a protobuf ``uint64``."""

_MAX_ATTEMPTS: Final = 64
"""Draws before giving up. With a real random source the chance that even two draws are needed
is at most (active streams + 1) / 2**64; the bound only stops a broken ``rand`` from looping."""


def new_stream_id(active: Container[int] = (), *, rand: Callable[[int], bytes] = os.urandom) -> int:
    """Pick a uniformly random non-zero 64-bit stream id not in ``active`` (spec 03 §3.4 [REC]).

    Draws 8 bytes from ``rand`` until the value is neither 0 nor in ``active`` (rejection
    sampling keeps the result uniform over the allowed ids).

    Args:
        active: The ids of the session's active streams.
        rand: Source of random bytes, called with 8; tests pass a deterministic one.

    Returns:
        An id in ``[1, 2**64 - 1]`` that is not in ``active``.

    Raises:
        ValueError: ``rand`` returned other than 8 bytes.
        RuntimeError: ``rand`` produced only 0 or active ids for many draws in a row.
    """
    for _ in range(_MAX_ATTEMPTS):
        raw = rand(8)
        if len(raw) != 8:
            raise ValueError(f"rand(8) returned {len(raw)} bytes")
        candidate = int.from_bytes(raw, "big")
        if candidate != 0 and candidate not in active:
            return candidate
    raise RuntimeError(
        f"no usable stream id after {_MAX_ATTEMPTS} draws: the random source is broken"
    )
