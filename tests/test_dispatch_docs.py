"""docs/dispatch.md: every ```python block runs, top to bottom, in one namespace.

Run as a script it prints the seed's ``benchmark_dispatch`` numbers, the
side-by-side overhead table and the dispatch rows of ``layerzero bench --quick``
(ratio of p50s, three runs) quoted in that document:

    .venv/bin/python tests/test_dispatch_docs.py
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from doc_pages import page, python_blocks

DOC = page("dispatch.md")


def test_doc_has_examples():
    assert len(python_blocks(DOC)) >= 10


def test_doc_python_blocks_run_in_order(capsys):  # conftest restores the global config
    ns: dict[str, Any] = {"__name__": "dispatch_doc"}
    for i, code in enumerate(python_blocks(DOC)):
        try:
            exec(compile(code, f"{DOC.name}[python block {i + 1}]", "exec"), ns)  # noqa: S102 - our own doc
        except Exception as exc:
            raise AssertionError(f"python block {i + 1} of {DOC} failed: {type(exc).__name__}: {exc}") from exc
    out = capsys.readouterr().out
    assert "my_attention static" in out
    assert "OPEN 1 3 RuntimeError: illegal memory access" in out
    assert "DispatchMode.STATIC DispatchMode.DYNAMIC" in out
    assert "50000" in out


# -- the numbers quoted in the doc (a script, never a timed assertion) ------------------------------------------

def benchmark_dispatch(operation: str, inputs: dict, iterations: int = 1000, warmup: int = 100) -> dict:
    """The seed guide's template, verbatim."""
    from layerzero.dispatch import get_global_dispatcher

    dispatcher = get_global_dispatcher()
    for _ in range(warmup):
        dispatcher.dispatch(operation, inputs)
    latencies = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        dispatcher.dispatch(operation, inputs)
        end = time.perf_counter_ns()
        latencies.append(end - start)
    latencies.sort()
    return {
        "p50_ns": latencies[len(latencies) // 2],
        "p99_ns": latencies[int(len(latencies) * 0.99)],
        "p999_ns": latencies[int(len(latencies) * 0.999)],
        "mean_ns": statistics.mean(latencies),
        "std_ns": statistics.stdev(latencies),
        "min_ns": min(latencies),
        "max_ns": max(latencies),
    }


def _side_by_side(rounds: int = 7, n: int = 2000) -> list[tuple[str, float, float]]:
    """Best-of-rounds p50 of each way to run one tiny causal attention, and its overhead over the kernel."""
    import torch

    import layerzero as lz
    from layerzero.dispatch import StaticDispatcherBuilder, create_dynamic_dispatcher, dispatch, get_global_dispatcher

    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    inputs = {"query": q, "key": k, "value": v}
    g = get_global_dispatcher()
    kid = g.dispatch("attention.causal", inputs).kernel_id
    fn = lz.get_global_kernel_registry().get(kid).impl
    static = (StaticDispatcherBuilder().with_kernel(kid, operation="attention.causal", default=True)
              .with_config(enable_telemetry=False, circuit_breaker_enabled=False).build())
    resolved = static.resolve("attention.causal")
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)
    cases = {
        f"kernel called directly ({kid})": lambda: fn(q, k, v, None, True, 0.0, None, None),
        "static resolve() result called": lambda: resolved(q, k, v, None, True, 0.0, None, None),
        "static dispatch()": lambda: static.dispatch("attention.causal", inputs),
        "lz.attention(q, k, v, is_causal=True)": lambda: lz.attention(q, k, v, is_causal=True),
        "dispatch() (global, DYNAMIC, cache hit)": lambda: dispatch("attention.causal", inputs),
        "MVCC dynamic dispatcher": lambda: mvcc.dispatch("attention.causal", inputs),
    }
    best = {name: [] for name in cases}
    for f in cases.values():
        for _ in range(300):
            f()
    for _ in range(rounds):
        for name, f in cases.items():
            lat = []
            for _ in range(n):
                t = time.perf_counter_ns()
                f()
                lat.append(time.perf_counter_ns() - t)
            lat.sort()
            best[name].append(lat[n // 2])
    base = min(next(iter(best.values())))
    return [(name, min(xs) / 1000.0, (min(xs) - base) / 1000.0) for name, xs in best.items()]


def main() -> None:
    import platform

    import torch

    from layerzero.dispatch import get_global_dispatcher

    torch.set_num_threads(1)
    inputs = {n: torch.randn(1, 2, 16, 16) for n in ("query", "key", "value")}
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    results = benchmark_dispatch("attention.causal", inputs, iterations=10000)
    print("## seed benchmark_dispatch('attention.causal', 1x2x16x16 float32, iterations=10000)")
    print(f"p50: {results['p50_ns'] / 1000:.2f}us")
    print(f"p99: {results['p99_ns'] / 1000:.2f}us")
    print(f"p99.9: {results['p999_ns'] / 1000:.2f}us")
    cs = get_global_dispatcher().get_telemetry().cache_stats
    print(f"Cache hit rate: {cs.hits / (cs.hits + cs.misses) * 100:.1f}%")
    print("## side by side (best-of-7 p50, same tensors)")
    for name, p50, over in _side_by_side():
        print(f"| {name} | {p50:.2f} | {over:+.2f} |")
    print("## layerzero bench --quick: the dispatch rows of the overhead table, three runs")
    from layerzero.bench.overhead import run_overhead

    for _ in range(3):
        rows = [r for r in run_overhead("cpu", torch.float32, True, None, lambda m: None) if "dispatch" in r.path]
        print(" | ".join(f"{r.path}: {r.value:.3f} ({'PASS' if r.passed else 'MISS'})" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
