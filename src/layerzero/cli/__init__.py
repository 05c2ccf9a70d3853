"""The ``layerzero`` command line (click).

One module per command group, each with ``register(cli)``: ``doctor``,
``inspect`` (``list``, ``explain``), ``config`` (``config validate``,
``config fields``), ``bench``, ``tune`` and ``metrics``. This package wires
them into one group; the modules never import it back. Every command takes
``--json`` for machine-readable output. Exit codes: 0 ok, 1 a check failed
(invalid config, a failed budget), 2 usage error.
"""

from __future__ import annotations

import click

from layerzero.cli import bench, config, doctor, inspect, metrics, tune

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerzero")
def cli() -> None:
    """layerzero: kernel orchestration for PyTorch."""


def _register_subcommands() -> None:
    for module in (doctor, inspect, config, bench, tune, metrics):
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
