"""Concurrency soak: many threads dispatching while policies flip, a config hot-reloads, plans are
invalidated and tuning writes the performance database.

Worker threads make calls over varied shapes (attention with GQA, causal and full; rms_norm;
layer_norm; rope; swiglu; gelu; silu; greedy sampling) through ``lz.*``, through ``dispatch()`` and
through a hot-reload dispatcher, some of them inside scoped policies (``with lz.lock(...)``,
``with lz.disabled(...)``). Every result is checked against a float64 reference. Meanwhile chaos
threads

* flip process-wide policies (``lz.lock`` / ``lz.disabled`` / ``lz.prefer`` and their undo),
* rewrite a real YAML config file (atomic rename) that the hot-reload dispatcher follows, now and
  then with an invalid version that must be rejected while the old config stays in force,
* invalidate every cached plan,
* run a real tuning pass into a real SQLite performance database and keep rewriting measurements
  (each write drops cached plans, so selection keeps changing under the workers).

Memory is traced with ``tracemalloc`` (peak, and growth over the second half of the run).

    .venv/bin/python scripts/soak.py                       # 8 threads x 12,500 calls = 100,000 calls
    .venv/bin/python scripts/soak.py --threads 16 --calls 100000 --json

Exit status 1 when any call raised or returned a wrong result. ``tests/test_soak.py`` runs it with
CI-sized numbers; docs/reliability.md quotes the numbers it printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import layerzero as lz
from layerzero.dispatch import create_hot_reload_dispatcher, dispatch
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

__all__ = ["SoakReport", "run_soak", "main"]

CONFIG_A = """version: "1.0"
dispatch_rules:
  - operation: rms_norm
    kernel: soak_rms_norm
    priority: 100
fallback_chains:
  silu: [soak_silu, torch_silu]
"""
CONFIG_B = """version: "1.0"
dispatch_rules:
  - operation: rms_norm
    kernel: torch_rms_norm_composed
    priority: 100
    conditions: {num_tokens_gte: 8}
kernel_denies: [soak_silu]
"""
CONFIG_BAD = """version: "1.0"
dispatch_rules:
  - operation: rms_norm
    kernel: soak_rms_norm
    priority: 2000
