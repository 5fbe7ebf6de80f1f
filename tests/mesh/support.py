"""What the mesh tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


async def wait_until(pred: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``pred`` every 10 ms; return the seconds it took; fail the test after ``within``."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
