"""Render a :class:`~layerzero.bench.runner.BenchReport` in the seed's "Benchmark Results Format".

Hardware and software as YAML, the benchmark configuration as YAML, the
results table (``Operation | Batch | Seq Len | p50 (us) | p99 (us) | p99.9 (us) |
Cache Hit``), then the overhead table with budgets and PASS/MISS.
"""

from __future__ import annotations

from typing import Any

import yaml

from layerzero.bench.runner import BenchReport

__all__ = ["render_markdown"]


def _plain(value: Any) -> Any:
    """Builtin types only (``torch.__version__`` is a str subclass that safe_dump refuses)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return type(value)(value) if type(value) in (int, float) else float(value)
    return str(value)


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None, width=120).rstrip()


def render_markdown(report: BenchReport) -> str:
    hw = dict(report.system["hardware"])
    hw.pop("gpus", None)
    sw = report.system["software"]
    lines = ["### Hardware Specification", "", "```yaml", _yaml({"hardware": hw, "software": sw}), "```", "",
             "### Benchmark Configuration", "", "```yaml", _yaml({"config": report.config, "workload": report.workload}),
             "```", "", "### Results Table", "",
             "| Operation | Batch | Seq Len | p50 (us) | p99 (us) | p99.9 (us) | Cache Hit | Kernel |",
             "|-----------|-------|---------|----------|----------|------------|-----------|--------|"]
    for r in report.results:
        lines.append(f"| {r.operation} | {r.batch} | {r.seq_len} | {r.p50_us:.2f} | {r.p99_us:.2f} | "
                     f"{r.p999_us:.2f} | {r.cache_hit * 100:.1f}% | {r.kernel} |")
    lines += ["", "### Overhead (layerzero path vs the direct call, interleaved in one run)", "",
              "| Path | Direct call | Direct p50 (us) | layerzero p50 (us) | p99 (us) | Overhead (ns) | Ratio | Budget | |",
              "|------|-------------|-----------------|--------------------|----------|---------------|-------|--------|---|"]
    for o in report.overhead:
        verdict = "info" if o.info else ("PASS" if o.passed else "MISS")
        if o.result is not None and o.direct not in ("empty call",):
            r = o.result
            lines.append(f"| {o.path} | {o.direct} | {r.direct.p50_ns / 1e3:.2f} | {r.candidate.p50_ns / 1e3:.2f} | "
                         f"{r.candidate.p99_ns / 1e3:.2f} | {r.overhead_ns:+.0f} | {r.ratio:.3f} | {o.budget} | "
                         f"{verdict} |" + (f" {o.note}" if o.note else ""))
        elif o.result is not None:
            r = o.result
            lines.append(f"| {o.path} | {o.direct} | - | - | {r.candidate.p99_ns / 1e3:.3f} | {r.overhead_ns:+.0f} | "
                         f"{o.value:.4f} | {o.budget} | {verdict} |")
        else:
            lines.append(f"| {o.path} | {o.direct} | - | - | - | {o.note} | - | {o.budget} | {verdict} |")
    budgeted = [o for o in report.overhead if not o.info]
    passed = sum(o.passed for o in budgeted)
    lines += ["", f"{passed}/{len(budgeted)} budget lines PASS; bench took {report.elapsed_s:.1f} s."]
    return "\n".join(lines)
