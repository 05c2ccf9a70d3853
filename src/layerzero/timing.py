"""Timing: how layerzero measures a kernel call (tuning) and its own overhead (``layerzero bench``).

Two kinds of measurement share this module:

* **one kernel, for selection** (:func:`time_call`, used by ``layerzero.tuning``): the median and spread
  of repeated runs. On a CUDA device, :func:`time_cuda` uses ``triton.testing.do_bench`` when Triton
  imports (CUDA events around each call, the L2 cache flushed between calls, warm-up and repetition
  given in milliseconds), asking it for every sample so that median and interquartile range come from
  the same run; without Triton it times with CUDA events itself. On the CPU, :func:`time_cpu` uses
  ``time.perf_counter_ns`` with warm-up calls and repeats until its time budget or sample cap is
  reached. The spread is half the interquartile range: ``median +/- spread`` covers the middle half of
  the samples, which is what the selection engine compares when it decides whether one kernel is
  faster beyond the noise.
* **per-call percentiles and interleaved A/B overhead** (:func:`measure_calls`, :func:`interleaved`,
  used by ``layerzero.bench``). Overheads are measured side by side in one run: the direct call and
  the layerzero path alternate in batches (ABAB, then BABA), so drift, frequency changes and noisy
  neighbours hit both equally. The overhead is the median of the per-round differences; the ratio is
  the median of per-round ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "quantile", "summarize", "time_cpu", "time_cuda", "time_cuda_device", "time_call",
           "Percentiles", "PairResult", "percentiles", "measure_calls", "interleaved"]


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in microseconds."""

    median_us: float
    spread_us: float
    samples: int
    method: str


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_values``, linearly interpolated (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_us: Sequence[float], method: str) -> Timing:
    """Median and half interquartile range of ``samples_us``."""
    xs = sorted(float(x) for x in samples_us)
    if not xs:
        raise ValueError("summarize() needs at least one sample")
    med = statistics.median(xs)
    spread = (quantile(xs, 0.75) - quantile(xs, 0.25)) / 2.0
    return Timing(med, spread, len(xs), method)


_POOL_SETTLED = False


def settle_cpu_pool(limit_s: float = 0.5) -> None:
    """Once per process: run a small parallel op until PyTorch's intra-op thread pool answers at full speed.

    On some machines (2 threads in a container here) a fresh process's first dozen parallel ops take about
    8 ms each instead of 15 us; the first kernel a tuner timed then read ~8 ms for every sample, inside its
    budget, and ranked last. Up to ``limit_s``; nothing with one thread."""
    global _POOL_SETTLED
    if _POOL_SETTLED:
        return
    _POOL_SETTLED = True
    if torch.get_num_threads() < 2:
        return
    x = torch.ones(64, 512)
    end = time.perf_counter() + limit_s
    fast = 0
    while fast < 3 and time.perf_counter() < end:
        t0 = time.perf_counter()
        x.sum(-1)
        fast = fast + 1 if time.perf_counter() - t0 < 0.001 else 0


def time_cpu(fn: Callable[[], Any], *, warmup: int = 3, min_samples: int = 7, max_samples: int = 200,
             budget_s: float = 0.05) -> Timing:
    """Time ``fn`` on the CPU: ``warmup`` calls, then repeats until ``budget_s`` (at least ``min_samples``)."""
    settle_cpu_pool()
    for _ in range(max(0, warmup)):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    clock = time.perf_counter_ns
    while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() < deadline):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1000.0)
    return summarize(samples, "perf_counter_ns")


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float = 10.0, rep_ms: float = 40.0) -> Timing:
    """Time ``fn`` on the current CUDA device (``triton.testing.do_bench`` when Triton imports)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            all_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (TypeError, ValueError, AssertionError):  # an older Triton without return_mode="all"
            q25, q50, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
            return Timing(q50 * 1000.0, (q75 - q25) * 500.0, 0, "triton.do_bench")
        if isinstance(all_ms, (int, float)):
            return Timing(float(all_ms) * 1000.0, 0.0, 1, "triton.do_bench")
        return summarize([t * 1000.0 for t in all_ms], "triton.do_bench")
    return _time_cuda_events(fn, warmup_ms, rep_ms)


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    return summarize(_event_times(fn, max(5, min(10000, int(rep_ms / est)))), "cuda_events")


def _event_times(fn: Callable[[], Any], n: int, before: Callable[[], Any] | None = None) -> list[float]:
    """``n`` calls of ``fn``, each between two CUDA events (``before`` runs ahead of each, outside them):
    their device times in microseconds."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if before is not None:
            before()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends, strict=True)]


