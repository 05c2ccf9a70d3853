"""``layerzero tune``: measure kernels on this machine and store the times in the performance database.

    layerzero tune --ops attention.causal,rms_norm --grid quick
    layerzero tune --ops rms_norm --shapes rows=4096,hidden=4096 --shapes rows=1,hidden=8192 --dtype bf16
    layerzero tune --ops attention.full --device cuda --budget-s 60 --db /var/cache/lz/perf.db --json
    layerzero tune --ops rms_norm,swiglu --compiled --shapes rows=8192,hidden=4096,grad=1

``--compiled`` measures the buckets ``torch.compile`` reads (row-wise operations): Inductor's code for
PyTorch's op against opaque kernels inside the dispatched op, each as a compiled graph runs it.

For every shape bucket and every eligible kernel: fresh random inputs, a
correctness check against the float64 reference (a wrong kernel is stored as
failed and never selected), then timing (``triton.testing.do_bench`` on CUDA,
``perf_counter_ns`` on CPU). A progress bar runs on stderr unless ``--json``.

Exit codes: 0 ok (kernels that failed their check are reported, not fatal);
1 nothing could be measured; 2 usage error.
"""

from __future__ import annotations

import json
from typing import Any

import click

from layerzero.cli.params import Seconds

__all__ = ["register", "tune_command"]


def _split(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


@click.command("tune")
@click.option("--ops", "ops", default="attention.causal,rms_norm", show_default=True,
              help="Comma-separated operations to tune.")
@click.option("--grid", "grid_name", type=click.Choice(["quick", "default"]), default="quick", show_default=True,
              help="Built-in shape grid (ignored with --shapes).")
@click.option("--shapes", "shapes", multiple=True,
              help="Explicit shape, repeatable: 'b=8,s=2048,h=32,kv=8,d=128' or 'rows=4096,hidden=4096'.")
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--dtype", "dtypes", multiple=True,
              help="dtype(s), repeatable or comma-separated (default: bf16,fp16 on CUDA, float32 on CPU).")
@click.option("--budget-s", type=Seconds(), default=None,
              help="Stop measuring after this many seconds.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Performance database file (default: $LAYERZERO_PERF_DB or the user cache directory).")
@click.option("--compiled", is_flag=True,
              help="Measure compiled-mode buckets: kernels as a torch.compile graph runs them (row-wise ops).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def tune_command(ops: str, grid_name: str, shapes: tuple[str, ...], device: str | None, dtypes: tuple[str, ...],
                 budget_s: float | None, db_path: str | None, compiled: bool, as_json: bool) -> None:
    """Measure every eligible kernel for a shape grid and store the times for selection."""
    import torch

    from layerzero.context import dtype_from_name
    from layerzero.errors import LayerZeroError
    from layerzero.ops import op_for
    from layerzero.tuning import grids
    from layerzero.tuning.perfdb import PerfDB
    from layerzero.tuning.tuner import Tuner

    operations = _split((ops,))
    if not operations:
        raise click.BadParameter("name at least one operation", param_hint="--ops")
    for operation in operations:
        try:
            op_for(operation)
        except LayerZeroError as exc:
            raise click.BadParameter(str(exc), param_hint="--ops") from None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch_dev = torch.device(dev)
    except RuntimeError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    if torch_dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    try:
        dts = tuple(dtype_from_name(d) for d in _split(dtypes)) or None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dtype") from None
    plan: dict[str, list[Any]] = {}
    try:
        for operation in operations:
            if shapes:
                default = (torch.bfloat16, torch.float16) if torch_dev.type == "cuda" else (torch.float32,)
                plan[operation] = grids.contexts_for_shapes(operation, list(shapes), device=dev,
                                                            dtypes=dts or default)
            else:
                plan[operation] = grids.grid(operation, grid_name, device=dev, dtypes=dts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shapes") from None
    if compiled:
        try:
            plan = {operation: grids.compiled_contexts(operation, c) for operation, c in plan.items()}
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--compiled") from None
    if db_path is not None and not db_path.strip():
        raise click.BadParameter("an empty path names no file", param_hint="--db")
    if not any(plan.values()):
        raise click.BadParameter("no shape applies to these operations (attention shapes need a sequence "
                                 "length, row-wise ones a hidden size)", param_hint="--shapes")

    from layerzero.runtime import get_runtime
    from layerzero.tuning.perfdb import default_path

    db = PerfDB(db_path if db_path is not None else default_path(get_runtime().config.perf_db_path))
    report = _run(Tuner, db, budget_s, plan, as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        click.echo(report.table())
    if report.store_error is not None:  # every measurement was printed above; the database took none (or not all)
        raise click.ClickException(f"the measurements were not stored: {report.store_error}")
    if report.counts["ok"] == 0 and report.counts["failed"] == 0:
        raise click.exceptions.Exit(1)


def _run(tuner: Any, db: Any, budget_s: float | None, plan: dict[str, Any], as_json: bool) -> Any:
    """The tuning run, with a progress bar on stderr unless the output is JSON."""
    if as_json:
        return tuner(db, budget_s=budget_s).tune(plan)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]tune[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=sum(len(v) for v in plan.values()))

        def progress(done: int, _total: int, label: str) -> None:
            bar.update(task, completed=done, description=label[:60])

        return tuner(db, budget_s=budget_s, progress=progress).tune(plan)


def register(cli: click.Group) -> None:
    """Add ``tune`` to the ``layerzero`` command group."""
    cli.add_command(tune_command)
