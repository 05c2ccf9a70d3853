"""Option types the commands share: :class:`Seconds`, a number of seconds (``--duration``, ``--budget-s``)."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["Seconds"]


class Seconds(click.FloatRange):
    """A positive number of seconds, at most ``max``: a ``FloatRange`` that also refuses NaN (NaN compares false
    with both bounds, so a plain ``FloatRange`` lets it through, and it would mean no limit at all)."""

    name = "seconds"

    def __init__(self, max: float | None = None) -> None:  # noqa: A002 - click's own name for the bound
        super().__init__(min=0.0, min_open=True, max=max)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if seconds != seconds:
            self.fail("nan is not a number of seconds", param, ctx)
        return seconds
