"""A logging handler that keeps the messages of WARNING and above (shared by the fault and bad-input tests)."""

from __future__ import annotations

import logging

__all__ = ["LogLines"]


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
