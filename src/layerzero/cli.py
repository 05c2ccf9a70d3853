"""The ``layerzero`` command line (click).

Subcommands live beside the code they drive; this module wires them together.
Every command takes ``--json`` for machine-readable output. Exit codes: 0 ok,
1 a check failed (invalid config, a failed budget), 2 usage error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["main", "cli"]


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text if text is not None else str(data))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerzero")
def cli() -> None:
    """layerzero: kernel orchestration for PyTorch."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """Devices, backends and versions, and which kernels can run here (and why not)."""
    import layerzero as lz

    report = lz.doctor()
    emit(report.to_dict(), as_json, str(report))
    if report.extra.get("problems"):  # an open breaker, an unhealthy or broken backend: exit 1
        raise click.exceptions.Exit(1)


# Subcommand modules, each with ``register(cli)``; they live beside the code they drive.
_COMMAND_MODULES = ("layerzero.cli_inspect", "layerzero.cli_config", "layerzero.cli_bench", "layerzero.cli_tune",
                    "layerzero.cli_metrics")


def _register_subcommands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet / not shipped
                continue
            raise
        module.register(cli)


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="layerzero", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # click returns Exit codes without raising
            return rv
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
