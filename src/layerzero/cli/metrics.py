"""``layerzero metrics``: print this process's Prometheus metrics once, or serve ``/metrics``.

A fresh CLI process has dispatched nothing, so ``--warmup`` first runs
``lz.readiness_check()`` (each core operation once, checked against its
reference): a quick way to see real series and to smoke-test a scrape setup.
In an application, serve from the process that does the work
(``layerzero.telemetry.start_metrics_server``).

Exit codes: 0 ok; 1 the port could not be bound, or ``--warmup`` found an
operation that fails; 2 usage error.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from layerzero.cli.params import Seconds

__all__ = ["register", "metrics_command", "families_json"]


def families_json(runtime: Any = None) -> dict[str, list[dict[str, Any]]]:
    """``{prometheus_name: [{"labels": {...}, "value": v}, ...]}`` for every layerzero family."""
    from layerzero.runtime import get_runtime
    from layerzero.telemetry.families import Histogram, read_families

    out: dict[str, list[dict[str, Any]]] = {}
    for fam in read_families(runtime or get_runtime()):
        rows = []
        for labels, value in fam.samples:
            if isinstance(value, Histogram):
                value = {"buckets": list(value.buckets), "sum": value.sum, "count": value.count}
            rows.append({"labels": dict(zip(fam.labels, labels, strict=True)), "value": value})
        out[fam.prom] = rows
    return out


def _warmup() -> bool:
    import layerzero as lz

    result = lz.readiness_check()
    for op, r in result["operations"].items():
        if not r["ok"]:
            click.echo(f"warmup: {op} failed: {r['error'] or 'output differs from the reference'}", err=True)
    return bool(result["ready"])


@click.command("metrics")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics on this port until interrupted (0 picks a free port).")
@click.option("--addr", default="127.0.0.1", show_default=True, help="Address to serve on (loopback by default).")
@click.option("--once", is_flag=True, help="Print the metrics once and exit (the default without --port).")
@click.option("--warmup", is_flag=True, help="Run each core operation once first (lz.readiness_check()).")
@click.option("--duration", type=Seconds(max=1e9), default=None,
              help="With --port: stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the metric families, or the server address).")
def metrics_command(port: int | None, addr: str, once: bool, warmup: bool, duration: float | None,
                    as_json: bool) -> None:
    """Print layerzero's Prometheus metrics (--once), or serve them on http://ADDR:PORT/metrics (--port)."""
    if once and port is not None:
        raise click.UsageError("choose one of --port N (serve) and --once (print)")
    if duration is not None and port is None:
        raise click.UsageError("--duration stops a server: it needs --port N")
    ready = _warmup() if warmup else True
    if port is None:
        if as_json:
            click.echo(json.dumps({"metrics": families_json()}, indent=2, default=str))
        else:
            from layerzero.telemetry.prometheus import metrics_text

            click.echo(metrics_text(), nl=False)
        if not ready:
            raise click.exceptions.Exit(1)
        return
    from layerzero.telemetry.prometheus import start_metrics_server

    try:
        server = start_metrics_server(port, addr)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps({"url": server.url, "addr": server.addr, "port": server.port, "ready": ready}))
    else:
        click.echo(f"serving layerzero metrics at {server.url} (Ctrl-C to stop)")
    try:
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2 if deadline is not None else 1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def register(cli: click.Group) -> None:
    """Add ``metrics`` to the ``layerzero`` command group."""
    cli.add_command(metrics_command)
