"""``layerzero bench``: the seed's benchmark format with the overhead budgets (see ``layerzero.bench``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["register", "bench"]


@click.command()
@click.option("--quick", is_flag=True, help="A smaller grid and fewer iterations (under a minute on 2 cores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report as JSON to this file ('-' prints JSON instead of tables).")
@click.option("--ops", default="attention.causal,attention.decode,rms_norm", show_default=True,
              help="Comma-separated operations for the results table.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--iterations", type=int, default=None, help="Timed calls per results row.")
@click.option("--dtype", default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16.")
@click.option("--no-memory", is_flag=True, help="Skip the memory budget lines.")
@click.option("--no-import", "no_import", is_flag=True, help="Skip the import-time budget line.")
@click.option("--no-ragged", "no_ragged", is_flag=True,
              help="Skip the lz.attention_varlen / lz.attention_paged comparison lines.")
@click.option("--strict", is_flag=True, help="Exit 1 when any budget line reads MISS.")
def bench(quick: bool, json_path: Path | None, ops: str, device: str, iterations: int | None, dtype: str | None,
          no_memory: bool, no_import: bool, no_ragged: bool, strict: bool) -> None:
    """Benchmark layerzero here: latency table, overhead budgets (PASS/MISS), memory and import time.

    Exit code 0 (with --strict: 1 when a budget line reads MISS).
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from layerzero.bench.report import render_markdown
    from layerzero.bench.runner import BenchOptions, run_bench

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is available here")
    opts = BenchOptions(device=device, ops=tuple(o.strip() for o in ops.split(",") if o.strip()), quick=quick,
                        iterations=iterations, dtype=dtype, include_memory=not no_memory, include_import=not no_import,
                        include_ragged=not no_ragged)
    to_stdout_json = json_path is not None and str(json_path) == "-"
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=to_stdout_json) as progress:
        task = progress.add_task("layerzero bench", total=None)
        report = run_bench(opts, lambda msg: progress.update(task, description=msg))
    data = report.to_dict()
    if to_stdout_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(render_markdown(report))
        if json_path is not None:
            json_path.write_text(json.dumps(data, indent=2, default=str))
            click.echo(f"\nJSON written to {json_path}")
    if strict and not report.all_passed:
        raise click.exceptions.Exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(bench)
