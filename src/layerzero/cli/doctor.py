"""``layerzero doctor``: devices, backends and versions, and which kernels can run here (and why not).

Exit codes: 0 ok; 1 the report lists problems (an open circuit breaker, an
unhealthy backend, a backend installed but failing its probe).
"""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["register", "doctor", "emit"]


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text if text is not None else str(data))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """Devices, backends and versions, and which kernels can run here (and why not)."""
    import layerzero as lz
    from layerzero.tuning.source import read_perf_db_only

    read_perf_db_only()  # this process only reports: the database file is read, never built or moved aside
    report = lz.doctor()
    emit(report.to_dict(), as_json, str(report))
    if report.extra.get("problems"):  # an open breaker, an unhealthy or broken backend: exit 1
        raise click.exceptions.Exit(1)


def register(cli: click.Group) -> None:
    """Add ``doctor`` to the ``layerzero`` command group."""
    cli.add_command(doctor)
