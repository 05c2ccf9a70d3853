"""Three training-step questions on a GPU, answered in one process (issue 19).

1. **Tuner inflation.** Why do grad=1 buckets of Liger's Triton kernels time 2-3x slower in a process that has
   tuned other ops than in a process of their own? For swiglu and rms_norm buckets it tunes the swiglu
   buckets first (fresh), then the rms_norm training buckets, then the swiglu buckets again, and for each
   kernel also reports the host time of one timed call (no sync), the GPU kernel time of one call (profiler)
   and the caching allocator's device allocations and retries during the timing.
2. **Linear cross-entropy chunking.** Liger's fused linear cross-entropy with ``chunk_mem_const`` 1, 2, 4, 8
   (transient logits bounded to that many times ``hidden``'s size) against layerzero's chunked kernel:
   forward + backward time and extra peak memory at the model bench's shape.
3. **A memory-lean MLP.** ``down(swiglu(gate(x), up(x)))`` as autograd sees it against one autograd function
   that keeps ``x``, ``gate``, ``up`` (not the product) and recomputes the product in the backward: time and
   the activation memory of a stack of layers.

Usage (device machine):  python3 scripts/gpu_training_probe.py [--out DIR] [--parts tuner,lce,mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _bench(fn: Callable[[], Any], rep: int = 60) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep))


def _host_us(fn: Callable[[], Any], n: int = 20) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _gpu_us(fn: Callable[[], Any], n: int = 5) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return total / n


def _alloc_stats() -> dict[str, int]:
    s = torch.cuda.memory_stats()
    return {k: int(s.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


# -- 1. tuner ----------------------------------------------------------------------------------------------
def tuner_part() -> dict[str, Any]:
    from layerzero.ops import op_for
    from layerzero.tuning import grids
    from layerzero.tuning.tuner import Tuner, timed_call_for
    from layerzero.timing import time_call

    out: dict[str, Any] = {"rounds": []}
    bf16 = (torch.bfloat16,)
    swiglu = grids.contexts_for_shapes("swiglu", ["rows=8192,hidden=8192,grad=1", "rows=4096,hidden=8192,grad=1"],
                                       device="cuda", dtypes=bf16)
    norms = grids.contexts_for_shapes("rms_norm", ["rows=8192,hidden=2048,grad=1", "rows=8192,hidden=8192,grad=1",
                                                   "rows=4096,hidden=8192,grad=1"], device="cuda", dtypes=bf16)
    tuner = Tuner(None)

    def direct(operation: str, ctx: Any) -> list[dict[str, Any]]:
        op = op_for(operation)
        rows = []
        for spec in tuner.eligible(operation, ctx):
            if spec.backend not in ("liger", "torch"):
                continue
            gen = torch.Generator(device="cuda").manual_seed(1)
            with torch.no_grad():
                args = op.make_inputs(operation, ctx, gen)
            run = timed_call_for(op, spec.impl, args, ctx)
            run(); run()
            before = _alloc_stats()
            t = time_call(run, ctx.device)
            after = _alloc_stats()
            rows.append({"kernel": spec.kernel_id, "time_call_us": round(t.median_us, 1),
                         "spread_us": round(t.spread_us, 1), "host_us": round(_host_us(run), 1),
                         "gpu_us": round(_gpu_us(run), 1),
                         "allocs_during": {k: after[k] - before[k] for k in after}})
            del run, args
        return rows

    def tune(label: str, operation: str, contexts: list[Any]) -> None:
        for ctx in contexts:
            res = tuner.tune_bucket(operation, ctx)
            row = {"label": label, "operation": operation, "bucket": res.bucket, "selected": res.selected,
                   "tuner": [{"kernel": r.kernel_id, "median_us": r.median_us and round(r.median_us, 1),
                              "spread_us": r.spread_us and round(r.spread_us, 1), "samples": r.samples,
                              "method": r.method} for r in res.results if r.status == "ok"],
                   "direct": direct(operation, ctx)}
            out["rounds"].append(row)
            print(json.dumps(row), flush=True)

    tune("fresh", "swiglu", swiglu)
    tune("fresh", "rms_norm", norms)
    tune("after rms_norm", "swiglu", swiglu)
    return out


# -- 2. linear cross-entropy ------------------------------------------------------------------------------
def lce_part(rows: int = 8192, hidden: int = 2048, vocab: int = 128256) -> dict[str, Any]:
    import layerzero as lz
    from layerzero.backends.liger import bind_fused_linear_cross_entropy
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as LF

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (rows,), device=dev, generator=g)
    with torch.no_grad():
        ref = F.cross_entropy(h.float() @ w.float().T, t).item()
    logits_mb = rows * vocab * 2 / 2**20
    out: dict[str, Any] = {"shape": f"{rows}x{hidden} -> {vocab} bf16", "full_logits_bf16_mb": round(logits_mb),
                           "rows": []}

    def liger(c: int) -> Callable[[], torch.Tensor]:
        def f() -> torch.Tensor:
            vals = {"_input": h, "weight": w, "target": t}
            if c != 1:
                vals["chunk_mem_const"] = c
            return LF.apply(*bind_fused_linear_cross_entropy(LF.forward, vals))[0]
        return f

    cases: list[tuple[str, Callable[[], torch.Tensor]]] = [(f"liger c={c}", liger(c)) for c in (1, 2, 4, 8, 16)]
    for kid in ("torch_linear_cross_entropy_chunked",):
        def f(kid: str = kid) -> torch.Tensor:
            with lz.lock("linear_cross_entropy", kid):
                return lz.linear_cross_entropy(h, w, t)
        cases.append((kid, f))
    for name, loss_fn in cases:
        def step() -> None:
            h.grad = None
            w.grad = None
            loss_fn().backward()
        try:
            loss = float(loss_fn().item())
            step()
            torch.cuda.synchronize()
            h.grad = None
            w.grad = None
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = _bench(step, rep=200)
            row = {"kernel": name, "fwd_bwd_ms": round(ms, 3), "extra_peak_mb": round(peak),
                   "loss_err": abs(loss - ref)}
        except Exception as exc:
            row = {"kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


# -- 3. memory-lean MLP -----------------------------------------------------------------------------------
class _LeanSwiGLUMLP(torch.autograd.Function):
    """down(silu(x Wg^T) * (x Wu^T)): keeps x, gate, up; recomputes the product for down's weight gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.swiglu import swiglu_forward

        gate = x @ wg.T
        up = x @ wu.T
        _, _, c = swiglu_forward(gate, up)
        ctx.save_for_backward(x, wg, wu, wd, gate, up)
        return c @ wd.T

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

        x, wg, wu, wd, gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        _, _, c = swiglu_forward(gate, up)
        dwd = dout.reshape(-1, dout.shape[-1]).T @ c.reshape(-1, c.shape[-1])
        dc = dout @ wd
        del c
        dgate, dup = swiglu_backward(gate, up, dc)  # in place into gate / up
        x2 = x.reshape(-1, x.shape[-1])
        dx = dgate @ wg + dup @ wu
        dwg = dgate.reshape(-1, dgate.shape[-1]).T @ x2
        dwu = dup.reshape(-1, dup.shape[-1]).T @ x2
        return dx, dwg, dwu, dwd


