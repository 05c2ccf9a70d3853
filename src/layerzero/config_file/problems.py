"""What validating a config or policy file found: errors and warnings, each with its path.

Validators add to one :class:`Problems`; :func:`raise_problems` then issues
the warnings (as :class:`ConfigWarning`) and raises every error together, so a
user sees all of a file's mistakes at once and nothing of an invalid file is
applied.
"""

from __future__ import annotations

import warnings

from layerzero.errors import ConfigError

__all__ = ["Problems", "ConfigWarning", "raise_problems"]


class ConfigWarning(UserWarning):
    """A policy or config document names something questionable that is not an error (by request)."""


class Problems:
    """Errors and warnings found while validating a document, each with its path."""

    def __init__(self, unknown_kernels: str = "error") -> None:
        if unknown_kernels not in ("error", "warn"):
            raise ConfigError(f"unknown_kernels must be 'error' or 'warn', got {unknown_kernels!r}")
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unknown_kernels = unknown_kernels

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}" if path else message)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}" if path else message)

    def missing_kernel(self, path: str, message: str) -> None:
        (self.error if self.unknown_kernels == "error" else self.warn)(path, message)

    def __bool__(self) -> bool:
        return bool(self.errors)


def raise_problems(problems: Problems, label: str, what: str, error: type[ConfigError]) -> None:
    """Raise every error together (warnings are issued as :class:`ConfigWarning`)."""
    for w in problems.warnings:
        warnings.warn(f"{label}: {w}", ConfigWarning, stacklevel=3)
    if problems.errors:
        n = len(problems.errors)
        lines = [f"{label}: invalid {what} ({n} error{'s' if n != 1 else ''}):"]
        lines.extend(f"  {e}" for e in problems.errors)
        raise error("\n".join(lines), errors=list(problems.errors), source=label)
