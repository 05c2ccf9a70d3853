"""The xFormers backend: ``xformers.ops.memory_efficient_attention``.

xFormers takes BMHK tensors (batch, seq, heads, head_dim), which are our BHSD
tensors transposed: the adapter passes ``transpose(1, 2)`` views and
transposes the output back. Causal attention uses
``xformers.ops.fmha.attn_bias.LowerTriangularMask``, which is aligned to the
upper left like SDPA's ``is_causal``. Grouped-query attention uses xFormers'
5-D BMGHK form: q becomes (batch, seq, kv_heads, group, d) and k/v are
expanded (a view, no copy) along the group dimension.

Constraints follow xFormers' op declarations (``ops/fmha/cutlass.py``,
``flash.py``): CUDA, compute capability >= 5.0 (the CUTLASS kernel; xFormers
picks its flash kernel itself on sm80+), fp16/bf16/fp32, head dim a multiple
of 8 (``check_lastdim_alignment_stride1``), no explicit mask here and no
sliding window; the backward is not deterministic.

xFormers imports even when its compiled extension does not load (a wheel
built for another torch, CUDA or Python); ``memory_efficient_attention``
then has no kernel to run. The backend probe imports xFormers and reports
such an install as unavailable, with xFormers' own build-mismatch line (seen
on an H200 with xformers 0.0.35, built for torch 2.10+cu128, under torch
2.11+cu130).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "xformers_attention", "XFORMERS_KERNEL_IDS", "xformers_probe"]

_PIP = "pip install xformers"


@functools.cache
def load_library() -> tuple[Any, Any]:
    """``(memory_efficient_attention, the attn_bias module)``, imported once (``cache_clear()`` forgets them);
    xformers_varlen shares it."""
    try:
        ops = importlib.import_module("xformers.ops")
        bias = importlib.import_module("xformers.ops.fmha.attn_bias")
    except ImportError as exc:
        raise ImportError(f"xformers is not installed or broken ({exc}); install with: {_PIP}") from exc
    return ops.memory_efficient_attention, bias




def xformers_attention(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    mea, attn_bias = load_library()
    lower_triangular = attn_bias.LowerTriangularMask
    bias = lower_triangular() if is_causal else None
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BMHK views
    if hq == hkv:
        out = mea(qt, kt, vt, attn_bias=bias, p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    g = hq // hkv
    q5 = qt.reshape(b, sq, hkv, g, d)  # query head h -> (h // g, h % g), matching repeat_interleave
    k5 = kt.unsqueeze(3).expand(b, sk, hkv, g, d)
    v5 = vt.unsqueeze(3).expand(b, sk, hkv, g, v.shape[-1])
    out = mea(q5, k5, v5, attn_bias=bias, p=dropout_p, scale=scale)
    return out.reshape(b, sq, hq, v.shape[-1]).transpose(1, 2)


def _probe() -> str | None:
    """None when xFormers' compiled operators loaded, else why not (its own words, first lines)."""
    try:
        xf = importlib.import_module("xformers")
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, never raised
        return f"import xformers failed: {type(exc).__name__}: {exc}"
    if getattr(xf, "_has_cpp_library", True):
        return None
    exc = getattr(getattr(xf, "_cpp_lib", None), "_cpp_library_load_exception", None)
    detail = " ".join(line.strip() for line in str(exc or "").splitlines()[:3] if line.strip())
    return ("xformers is installed but its C++/CUDA extension did not load, so memory_efficient_attention "
            f"has no kernel to run ({detail or 'no detail given'})")


xformers_probe = _probe  # the same probe for the varlen backend module (layerzero.backends.xformers_varlen)


def _specs() -> list[KernelSpec]:
    tol = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (2e-4, 2e-4)}
    return [
        KernelSpec("xformers_attention", "attention", "xformers", xformers_attention, priority=57,
                   platforms=frozenset({"cuda"}), min_compute_capability=(5, 0),
                   dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), head_dim_multiple=8,
                   mask_kinds=frozenset({"none"}), supports_window=False, deterministic=False, compile_safe=False,
                   tolerance=tol, description="xformers.ops.memory_efficient_attention (BMHK / BMGHK views)"),
    ]


XFORMERS_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("xformers",)
KERNEL_IDS: tuple[str, ...] = XFORMERS_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the xformers backend and its kernel (idempotent)."""
    backends.register("xformers", module="xformers", pip=_PIP, probe=_probe)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
