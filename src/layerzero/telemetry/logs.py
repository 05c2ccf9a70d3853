"""Structured log lines on the ``layerzero`` logger: one ``key=value`` line per event.

Every line layerzero logs on purpose starts with ``event=<name>`` followed by
``key=value`` pairs (logfmt: values with spaces or quotes are double-quoted),
so a log pipeline can parse it and a person can grep it::

    event=fallback operation=attention.causal from_kernel=torch_sdpa to_kernel=torch_sdpa_math error=RuntimeError message="boom"

The fields also travel on the ``LogRecord`` (``record.layerzero_event`` and
``record.layerzero_fields``) for JSON formatters. Events are slow-path only
(fallbacks, breaker transitions, reloads, tuning decisions, policy changes):
nothing here runs per call, and a line is formatted only when a handler will
see it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["LOGGER_NAME", "logger", "format_event", "log_event", "EVENTS"]

LOGGER_NAME = "layerzero"
logger = logging.getLogger(LOGGER_NAME)

# The events layerzero logs, with the level each is logged at by default.
EVENTS: dict[str, int] = {
    "fallback": logging.WARNING,          # a kernel raised; the call moved to the next kernel
    "kernel_failed": logging.WARNING,     # a kernel raised and there was no kernel left to try
    "breaker_transition": logging.WARNING,
    "config_reload": logging.INFO,        # result=success|failure
    "tuning": logging.INFO,               # a tuning run or decision
    "policy_change": logging.INFO,
    "perf_lookup_failed": logging.WARNING,
    "cache_invalidated": logging.DEBUG,
    "shape_free_plan_dropped": logging.INFO,  # a call family went back to one plan per shape
}

_MAX_VALUE = 300


def _value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        v = ",".join(str(x) for x in v)
    text = " ".join(str(v).splitlines())  # every line break (\r, \u2028, ...): one record, one line
    if len(text) > _MAX_VALUE:
        text = text[: _MAX_VALUE - 3] + "..."
    if text == "" or any(c in text for c in ' "=\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_event(event: str, fields: Mapping[str, Any]) -> str:
    """``event=<event> k1=v1 k2=v2`` (logfmt; keys keep their order).

    Example:
        >>> format_event("fallback", {"operation": "rms_norm", "message": "out of memory"})
        'event=fallback operation=rms_norm message="out of memory"'
    """
    parts = [f"event={_value(event)}"]
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items())
    return " ".join(parts)


class _Line:
    """Formats lazily: the cost is paid only if a handler emits the record."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: Mapping[str, Any]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        return format_event(self.event, self.fields)


def log_event(event: str, level: int | None = None, /, **fields: Any) -> None:
    """Log one structured line for ``event`` on the ``layerzero`` logger.

    Args:
        event: the event name (see :data:`EVENTS`); it decides the default level.
        level: a ``logging`` level overriding the event's default.
        **fields: the line's ``key=value`` pairs, in order.

    Example:
        >>> log_event("config_reload", result="success", source="/etc/lz.yaml", duration_ms=1.7)
    """
    lvl = EVENTS.get(event, logging.INFO) if level is None else level
    if not logger.isEnabledFor(lvl):
        return
    logger.log(lvl, "%s", _Line(event, fields),
               extra={"layerzero_event": event, "layerzero_fields": dict(fields)})
