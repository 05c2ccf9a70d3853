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

Training under ``torch.compile`` uses xFormers' residual API (``xformers.ops.fmha``, unchanged from 0.0.23
to 0.0.35 and re-exported from ``mslk`` since): ``memory_efficient_attention_forward_requires_grad(query,
key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None) -> (out, lse)`` and
``memory_efficient_attention_backward(grad, output, lse, query, key, value, attn_bias=None, p=0.0,
scale=None, *, op=None) -> (dq, dk, dv)`` (:data:`XFORMERS_PAIR`). Both raise for ``p != 0`` ("dropout is
not supported on the non-autograd API"), so the pair declines dropout and such a call runs as the
dispatched op. The lse is float32 [B, H, M] ([B, G, H, M] for BMGHK); the CUTLASS kernel pads M to a
multiple of 32, the flash kernel does not, so the pair keeps ``lse[..., :seq_q]`` as (batch, heads,
seq_q): a shape that does not depend on which op ran, and one both backward ops accept (CUTLASS pads it
again itself, ``Context.get_padded_lse(32)``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from layerzero.backends.first_order import first_order
from layerzero.context import SelectionContext
from layerzero.errors import KernelNotSupportedError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode, ResidualPair

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "xformers_attention", "XFORMERS_KERNEL_IDS", "xformers_probe",
           "load_fmha", "XFORMERS_PAIR", "xformers_forward", "xformers_backward", "xformers_fake"]

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


@functools.cache
def load_fmha() -> tuple[Any, Any]:
    """``(memory_efficient_attention_forward_requires_grad, memory_efficient_attention_backward)``."""
    try:
        fmha = importlib.import_module("xformers.ops.fmha")
    except ImportError as exc:
        raise ImportError(f"xformers is not installed or broken ({exc}); install with: {_PIP}") from exc
    return fmha.memory_efficient_attention_forward_requires_grad, fmha.memory_efficient_attention_backward


def _views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """BMHK views of BHSD q, k, v; for GQA the 5-D BMGHK form (k/v expanded along the group, no copy)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hq == hkv:
        return qt, kt, vt
    g = hq // hkv
    # query head h -> (h // g, h % g), matching repeat_interleave
    return (qt.reshape(b, sq, hkv, g, d), kt.unsqueeze(3).expand(b, sk, hkv, g, d),
            vt.unsqueeze(3).expand(b, sk, hkv, g, v.shape[-1]))


def _bias(is_causal: bool) -> Any:
    return load_library()[1].LowerTriangularMask() if is_causal else None


def xformers_attention(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    mea = load_library()[0]
    out = mea(*_views(q, k, v), attn_bias=_bias(is_causal), p=dropout_p, scale=scale)
    b, hq, sq, _ = q.shape
    return first_order(out.reshape(b, sq, hq, v.shape[-1]).transpose(1, 2), "attention", "xformers_attention",
                       "torch_sdpa_math")


def _no_dropout(dropout_p: float) -> None:
    if dropout_p > 0:
        raise KernelNotSupportedError(f"xformers' residual API has no dropout (dropout_p={dropout_p}); "
                                      "under torch.compile such a call runs as the dispatched op")


def xformers_forward(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    """``memory_efficient_attention_forward_requires_grad``: ``(out, (lse,))``, lse (batch, heads, seq_q)."""
    _no_dropout(dropout_p)
    fwd = load_fmha()[0]
    out, lse = fwd(*_views(q, k, v), attn_bias=_bias(is_causal), p=0.0, scale=scale)
    b, hq, sq, _ = q.shape
    lse = lse[..., :sq].reshape(b, hq, sq)  # [B, H, M] or [B, G, H, M], M padded to 32 by CUTLASS
    return out.reshape(b, sq, hq, v.shape[-1]).transpose(1, 2), (lse.contiguous(),)


def xformers_backward(grad, args, out, residuals):  # type: ignore[no-untyped-def]
    """``memory_efficient_attention_backward`` on the saved output and lse: ``(dq, dk, dv)`` in BHSD."""
    q, k, v, _mask, is_causal, dropout_p, scale, _window = args[:8]
    _no_dropout(dropout_p)
    qv, kv, vv = _views(q, k, v)
    b, hq, sq, _ = q.shape
    shape = qv.shape[:-1] + (v.shape[-1],)  # BMHK / BMGHK of the output
    out_v = out.transpose(1, 2).reshape(shape).contiguous()
    grad_v = grad.transpose(1, 2).reshape(shape).contiguous()
    lse = residuals[0] if qv.dim() == 4 else residuals[0].reshape(b, kv.shape[2], kv.shape[3], sq)
    dq, dk, dv = load_fmha()[1](grad_v, out_v, lse, qv, kv, vv, attn_bias=_bias(is_causal), p=0.0, scale=scale)
    if qv.dim() == 5:  # each expanded group slot got its own gradient: sum them per kv head
        dq, dk, dv = dq.reshape(b, sq, hq, q.shape[-1]), dk.sum(3), dv.sum(3)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def xformers_fake(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    """The residual's metadata: a float32 (batch, heads, seq_q) lse (the padding sliced off)."""
    return (q.new_empty(q.shape[:3], dtype=torch.float32),)


def _pair_check(ctx: SelectionContext) -> list[Reason]:
    if ctx.dropout_p > 0:
        return [Reason(ReasonCode.DROPOUT_UNSUPPORTED, f"dropout_p={ctx.dropout_p}: xformers' residual API "
                       "(memory_efficient_attention_forward_requires_grad) has no dropout")]
    return []


#: xFormers' forward-with-lse and backward, for a compiled graph that runs the kernel opaquely.
XFORMERS_PAIR = ResidualPair(xformers_forward, xformers_backward, xformers_fake, check=_pair_check)


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
                   mask_kinds=frozenset({"none"}), supports_window=False, deterministic=False,
                   residual_pair=XFORMERS_PAIR, tolerance=tol,
                   description="xformers.ops.memory_efficient_attention (BMHK / BMGHK views)"),
    ]


XFORMERS_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("xformers",)
KERNEL_IDS: tuple[str, ...] = XFORMERS_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the xformers backend and its kernel (idempotent)."""
    backends.register("xformers", module="xformers", pip=_PIP, probe=_probe)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
