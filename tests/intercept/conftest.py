"""Helpers for the interception tests: log capture that works whatever
``setup_logging`` did to the ``outrelay`` logger earlier in the session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def find(self, msg: str) -> list[dict[str, Any]]:
        """Attributes (``kv``) of every record whose message is ``msg``."""
        return [dict(getattr(r, "attrs", {}) or {}) for r in self.records if r.getMessage() == msg]

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


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
