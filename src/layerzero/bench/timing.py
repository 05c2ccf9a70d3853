"""Timing helpers for ``layerzero bench``: per-call percentiles and interleaved A/B overhead.

Overheads are measured side by side in one run: the direct call and the
layerzero path alternate in batches (ABAB, then BABA), so drift, frequency
changes and noisy neighbours hit both equally. The overhead is the median of
the per-round differences; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Percentiles", "PairResult", "percentiles", "measure_calls", "interleaved"]


@dataclass(frozen=True)
class Percentiles:
    p50_ns: float
    p99_ns: float
    p999_ns: float
    mean_ns: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ns": self.p50_ns, "p99_ns": self.p99_ns, "p999_ns": self.p999_ns, "mean_ns": self.mean_ns,
                "n": self.n}


def percentiles(samples: list[float]) -> Percentiles:
    s = sorted(samples)
    n = len(s)
    if n == 0:
        return Percentiles(0.0, 0.0, 0.0, 0.0, 0)
    return Percentiles(s[n // 2], s[min(n - 1, int(n * 0.99))], s[min(n - 1, int(n * 0.999))],
                       statistics.fmean(s), n)


def measure_calls(fn: Callable[[], Any], iterations: int, warmup: int, sync: Callable[[], None] | None = None
                  ) -> Percentiles:
    """Per-call latency of ``fn`` (synchronizing after each call when ``sync`` is given)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    pc = time.perf_counter_ns
    out = [0] * iterations
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if sync is None:
            for i in range(iterations):
                t = pc()
                fn()
                out[i] = pc() - t
        else:
            for i in range(iterations):
                t = pc()
                fn()
                sync()
                out[i] = pc() - t
    finally:
        if gc_was:
            gc.enable()
    return percentiles([float(x) for x in out])


@dataclass(frozen=True)
class PairResult:
    direct: Percentiles
    candidate: Percentiles
    overhead_ns: float
    ratio: float

    def to_dict(self) -> dict[str, Any]:
        return {"direct": self.direct.to_dict(), "candidate": self.candidate.to_dict(),
                "overhead_ns": self.overhead_ns, "ratio": self.ratio}


def interleaved(direct: Callable[[], Any], candidate: Callable[[], Any], rounds: int = 200, batch: int = 20,
                warmup: int = 200, sync: Callable[[], None] | None = None) -> PairResult:
    """Alternate batches of ``direct`` and ``candidate``; per-call times are batch averages."""
    for _ in range(warmup):
        direct()
        candidate()
    if sync is not None:
        sync()
    pc = time.perf_counter_ns
    d_samples: list[float] = []
    c_samples: list[float] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = ((direct, d_samples), (candidate, c_samples))
            if r % 2:
                order = order[::-1]
            for fn, bucket in order:
                t = pc()
                for _ in range(batch):
                    fn()
                if sync is not None:
                    sync()
                bucket.append((pc() - t) / batch)
    finally:
        if gc_was:
            gc.enable()
    diffs = [c - d for d, c in zip(d_samples, c_samples, strict=True)]
    ratios = [c / d for d, c in zip(d_samples, c_samples, strict=True) if d > 0]
    return PairResult(percentiles(d_samples), percentiles(c_samples), statistics.median(diffs),
                      statistics.median(ratios) if ratios else float("nan"))
