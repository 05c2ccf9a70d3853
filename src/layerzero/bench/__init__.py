"""``layerzero bench``: latency tables in the seed's format and the overhead budgets, measured side by side."""

from __future__ import annotations

from layerzero.bench.runner import BenchOptions, BenchReport, run_bench

__all__ = ["BenchOptions", "BenchReport", "run_bench"]
