#!/usr/bin/env python3
"""GPU probe: where a kernel's time goes (host launch vs GPU), and whether carried libraries run.

One device call, about two minutes. For each probed call it prints:

* ``bench``: ``triton.testing.do_bench`` medians (the tuner's 5+20 ms window, several alternating runs, and a
  long 25+100 ms window), which is what back-to-back calls cost: max(host launch, GPU time);
* ``host``: the host's cost per call, measured while the GPU is held busy by ``torch.cuda._sleep`` so
  that only launching is timed;
* ``gpu``: the GPU's time per call, replayed from a CUDA graph (where the call can be captured).

A call whose ``host`` time reaches its ``bench`` time is host-bound: layerzero's dispatch overhead adds to
it one for one, and its timing follows the host CPU's state. It also checks that a carried xFormers
imports and matches SDPA. Writes ``gpu_probe_<card>.json`` to ``$OUT`` or ``benchmarks/results/``.

    python scripts/gpu_probe.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero.backends import liger  # noqa: E402
from layerzero.backends.torch import elementwise as torch_elementwise  # noqa: E402
from layerzero.backends.torch import losses as torch_losses  # noqa: E402


def bench_us(fn: Any, warmup: float = 5.0, rep: float = 20.0) -> float:
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1000.0


def host_us(fn: Any, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(60e6))  # ~30 ms of GPU spinning: the launches below only queue
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def gpu_us(fn: Any, n: int = 20) -> float | None:
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        return bench_us(g.replay) / n
    except Exception as exc:  # not capturable
        return None if not str(exc) else None


def probe(name: str, fns: dict[str, Any], rounds: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            runs[k].append(bench_us(fns[k]))
    for k, fn in fns.items():
        out[k] = {"bench_5_20": [round(x, 2) for x in runs[k]], "bench_25_100": round(bench_us(fn, 25, 100), 2),
                  "host": round(host_us(fn), 2), "gpu": (lambda g: g and round(g, 2))(gpu_us(fn))}
    print(f"\n== {name}")
    for k, r in out.items():
        print(f"  {k:<28} bench(5+20) {statistics.median(r['bench_5_20']):7.2f} us {r['bench_5_20']}  "
              f"bench(25+100) {r['bench_25_100']:7.2f}  host {r['host']:7.2f}  gpu {r['gpu']}", flush=True)
    return out


def main() -> int:
    dev = torch.device("cuda")
    card = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(dev)).strip("_")
    print(f"card {card}; torch {torch.__version__}; lz backends:",
          {b.name: b.available for b in lz.get_runtime().backends.all()}, flush=True)
    results: dict[str, Any] = {"card": card, "torch": torch.__version__}
    g = torch.Generator(device=dev)
    g.manual_seed(0)

    def rn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g)

    with torch.no_grad():
        # xFormers, carried as a wheel
        try:
            import xformers
            import xformers.ops as xops
            from xformers.ops.fmha.attn_bias import LowerTriangularMask

            q, k, v = (rn(2, 256, 8, 64, dtype=torch.float16) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True).transpose(1, 2)
            got = xops.memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())
            err = (got.float() - ref.float()).abs().max().item()
            results["xformers"] = {"version": xformers.__version__, "max_err_vs_sdpa": err}
            print(f"xformers {xformers.__version__}: causal max err vs SDPA {err:.2e}", flush=True)
        except Exception as exc:
            results["xformers"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"xformers: {type(exc).__name__}: {exc}", flush=True)

        for rows, hidden in ((4096, 4096), (8192, 8192), (2048, 2048), (1, 4096)):
            x, w = rn(rows, hidden), rn(hidden) + 0.5
            results[f"rms_{rows}x{hidden}"] = probe(f"rms_norm {rows}x{hidden} bf16", {
                "F.rms_norm": lambda x=x, w=w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                "liger_rms_norm": lambda x=x, w=w: liger.liger_rms_norm(x, w, 1e-6),
                "lz.rms_norm": lambda x=x, w=w: lz.rms_norm(x, w, 1e-6),
            })

        q, k, v = rn(1, 32, 512, 128, dtype=torch.float16), rn(1, 8, 512, 128, dtype=torch.float16), \
            rn(1, 8, 512, 128, dtype=torch.float16)
        results["attn_gqa_b1_s512"] = probe("causal b=1 s=512 h=32/8 d=128 fp16", {
            "F.sdpa(enable_gqa)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "lz.attention": lambda: lz.attention(q, k, v, is_causal=True),
        })
        print("  lz.explain shape_free:", lz.explain(q, k, v, is_causal=True, operation="attention.causal").shape_free,
              flush=True)

        q, k, v = (rn(8, 16, 512, 64, dtype=torch.float16) for _ in range(3))
        results["attn_mha_b8_s512"] = probe("causal b=8 s=512 h=16 d=64 fp16 (MHA)", {
            "F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "F.sdpa(enable_gqa=True)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True),
            "lz.attention": lambda: lz.attention(q, k, v, is_causal=True),
        })

        for rows, inter in ((1, 14336), (128, 14336), (4096, 14336), (16384, 14336), (4096, 24576)):
            a, b = rn(rows, inter), rn(rows, inter)
            results[f"geglu_{rows}x{inter}"] = probe(f"geglu {rows}x{inter} bf16", {
                "torch_geglu": lambda a=a, b=b: torch_elementwise.torch_geglu(a, b, "tanh"),
                "liger_geglu": lambda a=a, b=b: liger.liger_geglu(a, b, "tanh"),
            }, rounds=2)

        for rows, vocab in ((1024, 32000), (4096, 128256), (8192, 32000), (2048, 256000)):
            logits = rn(rows, vocab)
            target = torch.randint(0, vocab, (rows,), device=dev, generator=g)
            results[f"ce_{rows}x{vocab}"] = probe(f"cross_entropy {rows}x{vocab} bf16", {
                "torch_cross_entropy": lambda lg=logits, t=target: torch_losses.torch_cross_entropy(
                    lg, t, -100, 0.0, "mean"),
                "liger_cross_entropy": lambda lg=logits, t=target: liger.liger_cross_entropy(
                    lg, t, -100, 0.0, "mean"),
            }, rounds=2)
            del logits

    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu_probe_{card}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