def mlp_part(tokens: int = 8192, hidden: int = 2048, inter: int = 8192, layers: int = 8) -> dict[str, Any]:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def p(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_(True)

    ws = [(p(inter, hidden), p(inter, hidden), p(hidden, inter)) for _ in range(layers)]
    x0 = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)

    def std(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        return F.linear(LigerSiLUMulFunction.apply(F.linear(x, wg), F.linear(x, wu)), wd)

    variants = {"autograd (liger swiglu)": std, "lean (recompute product)": _LeanSwiGLUMLP.apply}
    out: dict[str, Any] = {"shape": f"{tokens} tokens, {hidden} -> {inter}, {layers} layers, bf16", "rows": []}
    grads: dict[str, list[torch.Tensor]] = {}
    for name, mlp in variants.items():
        def forward() -> torch.Tensor:
            x = x0
            for wg, wu, wd in ws:
                x = x + mlp(x, wg, wu, wd)
            return x

        def step() -> None:
            for t in [x0, *[w for trio in ws for w in trio]]:
                t.grad = None
            forward().float().square().mean().backward()

        step()
        grads[name] = [x0.grad.float().clone(), ws[0][0].grad.float().clone(), ws[-1][2].grad.float().clone()]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = forward()
        act = (torch.cuda.memory_allocated() - base) / 2**20
        del y
        ms = _bench(step, rep=300)
        row = {"variant": name, "fwd_bwd_ms": round(ms, 3), "saved_activations_mb": round(act)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    a, b = grads.values()
    out["max_rel_grad_diff"] = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(a, b))
    print("max relative gradient difference:", out["max_rel_grad_diff"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--parts", default="tuner,lce,mlp")
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    card = torch.cuda.get_device_name(0).replace(" ", "_")
    report: dict[str, Any] = {"card": card, "torch": torch.__version__}
    for part in opts.parts.split(","):
        print(f"== {part}", flush=True)
        try:
            report[part] = {"tuner": tuner_part, "lce": lce_part, "mlp": mlp_part}[part]()
        except Exception as exc:  # one broken part must not lose the others
            report[part] = {"error": f"{type(exc).__name__}: {exc}"}
            print(report[part], flush=True)
    path = Path(opts.out) / f"gpu_training_probe_{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
