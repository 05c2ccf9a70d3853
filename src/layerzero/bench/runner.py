"""``layerzero bench``: the seed's benchmark format, and the overhead budgets checked side by side.

Three parts:

* results: end-to-end latency of ``lz.attention`` (causal prefill and decode)
  and ``lz.rms_norm`` over a grid, with the plan-cache hit rate per row;
* overhead: each layerzero path next to the call it replaces, interleaved in
  one run, with p50/p99, the overhead in ns, the ratio, the budget and
  PASS/MISS (static ``resolve``, static ``dispatch()``, dynamic cached
  ``dispatch()``, ``lz.attention`` / ``lz.rms_norm`` from raw tensors, the plan
  cache lookup, the breaker check + telemetry record), and, for comparison,
  ``lz.attention_varlen`` / ``lz.attention_paged`` against a per-sequence SDPA
  loop / dense SDPA over gathered pages (:mod:`layerzero.bench.ragged`);
* memory and import: 50,000 cached plans under tracemalloc, memory over
  1,000,000 cached calls, and ``import layerzero`` against ``import torch``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.accel import status as accel_status
from layerzero.bench.overhead import OverheadRow, run_overhead
from layerzero.bench.ragged import run_ragged
from layerzero.timing import measure_calls

__all__ = ["BENCH_OPS", "BenchOptions", "BenchReport", "run_bench", "OverheadRow", "ResultRow"]


@dataclass
class BenchOptions:
    device: str = "cpu"
    ops: tuple[str, ...] = ("attention.causal", "attention.decode", "rms_norm")
    quick: bool = False
    iterations: int | None = None
    dtype: str | None = None
    include_memory: bool = True
    include_import: bool = True
    include_ragged: bool = True  # the lz.attention_varlen / lz.attention_paged lines (bench/ragged.py)
    memory_plans: int | None = None  # default: 50,000 (10,000 with --quick: each is a real miss, ~1 ms here)
    memory_calls: int | None = None  # default: 1,000,000 (300,000 with --quick)

    @property
    def n_plans(self) -> int:
        if self.memory_plans:
            return self.memory_plans
        return 10_000 if self.quick else 50_000

    @property
    def n_calls(self) -> int:
        """Cached calls for the flat-memory line (the growth is read from the tenth call on)."""
        if self.memory_calls:
            return self.memory_calls
        return 300_000 if self.quick else 1_000_000

    @property
    def n_iter(self) -> int:
        if self.iterations:
            return self.iterations
        return 200 if self.quick else 2000

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            from layerzero.context import dtype_from_name

            return dtype_from_name(self.dtype)
        return torch.float16 if self.device.startswith("cuda") else torch.float32


@dataclass
class ResultRow:
    operation: str
    batch: int
    seq_len: int
    p50_us: float
    p99_us: float
    p999_us: float
    cache_hit: float
    kernel: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BenchReport:
    system: dict[str, Any]
    config: dict[str, Any]
    workload: dict[str, Any]
    results: list[ResultRow] = field(default_factory=list)
    overhead: list[OverheadRow] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def all_passed(self) -> bool:
        return all(r.passed or r.info for r in self.overhead)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "config": self.config, "workload": self.workload,
                "results": [r.to_dict() for r in self.results], "overhead": [r.to_dict() for r in self.overhead],
                "all_passed": self.all_passed, "elapsed_s": self.elapsed_s}


def _sync_for(device: str) -> Callable[[], None] | None:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return None


# -- the results grid -----------------------------------------------------------------------------

#: The operations the results grid times (``layerzero bench --ops``).
BENCH_OPS = ("attention.causal", "attention.decode", "rms_norm")


def _grid(opts: BenchOptions) -> list[tuple[str, int, int]]:
    gpu = opts.device.startswith("cuda")
    rows: list[tuple[str, int, int]] = []
    if "attention.causal" in opts.ops:
        shapes = [(1, 512), (8, 512), (32, 2048), (8, 8192)] if gpu else [(1, 128), (4, 128), (1, 512)]
        if opts.quick:
            shapes = shapes[:2] if not gpu else shapes[:3]
        rows += [("attention.causal", b, s) for b, s in shapes]
    if "attention.decode" in opts.ops:
        shapes = [(1, 2048), (32, 2048), (64, 8192)] if gpu else [(1, 128), (8, 512), (1, 2048)]
        if opts.quick:
            shapes = shapes[:2]
        rows += [("attention.decode", b, s) for b, s in shapes]
    if "rms_norm" in opts.ops:
        shapes = [(1, 1), (8, 512), (32, 2048)] if gpu else [(1, 1), (4, 128), (8, 512)]
        if opts.quick:
            shapes = shapes[:2]
        rows += [("rms_norm", b, s) for b, s in shapes]
    return rows


def _call_for(operation: str, batch: int, seq: int, device: str, dtype: torch.dtype
              ) -> tuple[Callable[[], Any], Callable[[], str]]:
    import layerzero as lz

    kw = dict(device=device, dtype=dtype)
    if operation == "attention.causal":
        q = torch.randn(batch, 8, seq, 64, **kw)
        k = torch.randn(batch, 8, seq, 64, **kw)
        v = torch.randn(batch, 8, seq, 64, **kw)
        return (lambda: lz.attention(q, k, v, is_causal=True)), (lambda: lz.which("attention.causal", q, k, v))
    if operation == "attention.decode":
        q = torch.randn(batch, 8, 1, 64, **kw)
        k = torch.randn(batch, 8, seq, 64, **kw)
        v = torch.randn(batch, 8, seq, 64, **kw)
        return ((lambda: lz.attention(q, k, v, operation="attention.decode")),
                (lambda: lz.which("attention.decode", q, k, v)))
    x = torch.randn(batch, seq, 4096, **kw)
    w = torch.randn(4096, **kw)
    return (lambda: lz.rms_norm(x, w)), (lambda: lz.which("rms_norm", x, w))


def _workload(opts: BenchOptions, threads: int) -> dict[str, Any]:
    """The seed's ``workload:`` block (``operation``: one name, or the list when several; the grid's batch sizes
    and sequence lengths), then what else sets the run (device, threads, quick)."""
    grid = list(_grid(opts))
    return {"operation": opts.ops[0] if len(opts.ops) == 1 else list(opts.ops),
            "batch_sizes": sorted({b for _, b, _ in grid}), "seq_lengths": sorted({s for _, _, s in grid}),
            "dtype": str(opts.torch_dtype).removeprefix("torch."), "iterations": opts.n_iter,
            "warmup": max(10, opts.n_iter // 10), "device": opts.device, "torch_threads": threads, "quick": opts.quick}


def run_results(opts: BenchOptions, progress: Callable[[str], None]) -> list[ResultRow]:
    from layerzero.runtime import get_runtime

    rt = get_runtime()
    out = []
    sync = _sync_for(opts.device)
    for operation, batch, seq in _grid(opts):
        progress(f"results {operation} b={batch} s={seq}")
        fn, which = _call_for(operation, batch, seq, opts.device, opts.torch_dtype)
        for _ in range(max(10, opts.n_iter // 10)):  # warm-up (the first call selects and caches the plan)
            fn()
        before = rt.telemetry.cache_stats
        p = measure_calls(fn, opts.n_iter, warmup=0, sync=sync)
        after = rt.telemetry.cache_stats
        hits, misses = after.hits - before.hits, after.misses - before.misses
        rate = hits / (hits + misses) if hits + misses else 0.0
        out.append(ResultRow(operation, batch, seq, p.p50_ns / 1e3, p.p99_ns / 1e3, p.p999_ns / 1e3, rate, which()))
    return out


# -- overhead budgets ----------------------------------------------------------------------------------

def run_memory(opts: BenchOptions, progress: Callable[[str], None]) -> list[OverheadRow]:
    import layerzero as lz
    from layerzero.runtime import get_runtime

    rt = get_runtime()
    rows = []
    n_plans = opts.n_plans
    progress(f"memory: {n_plans} cached plans")
    saved = rt.config
    # one exact-shape plan per shape (a shape-free plan would serve them all from one entry)
    rt.configure(rt.config.replace(cache_size=max(n_plans, rt.config.cache_size), shape_free_plans=False))
    row = torch.randn(1, 8)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n_plans):
        lz.silu(row.expand(i + 1, 8))  # a new shape per call: one plan-cache entry each
    gc.collect()  # count what the cache keeps, not garbage the misses left behind
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    size = len(rt.plans)
    mb = used / 2**20
    limit = 17.0 * n_plans / 50_000
    rows.append(OverheadRow(f"{size:,} cached plans", "tracemalloc", None, f"<= {limit:g} MB", mb <= limit and size >= n_plans,
                            f"{mb:.1f} MB ({used / max(size, 1):.0f} B/entry)", mb))
    rt.configure(saved)

    calls = opts.n_calls
    progress(f"memory: {calls:,} cached calls")
    t = torch.randn(1, 8)
    silu = lz.silu
    for _ in range(1000):
        silu(t)
    tracemalloc.start()
    for _ in range(calls // 10):
        silu(t)
    mid = tracemalloc.get_traced_memory()[0]
    for _ in range(calls - calls // 10):
        silu(t)
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    growth = (end - mid) / 1024
    rows.append(OverheadRow(f"{calls:,} cached calls", "tracemalloc", None, "flat (< 64 KB growth)", growth < 64,
                            f"{growth:+.1f} KB from call {calls // 10:,} to {calls:,}", growth))
    return rows


_IMPORT_PROBE = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
                 "import layerzero; t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")


def run_import(opts: BenchOptions, progress: Callable[[str], None]) -> list[OverheadRow]:
    """``import layerzero`` on top of ``import torch``, in fresh interpreters (the fastest of a few runs:
    import time only ever gets slower through noise). The probes may cache bytecode, as Python does by default:
    ``PYTHONDONTWRITEBYTECODE`` is dropped for them, so a source checkout that was never imported with bytecode
    caching on is not timed compiling every module (torch's own modules were compiled when pip installed it)."""
    progress("import time")
    n = 3 if opts.quick else 7
    torch_s, extra_s = [], []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], check=True, capture_output=True, text=True,
                             env={**env, "PYTHONWARNINGS": "ignore"}).stdout.split()
        torch_s.append(float(out[0]))
        extra_s.append(float(out[1]))
    a, b = min(torch_s), min(extra_s)
    return [OverheadRow("import layerzero", "import torch", None, "<= 10% over import torch", b <= a * 0.10,
                        f"+{b * 1e3:.0f} ms on top of {a * 1e3:.0f} ms ({b / a * 100:+.1f}%)", (a + b) / a)]


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run the whole benchmark and return the report (``layerzero bench`` prints it)."""
    from layerzero.doctor import hardware_info
    from layerzero.runtime import get_runtime

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if opts.device == "cpu":
        torch.set_num_threads(1)  # single-thread, as the budget is stated; quieter on shared machines
    rt = get_runtime()
    cfg = rt.config
    report = BenchReport(
        system=hardware_info(),
        config={"dispatch_mode": cfg.mode.name, "cache_enabled": cfg.enable_cache, "cache_size": cfg.cache_size,
                "circuit_breaker": cfg.circuit_breaker_enabled, "telemetry": cfg.enable_telemetry,
                "record_timing": cfg.record_timing, "shape_free_plans": cfg.shape_free_plans,
                "hot_path": accel_status()},
        workload=_workload(opts, 1 if opts.device == "cpu" else threads),
    )
    try:
        report.results = run_results(opts, say)
        report.overhead = run_overhead(opts.device, opts.torch_dtype, opts.quick, _sync_for(opts.device), say)
        if opts.include_ragged:
            report.overhead += run_ragged(opts.device, opts.torch_dtype, opts.quick, _sync_for(opts.device), say)
        if opts.include_memory:
            report.overhead += run_memory(opts, say)
        if opts.include_import:
            report.overhead += run_import(opts, say)
    finally:
        torch.set_num_threads(threads)
    report.elapsed_s = time.perf_counter() - t0
    return report
