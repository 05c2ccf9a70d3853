"""xFormers for ``lz.attention_varlen``: ``memory_efficient_attention`` with block-diagonal masks.

Written against xformers' ``ops/fmha/attn_bias.py``: the packed batch goes in as one batch row
(``(1, total, heads, head_dim)``, BMHK) with ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)`` (each
query sees its own sequence's keys) or, causal, ``BlockDiagonalCausalFromBottomRightMask.from_seqlens``
(causal per block, aligned bottom-right: these ops' meaning). ``from_seqlens`` takes Python lists, so the
offsets are read to the host. GQA uses the 5-D BMGHK form (k/v expanded along the group dimension, a view).
No sliding window and no softcap here; CUDA, fp16/bf16/fp32, head dims multiples of 8.
"""

from __future__ import annotations

from typing import Any

import torch

from layerzero.backends.xformers import load_library, xformers_probe
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "xformers_varlen"]


def xformers_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    mea, bias = load_library()
    oq, ok = cu_q.tolist(), cu_k.tolist()
    lens_q = [b - a for a, b in zip(oq[:-1], oq[1:], strict=True)]
    lens_k = [b - a for a, b in zip(ok[:-1], ok[1:], strict=True)]
    kind = bias.BlockDiagonalCausalFromBottomRightMask if is_causal else bias.BlockDiagonalMask
    mask = kind.from_seqlens(lens_q, lens_k)
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    if hq == hkv:
        return mea(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=mask, scale=scale)[0]
    g = hq // hkv
    q5 = q.reshape(1, tq, hkv, g, d)  # query head h -> (h // g, h % g), matching repeat_interleave
    k5 = k.reshape(1, tk, hkv, 1, d).expand(1, tk, hkv, g, d)
    v5 = v.reshape(1, tk, hkv, 1, v.shape[-1]).expand(1, tk, hkv, g, v.shape[-1])
    return mea(q5, k5, v5, attn_bias=mask, scale=scale).reshape(tq, hq, v.shape[-1])


def _specs() -> list[KernelSpec]:
    return [
        KernelSpec("xformers_varlen", "attention_varlen", "xformers", xformers_varlen, priority=57,
                   platforms=frozenset({"cuda"}), min_compute_capability=(5, 0),
                   dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), head_dim_multiple=8,
                   supports_window=False, deterministic=False, compile_safe=False, cuda_graph_safe=False,
                   tolerance={"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (2e-4, 2e-4)},
                   description="xformers memory_efficient_attention with BlockDiagonal(CausalFromBottomRight)Mask"),
    ]


BACKENDS: tuple[str, ...] = ("xformers",)
KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Declare xformers (as :mod:`layerzero.backends.xformers` does, same probe) and add the varlen kernel."""
    backends.register("xformers", module="xformers", pip="pip install xformers", probe=xformers_probe)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
