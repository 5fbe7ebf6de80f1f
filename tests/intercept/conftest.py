"""Fixtures for the interception tests: ``logs``, log capture that works whatever
``setup_logging`` did to the ``outrelay`` logger earlier in the session."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from .records import Records


@pytest.fixture
def logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("outrelay")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