_SPIN_RATE: float | None = None  # torch.cuda._sleep cycles per microsecond, once measured


def _spin_cycles_per_us() -> float:
    """The device's ``torch.cuda._sleep`` rate, measured once per process (about 2000 cycles/us on an H200)."""
    global _SPIN_RATE
    if _SPIN_RATE is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000)
        start.record()
        torch.cuda._sleep(2_000_000)
        end.record()
        torch.cuda.synchronize()
        _SPIN_RATE = 2_000_000 / max(start.elapsed_time(end) * 1000.0, 1e-3)
    return _SPIN_RATE


def time_cuda_device(fn: Callable[[], Any], *, warmup_ms: float = 5.0, rep_ms: float = 20.0) -> Timing:
    """The GPU time of ``fn`` with the host ahead of the device, as inside a training step.

    Timed alone, a call whose host side (Python, autograd, a Triton launcher) takes longer than its kernels
    measures the host: on an H200, Liger's RMSNorm forward + backward at 8192 x 2048 read 677 us under
    ``do_bench`` for 113 us of kernels, and the same call read 323 us in one process and 666 us in another.
    In a model step the host runs ahead of a busy GPU and only the kernels count. So each timed call is
    queued behind a spin kernel (``torch.cuda._sleep``) lasting three times its host time, after an L2 flush:
    by the time the start event runs, the call's kernels are all queued and the events bracket them alone."""
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MB, as do_bench's cache clear
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host_us = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    cycles = int(_spin_cycles_per_us() * max(3.0 * host_us, 50.0))

    def host_ahead() -> None:  # flush L2, then hold the device until fn's kernels are all queued
        flush.zero_()
        torch.cuda._sleep(cycles)

    est_us = max(statistics.median(_event_times(fn, 3, host_ahead)), 1.0)
    _event_times(fn, max(1, int(warmup_ms * 1000.0 / est_us)), host_ahead)
    samples = _event_times(fn, max(5, min(1000, int(rep_ms * 1000.0 / est_us))), host_ahead)
    return summarize(samples, "cuda_events, host ahead")


def time_call(fn: Callable[[], Any], device: torch.device, *, quick: bool = False, device_bound: bool = False
              ) -> Timing:
    """Time ``fn`` with the method that suits ``device`` (``quick`` for online tuning: fewer repeats;
    ``device_bound`` on CUDA: the kernels' time with the host ahead, :func:`time_cuda_device`)."""
    if device.type == "cuda":
        if device_bound:
            return time_cuda_device(fn, warmup_ms=3.0 if quick else 5.0, rep_ms=10.0 if quick else 20.0)
        # 5 + 20 ms per kernel and bucket: do_bench's median over ~20 ms of replays is stable to ~1% for the
        # kernels we tune, and keeps a 50-shape grid's tuning under a minute on an H100.
        return time_cuda(fn, warmup_ms=3.0 if quick else 5.0, rep_ms=10.0 if quick else 20.0)
    if quick:
        return time_cpu(fn, warmup=1, min_samples=5, max_samples=50, budget_s=0.01)
    return time_cpu(fn)


# -- per-call percentiles and interleaved A/B overhead (layerzero bench) --------------------------------

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
