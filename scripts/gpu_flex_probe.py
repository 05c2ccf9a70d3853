"""Which FlexAttention shapes compile on this card (layerzero's flex_attention kernel, dynamic sizes), and
whether a static-shape compile of torch's flex_attention serves the ones that do not.

Each case runs in a fresh family (scale differs per case), so every case compiles on its own. Prints one JSON
line per case: the shape, ok or the exception's type and first line, and the static retry's outcome.
Usage (GPU host): python scripts/gpu_flex_probe.py
"""
from __future__ import annotations

import itertools
import json
import sys
import time

import torch

from layerzero.backends import flex


def _static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> str:
    from torch.nn.attention.flex_attention import flex_attention
    bm = flex.block_mask_for(q.shape[2], k.shape[2], causal, None, q.device)
    fn = torch.compile(flex_attention, dynamic=False)
    try:
        out = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                                               scale=scale, enable_gqa=True)
        return f"ok (max err {float((out.float() - ref).abs().max()):.2e})"
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def main() -> None:
    n = 0
    f16, bf16 = torch.float16, torch.bfloat16
    cases = [*itertools.product((f16,), ((8, 1), (8, 2), (8, 8), (4, 1), (2, 1)), (32, 256), (64,), (False, True))]
    if "--boundary" in sys.argv:  # where the (8, 1) / 32-token failure starts and stops
        cases = [(f16, 8, 1, 64, 64, False), (f16, 8, 1, 100, 64, False), (f16, 8, 1, 127, 64, False),
                 (f16, 8, 1, 128, 64, False), (f16, 8, 1, 16, 64, False), (f16, 8, 1, 1, 64, False),
                 (f16, 16, 2, 32, 64, False), (f16, 16, 1, 8, 64, False), (f16, 16, 1, 16, 64, False),
                 (f16, 32, 4, 32, 64, False), (f16, 4, 1, 64, 64, False), (f16, 2, 1, 100, 64, False),
                 (bf16, 8, 1, 32, 128, False), (f16, 8, 1, 32, 256, False), (f16, 8, 1, 33, 64, False)]
    for case in cases:
        dtype, h, kv, s, d, causal = case if len(case) == 6 else (case[0], *case[1], *case[2:])
        n += 1
        scale = 0.125 + n * 1e-6  # a family of its own
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, h, s, d, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(1, kv, s, d, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(1, kv, s, d, device="cuda", dtype=dtype, generator=g)
        t = time.perf_counter()
        try:
            flex.flex_attention_kernel(q, k, v, None, causal, 0.0, scale, None)
            outcome, static = "ok", "-"
        except Exception as exc:  # noqa: BLE001
            outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            static = _static(q, k, v, causal, scale)
        print(json.dumps({"dtype": str(dtype), "h": h, "kv": kv, "s": s, "d": d, "causal": causal,
                          "dynamic": outcome, "static": static, "s_taken": round(time.perf_counter() - t, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
