"""Log capture for the interception tests: a handler that keeps every record.

``tests/intercept/conftest.py`` installs one on the ``outrelay`` logger as the ``logs``
fixture (whatever ``setup_logging`` did to that logger earlier in the session); test
modules that name the type import it from here.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Records"]


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