"""


@dataclass
class SoakReport:
    """What a soak run did and found (``errors == 0`` and ``wrong == 0`` is a pass)."""

    threads: int
    calls: int = 0
    calls_by_path: dict[str, int] = field(default_factory=dict)
    scoped_calls: int = 0
    errors: int = 0
    wrong: int = 0
    first_errors: list[str] = field(default_factory=list)
    reloads: int = 0
    failed_reloads: int = 0
    config_writes: int = 0
    policy_flips: int = 0
    invalidations: int = 0
    all_invalidations: int = 0
    misses: int = 0
    perf_db_writes: int = 0
    tuned_buckets: int = 0
    peak_memory_mb: float = 0.0
    memory_growth_mb: float = 0.0
    wall_s: float = 0.0
    calls_per_s: float = 0.0
    machine: str = ""

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.wrong == 0 and self.calls > 0

    def table(self) -> str:
        rows = [
            ("calls", f"{self.calls:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(self.calls_by_path.items()))})"),
            ("of them inside scoped policies", f"{self.scoped_calls:,}"),
            ("threads", str(self.threads)),
            ("errors", str(self.errors)),
            ("wrong results", f"{self.wrong} (every result checked against a float64 reference)"),
            ("config reloads", f"{self.reloads} applied, {self.failed_reloads} rejected (of {self.config_writes} "
                               "file writes)"),
            ("policy flips", f"{self.policy_flips:,}"),
            ("plan invalidations", f"{self.all_invalidations:,} ({self.invalidations:,} explicit, the rest from "
                                   "policy flips and perf DB writes)"),
            ("plan-cache misses (re-selections)", f"{self.misses:,}"),
            ("perf DB writes", f"{self.perf_db_writes:,} (after tuning {self.tuned_buckets} buckets)"),
            ("peak traced memory", f"{self.peak_memory_mb:.1f} MB"),
            ("memory growth, second half", f"{self.memory_growth_mb:+.2f} MB"),
            ("wall time", f"{self.wall_s:.1f} s ({self.calls_per_s:,.0f} calls/s)"),
            ("machine", self.machine),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"| {k:<{width}} | {v} |" for k, v in [("metric", "value"), ("-" * width, "-----"), *rows])


# -- the kernels the policies flip between (correct ones: every result must stay right) ---------------------------

def _soak_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() if weight is not None else y).to(x.dtype)


def _soak_silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


SOAK_KERNELS = (KernelSpec("soak_rms_norm", "rms_norm", "soak", _soak_rms_norm, priority=55),
                KernelSpec("soak_silu", "silu", "soak", _soak_silu, priority=55))


# -- calls and their references ------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    run: dict[str, Callable[[], Any]]  # path -> call
    ref: torch.Tensor  # float64 (int64 token ids for sampling)
    tol: float
    ref32: torch.Tensor | None = None  # the reference rounded to the outputs' dtype, for a cheap comparison

    def __post_init__(self) -> None:
        self.ref32 = self.ref if self.tol == 0.0 else self.ref.float()


def _cases(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    out: list[Case] = []
    for b, hq, hkv, s, d, causal in ((1, 4, 4, 16, 32, True), (2, 4, 2, 8, 16, False), (1, 8, 2, 24, 16, True),
                                     (2, 2, 1, 5, 8, False)):
        q, k, v = r(b, hq, s, d), r(b, hkv, s, d), r(b, hkv, s, d)
        k64, v64 = k.double().repeat_interleave(hq // hkv, 1), v.double().repeat_interleave(hq // hkv, 1)
        scores = (q.double() @ k64.transpose(-2, -1)) / d ** 0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        op = "attention.causal" if causal else "attention.full"
        out.append(Case(f"{op} b={b} h={hq}/{hkv} s={s} d={d}", {
            "lz": lambda q=q, k=k, v=v, c=causal: lz.attention(q, k, v, is_causal=c),
            "dispatch": lambda q=q, k=k, v=v, op=op: dispatch(op, {"query": q, "key": k, "value": v}).output,
        }, torch.softmax(scores, -1) @ v64, 1e-4))
    for n, h in ((1, 64), (7, 128), (16, 256), (33, 64)):
        x, w = r(n, h), torch.rand(h, generator=g) + 0.5
        x64 = x.double()
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        out.append(Case(f"rms_norm n={n} h={h}", {
            "lz": lambda x=x, w=w: lz.rms_norm(x, w),
            "dispatch": lambda x=x, w=w: dispatch("rms_norm", {"x": x, "weight": w}).output,
            "hot": lambda x=x, w=w: HOT[0].dispatch("rms_norm", {"x": x, "weight": w}).output,
        }, want, 1e-4))
        bias = r(h)
        ln = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
        out.append(Case(f"layer_norm n={n} h={h}", {
            "lz": lambda x=x, w=w, bias=bias: lz.layer_norm(x, w, bias),
        }, ln * w.double() + bias.double(), 1e-4))
        out.append(Case(f"silu n={n} h={h}", {
            "lz": lambda x=x: lz.silu(x),
            "dispatch": lambda x=x: dispatch("silu", {"x": x}).output,
            "hot": lambda x=x: HOT[0].dispatch("silu", {"x": x}).output,
        }, x64 * torch.sigmoid(x64), 1e-5))
        up = r(n, h)
        out.append(Case(f"swiglu n={n} h={h}", {"lz": lambda x=x, up=up: lz.swiglu(x, up)},
                        x64 * torch.sigmoid(x64) * up.double(), 1e-5))
        out.append(Case(f"gelu n={n} h={h}", {"lz": lambda x=x: lz.gelu(x, approximate="tanh")},
                        0.5 * x64 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64.pow(3)))), 1e-5))
        logits = r(n, 50) * 4
        out.append(Case(f"sample.greedy n={n}", {"lz": lambda lg=logits: lz.sample(lg, temperature=0.0)},
                        logits.double().argmax(-1), 0.0))
    for s, d in ((8, 16), (12, 32)):
        x = r(1, 2, s, d)
        pos = torch.arange(s, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)
        cos, sin = torch.cat((pos, pos), -1).cos(), torch.cat((pos, pos), -1).sin()
        x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
        c, sn = cos[..., : d // 2], sin[..., : d // 2]
        out.append(Case(f"rope s={s} d={d}", {"lz": lambda x=x, c=cos.float(), sn=sin.float(): lz.rope(x, c, sn)},
                        torch.cat((x1 * c - x2 * sn, x2 * c + x1 * sn), -1), 1e-5))
    return out


HOT: list[Any] = [None]


def _check(case: Case, out: Any) -> bool:
    """The result against the float64 reference (rounded to float32 once: the kernels' outputs are float32,
    and the tolerances are far above float32's rounding)."""
    if not isinstance(out, torch.Tensor) or out.shape != case.ref.shape or out.dtype != case.ref32.dtype:
        return False
    if case.tol == 0.0:
        return bool(torch.equal(out, case.ref))
    return bool(torch.allclose(out, case.ref32, atol=case.tol, rtol=case.tol))


# -- scoped policies a worker may wrap a call in ------------------------------------------------------------------

def _scoped_call(rng: random.Random, call: Callable[[], Any]) -> Any:
    """``call()`` inside one of four scoped policies. Each ``with`` is written out: a policy call made
    directly in a ``with`` statement is scoped to this thread only (through a helper that returned the
    change it would be applied process-wide first)."""
    pick = rng.random()
    if pick < 0.25:
        with lz.lock("rms_norm", "torch_rms_norm_composed"):
            return call()
    if pick < 0.5:
        with lz.disabled("soak"):
            return call()
    if pick < 0.75:
        with lz.unlock("rms_norm"):
            return call()
    with lz.lock("attention.*", backend="torch"):
        return call()


# -- the run ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _soak_kernels() -> Iterator[None]:
    """The soak's own (correct) kernels in the global registry for the run, removed afterwards."""
    rt = get_runtime()
    for spec in SOAK_KERNELS:
        rt.kernels.register(spec, replace=True)
    try:
        yield
    finally:
        for spec in SOAK_KERNELS:
            if spec.kernel_id in rt.kernels:
                rt.kernels.unregister(spec.kernel_id)


class _Soak:
    """The state of one run: the workers' tallies and the chaos actions' counters."""

    def __init__(self, root: Path, db: Any, hot: Any, cases: list[Case], seed: int) -> None:
        self.root, self.db, self.hot, self.cases = root, db, hot, cases
        self.config = root / "kernels.yaml"
        self.rt = get_runtime()
        self.rng = random.Random(seed)  # the chaos threads' choices (each worker has its own generator)
        self.seed = seed
        self.lock = threading.Lock()
        self.tally = {"calls": 0, "scoped": 0, "errors": 0, "wrong": 0, "flips": 0, "invalidations": 0,
                      "writes": 0, "config_writes": 0}
        self.by_path: dict[str, int] = {}
        self.first_errors: list[str] = []
        self.changes: list[Any] = []  # process-wide policy changes in force, undone by the next flip
        self.tuned: list[dict[str, Any]] = []
        self.tuned_buckets = 0
        self.progress: list[int] = []

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.tally[key] += n

    def note(self, text: str) -> None:
        with self.lock:
            if len(self.first_errors) < 5:
                self.first_errors.append(text)

    # -- chaos actions ---------------------------------------------------------------------------------------
    def flip(self) -> None:
        if self.changes:
            self.changes.pop().undo()
        else:
            r = self.rng.random()
            if r < 0.4:
                self.changes.append(lz.lock("rms_norm", "torch_rms_norm_composed"))
            elif r < 0.7:
                self.changes.append(lz.disabled("soak"))
            else:
                self.changes.append(lz.prefer("soak", priority=100))
        self.count("flips")

    def rewrite_config(self) -> None:
        """Atomic rewrite (write aside, rename over); every fifth version is invalid and must be rejected."""
        n = self.tally["config_writes"] + 1
        text = CONFIG_BAD if n % 5 == 0 else (CONFIG_A if n % 2 else CONFIG_B)
        part = self.root / "kernels.yaml.tmp"
        part.write_text(text)
        os.replace(part, self.config)
        self.count("config_writes")

    def invalidate(self) -> None:
        self.rt.invalidate("soak")
        self.count("invalidations")

    def tune_and_write(self) -> None:
        """First a real tuning pass; then rewrite some of its measurements with new times (each write drops
        every cached plan, so selection keeps changing under the workers)."""
        if not self.tuned:
            report = lz.tuning.tune(["rms_norm", "silu"], shapes=["rows=16,hidden=256", "rows=7,hidden=128"],
                                    device="cpu", db=self.db, budget_s=10)
            self.tuned_buckets = len(report.buckets)
            self.tuned.extend(self.db.rows())
            self.count("writes", len(self.tuned))
            return
        from layerzero.tuning.perfdb import Record

        picked = self.rng.sample(self.tuned, min(4, len(self.tuned)))
        self.db.record([Record(r["hardware"], r["libraries"], r["kernel_id"], r["operation"], r["dtype"],
                               r["bucket"], self.rng.uniform(1.0, 50.0), self.rng.uniform(0.0, 1.0), 5,
                               source="soak") for r in picked])
        self.count("writes", len(picked))

    def every(self, stop: threading.Event, interval: float, action: Callable[[], None]) -> Callable[[], None]:
        def loop() -> None:
            while not stop.is_set():
                try:
                    action()
                except Exception:  # a chaos action failing is a soak failure too
                    self.count("errors")
                    self.note(f"chaos action {action.__name__}:\n{traceback.format_exc(limit=6)}")
                stop.wait(interval)
        return loop

    # -- workers ---------------------------------------------------------------------------------------------
    def worker(self, i: int, calls: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        local: dict[str, int] = {}
        done = scoped = bad = wrong = 0
        for n in range(calls):
            case = self.cases[rng.randrange(len(self.cases))]
            path = rng.choice(list(case.run))
            try:
                if n % 10 == 0:
                    out = _scoped_call(rng, case.run[path])
                    scoped += 1
                else:
                    out = case.run[path]()
                if not _check(case, out):
                    wrong += 1
                    self.note(f"wrong result: {case.name} via {path}")
            except Exception:
                bad += 1
                self.note(f"{case.name} via {path}:\n{traceback.format_exc(limit=8)}")
            done += 1
            self.progress[i] = done
            local[path] = local.get(path, 0) + 1
        with self.lock:
            for key, value in (("calls", done), ("scoped", scoped), ("errors", bad), ("wrong", wrong)):
                self.tally[key] += value
            for key, value in local.items():
                self.by_path[key] = self.by_path.get(key, 0) + value

    def run(self, threads: int, calls: int, interval_s: float, trace_memory: bool, report: SoakReport) -> None:
        stop = threading.Event()
        chaos = [threading.Thread(target=self.every(stop, interval_s, a), daemon=True)
                 for a in (self.flip, self.rewrite_config, self.invalidate)]
        chaos.append(threading.Thread(target=self.every(stop, interval_s * 5, self.tune_and_write), daemon=True))
        self.progress = [0] * threads  # each worker writes its own slot: no lock needed
        workers = [threading.Thread(target=self.worker, args=(i, calls), name=f"soak-{i}") for i in range(threads)]
        misses0, invalidations0 = self.rt.telemetry.misses, self.rt.telemetry.cache_invalidations
        if trace_memory:
            tracemalloc.start()
        t0 = time.perf_counter()
        for t in chaos + workers:
            t.start()
        mid = None
        while any(t.is_alive() for t in workers):  # memory growth is measured over the second half of the calls
            if mid is None and trace_memory and sum(self.progress) >= threads * calls // 2:
                mid = tracemalloc.get_traced_memory()[0]
            time.sleep(0.05)
        report.wall_s = time.perf_counter() - t0
        stop.set()
        for t in chaos:
            t.join(timeout=60)
        if trace_memory:
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            report.peak_memory_mb = peak / 2**20
            report.memory_growth_mb = (current - (current if mid is None else mid)) / 2**20
        report.misses = self.rt.telemetry.misses - misses0
        report.all_invalidations = self.rt.telemetry.cache_invalidations - invalidations0


def run_soak(threads: int = 8, calls_per_thread: int = 12_500, *, seed: int = 0, workdir: str | None = None,
             interval_s: float = 0.05, trace_memory: bool = True) -> SoakReport:
    """Run the soak (see the module docstring) and return its report.

    Args:
        threads / calls_per_thread: the workers and how many calls each makes.
        seed: inputs and choices (thread timing still varies from run to run).
        workdir: where the config file and the perf DB go (a temporary directory by default).
        interval_s: seconds between two chaos actions of each kind (tuning writes every ``5 * interval_s``).
        trace_memory: trace allocations with tracemalloc (costs time; the memory rows stay 0 without it).

    The global runtime is left as it was found: process-wide policy changes undone, the soak's kernels
    unregistered, the perf DB detached.
    """
    report = SoakReport(threads=threads, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                 f"Python {platform.python_version()}, torch {torch.__version__}")
    from layerzero.tuning import detach_perf_db, use_perf_db

    tmp_ctx = tempfile.TemporaryDirectory(prefix="lz-soak-") if workdir is None else contextlib.nullcontext(workdir)
    with tmp_ctx as tmp, _soak_kernels():
        root = Path(tmp)
        (root / "kernels.yaml").write_text(CONFIG_A)
        db = use_perf_db(root / "perf.db")
        hot = create_hot_reload_dispatcher(config_path=root / "kernels.yaml", watch_interval_seconds=0.05,
                                           debounce_seconds=0.01, use_watchdog=False)
        HOT[0] = hot
        soak = _Soak(root, db, hot, _cases(seed), seed)
        try:
            for case in soak.cases:  # every path once: first selections, caches, the check itself
                for call in case.run.values():
                    if not _check(case, call()):
                        raise AssertionError(f"soak warm-up: wrong result for {case.name}")
            soak.run(threads, calls_per_thread, interval_s, trace_memory, report)
        finally:
            while soak.changes:
                soak.changes.pop().undo()
            hot.close()
            HOT[0] = None
            detach_perf_db()
    tally, stats = soak.tally, hot.stats
    report.calls, report.calls_by_path, report.scoped_calls = tally["calls"], soak.by_path, tally["scoped"]
    report.errors, report.wrong, report.first_errors = tally["errors"], tally["wrong"], soak.first_errors
    report.reloads, report.failed_reloads, report.config_writes = (stats.total_reloads, stats.failed_reloads,
                                                                   tally["config_writes"])
    report.policy_flips, report.invalidations = tally["flips"], tally["invalidations"]
    report.perf_db_writes, report.tuned_buckets = tally["writes"], soak.tuned_buckets
    report.calls_per_s = report.calls / report.wall_s if report.wall_s else 0.0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=12_500, help="calls per thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between chaos actions")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip memory tracing (faster)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run_soak(args.threads, args.calls, seed=args.seed, interval_s=args.interval,
                      trace_memory=not args.no_tracemalloc)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=1))
    else:
        print(report.table())
        for err in report.first_errors:
            print("\n" + err, file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
