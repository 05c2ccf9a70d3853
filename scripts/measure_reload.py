"""Measure hot-reload latency: from the end of a config-file write to the new rules being in force.

For each watcher (watchdog events; stat() polling at two intervals) the script
rewrites a real YAML file on disk ``--edits`` times, alternating two configs,
and times each edit from the moment the write (an atomic rename) returns to
the moment the new config is swapped in (the dispatcher's ``on_reload``
callback). It also reports the parse + validate + swap time
(``stats.last_reload_time_ms``) and, for reference, the cached ``dispatch()``
cost of the CONFIG and DYNAMIC dispatchers on the same call, side by side.

    .venv/bin/python scripts/measure_reload.py [--edits 30] [--debounce 0.05]

Prints a markdown table. Timing varies with the machine and its load; rerun for
numbers from your own hardware.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from layerzero.dispatch import create_dynamic_dispatcher, create_hot_reload_dispatcher
from layerzero.dispatch.hot_reload import WATCHDOG_AVAILABLE

V1 = 'version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n'
V2 = 'version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n'


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_watcher(path: Path, *, use_watchdog: bool, interval: float, debounce: float, edits: int
                    ) -> tuple[list[float], list[float], str]:
    path.write_text(V1)
    d = create_hot_reload_dispatcher(config_path=path, watch_interval_seconds=interval, debounce_seconds=debounce,
                                     use_watchdog=use_watchdog)
    done = threading.Event()
    in_force_at: list[float] = []
    d.on_reload(lambda cfg: (in_force_at.append(time.perf_counter()), done.set()))
    latencies_ms: list[float] = []
    swap_ms: list[float] = []
    x = torch.randn(8, 256)
    w = torch.randn(256)
    try:
        for i in range(edits):
            time.sleep(max(debounce * 2, 0.02))         # let the previous edit settle
            done.clear()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(V2 if i % 2 == 0 else V1)
            os.replace(tmp, path)
            written = time.perf_counter()
            if not done.wait(interval * 4 + 5):
                raise RuntimeError(f"edit {i} was not picked up")
            latencies_ms.append((in_force_at[-1] - written) * 1000.0)
            swap_ms.append(d.stats.last_reload_time_ms)
            expected = "torch_rms_norm_composed" if i % 2 == 0 else "torch_rms_norm"
            got = d.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id
            if got != expected:
                raise RuntimeError(f"edit {i}: dispatch used {got}, expected {expected}")
        kind = d.watcher
    finally:
        d.close()
    return latencies_ms, swap_ms, kind


def dispatch_cost_ns(path: Path, iterations: int = 20000) -> tuple[float, float]:
    """p50 ns of a cached dispatch(): CONFIG (hot-reload dispatcher, watcher stopped) vs DYNAMIC."""
    path.write_text(V1)
    cfg = create_hot_reload_dispatcher(config_path=path, start_watching=False)
    dyn = create_dynamic_dispatcher()
    inputs = {"x": torch.randn(4, 64), "weight": torch.randn(64)}
    out: list[float] = []
    for d in (cfg, dyn):
        for _ in range(1000):
            d.dispatch("rms_norm", inputs)
        samples = []
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            d.dispatch("rms_norm", inputs)
            samples.append(time.perf_counter_ns() - t0)
        out.append(statistics.median(samples))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--debounce", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    if WATCHDOG_AVAILABLE:
        runs.append(("watchdog", True, 1.0))
    runs += [("polling 0.1 s", False, 0.1), ("polling 1.0 s", False, 1.0)]
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.edits} edits per watcher, debounce {args.debounce * 1000:.0f} ms\n")
    print("| watcher | write -> in force p50 (ms) | p90 (ms) | max (ms) | parse+validate+swap p50 (ms) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.yaml"
        for name, use_watchdog, interval in runs:
            lat, swap, kind = measure_watcher(path, use_watchdog=use_watchdog, interval=interval,
                                              debounce=args.debounce, edits=args.edits)
            print(f"| {name} ({kind}) | {pct(lat, 0.5):.1f} | {pct(lat, 0.9):.1f} | {max(lat):.1f} | "
                  f"{pct(swap, 0.5):.2f} |")
        config_ns, dynamic_ns = dispatch_cost_ns(path)
    print(f"\ncached dispatch('rms_norm') p50: CONFIG (hot-reload dispatcher) {config_ns / 1000:.2f} us, "
          f"DYNAMIC {dynamic_ns / 1000:.2f} us (same call, same run)")


if __name__ == "__main__":
    main()
