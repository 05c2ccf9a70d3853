"""``layerzero bench``: the seed's benchmark format with the overhead budgets (see ``layerzero.bench``), and
``layerzero bench --model NAME``: a whole transformers model per variant and mode (:mod:`layerzero.bench.model`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from layerzero.bench.model_variants import MODELS, WORKLOADS
from layerzero.cli.params import Seconds

__all__ = ["register", "bench"]


@click.command()
@click.option("--quick", is_flag=True, help="A smaller grid and fewer iterations (under a minute on 2 cores).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the full report as JSON to this file ('-' prints JSON instead of tables); an "
                   "existing directory gets bench_<card>.json (with --model: model_bench_<card>.json).")
@click.option("--ops", default="attention.causal,attention.decode,rms_norm", show_default=True,
              help="Comma-separated operations for the results table.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Timed calls per results row.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="float32 (CPU default), float16 (CUDA default), bfloat16.")
@click.option("--no-memory", is_flag=True, help="Skip the memory budget lines.")
@click.option("--no-import", "no_import", is_flag=True, help="Skip the import-time budget line.")
@click.option("--no-ragged", "no_ragged", is_flag=True,
              help="Skip the lz.attention_varlen / lz.attention_paged comparison lines.")
@click.option("--strict", is_flag=True, help="Exit 1 when any budget line reads MISS.")
@click.option("--model", type=click.Choice(MODELS), default=None,
              help="Benchmark a whole model from a config (random weights) instead: per variant and mode.")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="With --model: interleaved rounds (10 on the CPU, 5 on CUDA).")
@click.option("--workloads", default=",".join(WORKLOADS), show_default=True,
              help="With --model: comma-separated workloads.")
@click.option("--modes", default=None, help="With --model: eager,compiled (default: eager on the CPU, both on CUDA).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="With --model: decoder layers.")
@click.option("--vocab", type=click.IntRange(min=2), default=None,
              help="With --model: vocabulary size (default 32000 on CUDA; Llama 3 has 128256).")
@click.option("--seq", type=click.IntRange(min=1), default=None,
              help="With --model: tokens per sequence of prefill and the training step (default 1024 on CUDA).")
@click.option("--budget-s", type=Seconds(), default=None,
              help="With --model: start no warm-up or later round after this many seconds (default 420 on CUDA, "
                   "none on the CPU).")
@click.option("--no-liger", is_flag=True, help="With --model: leave out the Liger rows.")
@click.option("--compile-scope", type=click.Choice(["model", "layers"]), default="model", show_default=True,
              help="With --model: compiled mode is torch.compile(model), or each decoder layer compiled (faster "
                   "to compile: one graph serves every layer).")
def bench(quick: bool, json_path: Path | None, ops: str, device: str, iterations: int | None, dtype: str | None,
          no_memory: bool, no_import: bool, no_ragged: bool, strict: bool, model: str | None, rounds: int | None,
          workloads: str, modes: str | None, layers: int | None, budget_s: float | None, no_liger: bool,
          compile_scope: str, vocab: int | None, seq: int | None) -> None:
    """Benchmark layerzero here: latency table, overhead budgets (PASS/MISS), memory and import time.

    With --model NAME: prefill, greedy decode and a training step of a whole model for sdpa, layerzero and
    layerzero + patch() (and Liger's patch where installed), eager and compiled.

    Exit code 0 (with --strict: 1 when a budget line reads MISS; with --model: 1 when the model is refused).
    """
    _check_device(device)
    _check_json_path(json_path)
    if model is not None:
        from layerzero.bench.model import ModelBenchOptions

        opts = ModelBenchOptions(model=model, device=device, quick=quick, rounds=rounds, workloads=_names(workloads),
                                 modes=_names(modes) if modes else None, dtype=dtype, layers=layers,
                                 budget_s=budget_s, liger=not no_liger, compile_scope=compile_scope, vocab=vocab,
                                 seq=seq)
        _model_bench(opts, json_path)
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from layerzero.bench.report import render_markdown
    from layerzero.bench.runner import BENCH_OPS, BenchOptions, run_bench

    chosen = tuple(o.strip() for o in ops.split(",") if o.strip())
    unknown = [o for o in chosen if o not in BENCH_OPS]
    if unknown or not chosen:
        raise click.BadParameter(f"{', '.join(map(repr, unknown)) or 'none given'}: the bench times "
                                 f"{', '.join(BENCH_OPS)}", param_hint="--ops")
    opts = BenchOptions(device=device, ops=chosen, quick=quick,
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
            path = _json_file(json_path, "bench", device)
            _write_json(path, data)
            click.echo(f"\nJSON written to {path}")
    if strict and not report.all_passed:
        raise click.exceptions.Exit(1)


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is available here")


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _check_json_path(json_path: Path | None) -> None:
    """A --json file that cannot be written (no such folder, a file where the folder should be, no permission)
    is a usage error before the run, not a traceback after it."""
    if json_path is None or str(json_path) == "-":
        return
    folder = json_path if json_path.is_dir() else json_path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise click.BadParameter(f"{str(json_path)!r}: {str(folder)!r} {what}", param_hint="--json")
    if not os.access(folder, os.W_OK | os.X_OK) or (json_path.is_file() and not os.access(json_path, os.W_OK)):
        raise click.BadParameter(f"{str(json_path)!r}: no permission to write there", param_hint="--json")


def _write_json(path: Path, data: Any) -> None:
    """Write the report's JSON; a failure (a full disk, a folder removed meanwhile) is one line, the table
    having been printed."""
    try:
        path.write_text(json.dumps(data, indent=2, default=str))
    except OSError as exc:
        raise click.ClickException(f"could not write {path}: {exc.strerror or exc}") from None


def _json_file(json_path: Path, stem: str, device: str) -> Path:
    """``json_path``, or ``<dir>/<stem>_<card>.json`` when it is an existing directory."""
    if not json_path.is_dir():
        return json_path
    from layerzero.bench.model import card_name

    return json_path / f"{stem}_{card_name(device)}.json"


def _model_bench(opts: Any, json_path: Path | None) -> None:
    """``bench --model``: run, print the table (or JSON with ``--json -``), save JSON after every round."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from layerzero.bench.model import ModelBenchReport, run_model_bench
    from layerzero.bench.model_report import render_model_markdown
    from layerzero.errors import UnsupportedModelError

    to_stdout_json = json_path is not None and str(json_path) == "-"
    path = None if json_path is None or to_stdout_json else _json_file(json_path, "model_bench", opts.device)

    def save(report: ModelBenchReport) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(path, report.to_dict())

    try:
        opts.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True, disable=to_stdout_json) as progress:
        task = progress.add_task("layerzero bench --model", total=None)
        try:
            report = run_model_bench(opts, lambda msg: progress.update(task, description=msg), save)
        except UnsupportedModelError as exc:
            raise click.ClickException(str(exc)) from exc
    save(report)
    if to_stdout_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    click.echo(render_model_markdown(report.to_dict()))
    if path is not None:
        click.echo(f"\nJSON written to {path}")


def register(cli: click.Group) -> None:
    cli.add_command(bench)
