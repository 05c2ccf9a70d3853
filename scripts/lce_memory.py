"""Extra peak memory (and, with ``--time``, the time) of one ``lz.linear_cross_entropy`` forward + backward per
kernel, against the full logits' size.

On the CPU the peak is read from torch.profiler's allocator events (``profile_memory=True``: every
allocation and free, in order), on CUDA from ``torch.cuda.max_memory_allocated``. "Extra" is what the call
allocates beyond its inputs, gradients included (``grad_hidden`` and ``grad_weight`` are allocated by any
method); "full logits" is ``rows x vocab`` in the input dtype: what ``F.linear`` alone would hold.

    python scripts/lce_memory.py --rows 4096 --hidden 256 --vocab 65536
    python scripts/lce_memory.py --device cuda --dtype bfloat16 --rows 8192 --hidden 2048 --vocab 128256 \
        --kernel torch_linear_cross_entropy_chunked --kernel liger_linear_cross_entropy --time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from layerzero.registry import get_global_kernel_registry

KERNELS = ("torch_linear_cross_entropy_chunked", "torch_linear_cross_entropy_naive", "liger_linear_cross_entropy")


def _cpu_peak(fn) -> int:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak(fn) -> int:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _median_ms(fn, device: str, reps: int = 10) -> float:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def measure(kernel: str, rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str,
            timed: bool = False) -> tuple[int, int, float | None]:
    """(extra peak bytes of one forward + backward, bytes of the full logits, median ms or None)."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, generator=g, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, device=device) / hidden ** 0.5).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (rows,), generator=g, device=device)
    impl = get_global_kernel_registry().get(kernel).impl  # the kernel itself: no selection rule in the way
    impl(h[:8], w, target[:8], None, -100, 0.0, "mean", None).backward()  # warm-up outside the measurement
    h.grad = w.grad = None

    def step() -> None:
        impl(h, w, target, None, -100, 0.0, "mean", None).backward()

    peak = _cuda_peak(step) if device.startswith("cuda") else _cpu_peak(step)
    ms = _median_ms(step, device) if timed else None
    return peak, rows * vocab * torch.empty((), dtype=dtype).element_size(), ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", action="append", choices=KERNELS, help="default: the torch kernels")
    p.add_argument("--time", action="store_true", help="also time forward + backward (median of 10)")
    p.add_argument("--check", type=float, default=None, help="exit 1 unless every ratio is below this")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    worst = 0.0
    for kernel in a.kernel or KERNELS[:2]:
        peak, logits, ms = measure(kernel, a.rows, a.hidden, a.vocab, dtype, a.device, a.time)
        ratio = peak / logits
        worst = max(worst, ratio)
        took = "" if ms is None else f", forward + backward {ms:.2f} ms"
        print(f"{kernel}: rows={a.rows} hidden={a.hidden} vocab={a.vocab} {a.dtype} {a.device}: extra peak "
              f"{peak / 2**20:.1f} MiB, full logits {logits / 2**20:.1f} MiB, extra peak / full logits "
              f"{ratio:.3f}{took}")
    return 1 if a.check is not None and worst >= a.check else 0


if __name__ == "__main__":
    sys.exit(main())
