"""GPU check and timings for lz.attention_varlen / lz.attention_paged (run on an H200 in < 4 minutes).

1. Correctness on CUDA: every available varlen / paged kernel against the float64 reference (bf16).
2. Packed training attention (varlen) against padded SDPA for a realistic length mix: tokens/s.
3. Paged decode against dense decode (SDPA on contiguous K/V) at batch 1-64 and contexts 1k-32k, per kernel.

Usage: ``PYTHONPATH=src python scripts/gpu_varlen_paged.py [--quick]``; JSON goes to ``$OUT`` (or
benchmarks/results/) as ``gpu_varlen_paged.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import layerzero as lz
from layerzero.ops.attention_paged import page_table, paged_reference
from layerzero.ops.attention_varlen import cu_seqlens, varlen_reference
from layerzero.registry import get_global_backend_registry, get_global_kernel_registry

DEV = "cuda"
DT = torch.bfloat16


def _kernels(operation: str, ctx: Any) -> list[Any]:
    backends = get_global_backend_registry()
    return [s for s in get_global_kernel_registry().for_operation(operation)
            if backends.is_available(s.backend) and not s.check(ctx)]


def _packed(lens: list[int], h: int, hkv: int, d: int) -> tuple[Any, ...]:
    t = sum(lens)
    q = torch.randn(t, h, d, device=DEV, dtype=DT)
    k = torch.randn(t, hkv, d, device=DEV, dtype=DT)
    v = torch.randn(t, hkv, d, device=DEV, dtype=DT)
    cu = cu_seqlens(lens, DEV)
    return q, k, v, cu, cu, max(lens), max(lens)


def _paged(b: int, ctx_len: int, h: int, hkv: int, d: int, page: int) -> tuple[Any, ...]:
    max_pages = -(-ctx_len // page)
    pages = b * max_pages
    q = torch.randn(b, 1, h, d, device=DEV, dtype=DT)
    kc = torch.randn(pages, page, hkv, d, device=DEV, dtype=DT)
    vc = torch.randn(pages, page, hkv, d, device=DEV, dtype=DT)
    table = page_table([ctx_len] * b, page, max_pages, pages, None, DEV)
    return q, kc, vc, table, torch.full((b,), ctx_len, dtype=torch.int32, device=DEV)


def correctness() -> list[dict[str, Any]]:
    rows = []
    args = _packed([300, 1, 0, 77, 512], 8, 2, 128)
    op = lz.ops.OPS["attention_varlen"]
    for kw in ({"is_causal": True}, {"is_causal": True, "window": 64}, {"is_causal": True, "softcap": 30.0}):
        full = (*args, kw.get("is_causal", False), None, kw.get("window"), kw.get("softcap"))
        ref = varlen_reference(*full)
        for spec in _kernels("attention_varlen", op.context("attention_varlen", full)):
            try:
                err = (spec.impl(*full).double() - ref).abs().max().item()
            except Exception as exc:  # reported, not fatal
                rows.append({"op": "attention_varlen", "kernel": spec.kernel_id, "variant": kw,
                             "error": f"{type(exc).__name__}: {exc}"[:200], "ok": False})
                continue
            rows.append({"op": "attention_varlen", "kernel": spec.kernel_id, "variant": kw, "max_err": err,
                         "ok": err < 3e-2})
    pop = lz.ops.OPS["attention_paged"]
    for page in (16, 256):
        q, kc, vc, table, _ = _paged(4, 700, 8, 2, 128, page)
        for sq, window in ((1, None), (4, None), (1, 100), (160, None), (160, 200)):
            lens = torch.tensor([700, sq, 333, 512], dtype=torch.int32, device=DEV)  # >= seq_q: the new tokens
            qs = torch.randn(4, sq, 8, 128, device=DEV, dtype=DT)
            full = (qs, kc, vc, table, lens, True, None, window, None)
            ref = paged_reference(*full)
            for spec in _kernels("attention_paged", pop.context("attention_paged", full)):
                try:
                    err = (spec.impl(*full).double() - ref).abs().max().item()
                except Exception as exc:  # reported, not fatal: the other kernels still get checked and timed
                    rows.append({"op": "attention_paged", "kernel": spec.kernel_id, "page": page, "seq_q": sq,
                                 "window": window, "error": f"{type(exc).__name__}: {exc}"[:200], "ok": False})
                    continue
                rows.append({"op": "attention_paged", "kernel": spec.kernel_id, "page": page, "seq_q": sq,
                             "window": window, "max_err": err, "ok": err < 3e-2})
    return rows


def _time(fn: Any, **kw: Any) -> float | None:
    """do_bench's median in ms, or None when the kernel cannot run the shape (printed, not fatal)."""
    try:
        return do_bench(fn, **kw)
    except Exception as exc:
        print(f"  cannot time: {type(exc).__name__}: {str(exc)[:160]}")
        return None


