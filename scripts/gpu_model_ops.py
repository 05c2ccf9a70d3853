"""Per-op breakdown of the model bench's Llama shapes on a GPU: every kernel of each patched op, and the one
layerzero picks.

For rms_norm, swiglu, rope (q and k of one layer) and linear_cross_entropy at the shapes the model bench's
Llama config runs (batch 4 x 2048 tokens, hidden 2048, 32 / 8 heads, intermediate 8192, vocabulary 128256,
bf16), it times each registered kernel (``lz.lock`` on it) forward under ``no_grad`` and forward + backward,
with ``triton.testing.do_bench`` (medians), checks each against the float32 composite, and prints which kernel
``lz.*`` selects by default. It answers "is selection leaving time on the table against Liger?" per op.

Usage (on the device machine):  python3 scripts/gpu_model_ops.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import layerzero as lz


def _inputs(dev: torch.device, dt: torch.dtype, tokens: int, hidden: int, inter: int, vocab: int,
            heads: int, kv_heads: int, seq: int) -> dict[str, tuple[tuple[Any, ...], Any]]:
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, dtype=dt, generator=g) * scale).requires_grad_(grad)

    b = tokens // seq
    d = hidden // heads
    pos = torch.arange(seq, device=dev, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    ang = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    cos, sin = ang.cos().to(dt)[None, None].expand(b, 1, seq, d), ang.sin().to(dt)[None, None].expand(b, 1, seq, d)
    target = torch.randint(0, vocab, (tokens,), device=dev, generator=g)

    def rope_ref(q: torch.Tensor, k: torch.Tensor, *_cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def rot(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.float().chunk(2, dim=-1)
            return x.float() * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float()
        return rot(q), rot(k)

    return {
        "rms_norm": ((r(tokens, hidden), r(hidden, scale=0.1) + 1, 1e-5),
                     lambda x, w, eps: F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps)),
        "swiglu": ((r(tokens, inter), r(tokens, inter)), lambda a, u: F.silu(a.float()) * u.float()),
        "rope": ((r(b, heads, seq, d), r(b, kv_heads, seq, d), cos, sin), rope_ref),
        "linear_cross_entropy": ((r(tokens, hidden), r(vocab, hidden, scale=0.02), target),
                                 lambda h, w, t: F.cross_entropy(h.float() @ w.float().T, t)),
    }


def _call(op: str, args: tuple[Any, ...]) -> Any:
    if op == "rope":
        q, k, cos, sin = args
        return lz.rope(q, cos, sin), lz.rope(k, cos, sin)
    return getattr(lz, op)(*args)


def _loss(out: Any) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().sum() for o in outs)


def _err(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(float((o.float() - r_).abs().max()) for o, r_ in zip(outs, refs))


def measure(op: str, args: tuple[Any, ...], ref: Any, kernel: str | None) -> dict[str, Any]:
    from triton.testing import do_bench

    def fwd() -> Any:
        with torch.no_grad():
            return _call(op, args)

    def fwd_bwd() -> None:
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_leaf and a.grad is not None:
                a.grad = None
        _loss(_call(op, args)).backward()

    ctx = lz.lock(op, kernel) if kernel else None
    try:
        if ctx is not None:
            ctx.__enter__()
        with torch.no_grad():
            err = _err(fwd(), ref(*args))
        which_args = (args[0], args[2], args[3]) if op == "rope" else args
        row = {"kernel": kernel or lz.which(op, *which_args),
               "max_abs_err_vs_fp32": err,
               "fwd_ms": do_bench(fwd, warmup=10, rep=60),
               "fwd_bwd_ms": do_bench(fwd_bwd, warmup=10, rep=60)}
    except Exception as exc:  # a kernel that cannot run here: say why
        row = {"kernel": kernel or "(default)", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    torch.cuda.synchronize()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--tag", default="", help="file-name suffix (\"tuned\": after layerzero tune)")
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(0).replace(" ", "_")
    cases = _inputs(dev, torch.bfloat16, tokens=8192, hidden=2048, inter=8192, vocab=128256, heads=32, kv_heads=8,
                    seq=2048)
    report: dict[str, Any] = {"card": card, "perf_db": os.environ.get("LAYERZERO_PERF_DB"),
                              "torch": torch.__version__, "dtype": "bfloat16",
                              "shapes": "tokens 8192 (4 x 2048), hidden 2048, intermediate 8192, 32/8 heads, "
                                        "head_dim 64, vocabulary 128256", "ops": {}}
    for op, (args, ref) in cases.items():
        kernels = [s.kernel_id for s in lz.list_kernels() if s.operation == op]
        rows = [dict(measure(op, args, ref, None), default=True)]
        rows += [measure(op, args, ref, kid) for kid in kernels]
        report["ops"][op] = rows
        for row in rows:
            tag = "default -> " if row.get("default") else "          "
            if "error" in row:
                print(f"{op:22s} {tag}{row['kernel']:36s} {row['error']}")
            else:
                print(f"{op:22s} {tag}{row['kernel']:36s} fwd {row['fwd_ms']:7.3f} ms  fwd+bwd "
                      f"{row['fwd_bwd_ms']:7.3f} ms  err {row['max_abs_err_vs_fp32']:.2e}")
    path = Path(opts.out) / f"gpu_model_ops{'_' + opts.tag if opts.tag else ''}_{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