def packed_vs_padded(quick: bool) -> list[dict[str, Any]]:
    """A packing mix like instruction tuning: many short, some long, 32k tokens a batch."""
    rng = random.Random(0)
    lens: list[int] = []
    while sum(lens) < 32768:
        lens.append(min(4096, int(rng.lognormvariate(6.0, 1.0)) + 16))
    lens[-1] -= sum(lens) - 32768
    h, hkv, d = 32, 8, 128
    args = _packed(lens, h, hkv, d)
    tokens = sum(lens)
    rows = []
    op = lz.ops.OPS["attention_varlen"]
    full = (*args, True, None, None, None)
    for spec in _kernels("attention_varlen", op.context("attention_varlen", full)):
        if spec.kernel_id == "torch_varlen_sdpa" and quick:
            continue
        ms = _time(lambda s=spec: s.impl(*full), warmup=10, rep=50)
        rows.append({"kernel": spec.kernel_id, "ms": ms, "tokens_per_s": tokens / ms * 1e3 if ms else None})
        if spec.kernel_id == "flex_attention_varlen":  # once per packed layout (a forward's layers share it)
            from layerzero.backends import flex_varlen

            ms = _time(lambda: (flex_varlen.MASKS.clear(), flex_varlen.varlen_block_mask(
                args[3], args[4], tokens, tokens, True, None)), warmup=5, rep=25)
            rows.append({"kernel": "flex_attention_varlen: block mask build", "ms": ms})
    b, s = len(lens), max(lens)  # padded: every sequence to the longest
    qp = torch.randn(b, h, s, d, device=DEV, dtype=DT)
    kp = torch.randn(b, hkv, s, d, device=DEV, dtype=DT)
    ms = do_bench(lambda: F.scaled_dot_product_attention(qp, kp, kp, is_causal=True, enable_gqa=True), warmup=5, rep=30)
    rows.append({"kernel": "padded_sdpa", "ms": ms, "tokens_per_s": tokens / ms * 1e3, "padded_tokens": b * s})
    return [{"sequences": len(lens), "tokens": tokens, "longest": max(lens), **r} for r in rows]


def paged_vs_dense(quick: bool) -> list[dict[str, Any]]:
    rows = []
    h, hkv, d, page = 32, 8, 128, 16
    pop = lz.ops.OPS["attention_paged"]
    grid = [(b, c) for b in (1, 8, 64) for c in (1024, 8192, 32768) if b * c <= 64 * 8192 * (1 if quick else 4)]
    for b, ctx_len in grid:
        for pg in (page, 256):
            args = _paged(b, ctx_len, h, hkv, d, pg)
            full = (*args, True, None, None, None)
            for spec in _kernels("attention_paged", pop.context("attention_paged", full)):
                if spec.kernel_id == "torch_paged_sdpa" and b > 8:
                    continue  # one SDPA per sequence: measured at small batch only
                ms = _time(lambda s=spec: s.impl(*full), warmup=5, rep=25)
                rows.append({"batch": b, "context": ctx_len, "page": pg, "kernel": spec.kernel_id,
                             "us": ms * 1e3 if ms else None})
                if spec.kernel_id == "flex_attention_paged":  # once per decode step (its layers share it)
                    from layerzero.backends import flex_paged

                    ms = _time(lambda: (flex_paged.MASKS.clear(), flex_paged.paged_block_mask(
                        args[3], args[4], 1, args[1].shape[0], pg, True, None)), warmup=5, rep=25)
                    rows.append({"batch": b, "context": ctx_len, "page": pg,
                                 "kernel": "flex_attention_paged: block mask build", "us": ms * 1e3 if ms else None})
        q = torch.randn(b, h, 1, d, device=DEV, dtype=DT)
        k = torch.randn(b, hkv, ctx_len, d, device=DEV, dtype=DT)
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, k, enable_gqa=True), warmup=5, rep=25)
        rows.append({"batch": b, "context": ctx_len, "page": None, "kernel": "dense_sdpa", "us": ms * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    t0 = time.time()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quick": quick}
    out["correctness"] = correctness()
    out["packed_vs_padded"] = packed_vs_padded(quick)
    out["paged_vs_dense"] = paged_vs_dense(quick)
    out["seconds"] = time.time() - t0
    dest = Path(os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu_varlen_paged.json").write_text(json.dumps(out, indent=1, default=str))
    for r in out["correctness"]:
        print("check", r)
    for r in out["packed_vs_padded"] + out["paged_vs_dense"]:
        print(r)
    print(f"done in {out['seconds']:.0f} s; all correct: {all(r['ok'] for r in out['correctness'])}")


if __name__ == "__main__":
    main()
