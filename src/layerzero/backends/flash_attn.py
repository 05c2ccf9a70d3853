"""The FlashAttention backends: FlashAttention-2 (``flash_attn``) and FlashAttention-3 (``flash_attn_interface``).

Both take (batch, seq, heads, head_dim) tensors (BSHD); our kernels get BHSD,
so the adapter passes ``transpose(1, 2)`` views (the last dimension stays
contiguous, which is all FlashAttention needs) and transposes the BSHD output
back. GQA/MQA are native (fewer KV heads that divide the query heads).

Semantics that differ from SDPA, and how the specs handle them:

* FlashAttention aligns the causal mask to the **lower right** (query ``i``
  sees keys up to ``i + seq_k - seq_q``); SDPA aligns it to the upper left. They
  agree only when ``seq_q == seq_k``, so the specs declare
  ``causal_alignment="lower_right"`` and selection rejects causal calls with
  different lengths.
* Sliding window: our ``window`` lets a query see ``window`` keys ending at its
  own position, which is ``window_size=(window - 1, 0)`` with ``causal=True``;
  FlashAttention anchors it lower-right too, so it is accepted only when
  ``seq_q == seq_k``.
* No explicit ``attn_mask``; head dims up to 256 and the value head dim equal
  to the query's. FA2 needs sm80+; FA3 is the Hopper (sm90) build and has no
  dropout. FA3's ``flash_attn_func`` returns ``out`` or ``(out, lse)``
  depending on the release; both are handled.
* Variants: both take ``softcap`` (``softcap=0.0`` is off; a positive value
  computes ``softcap * tanh(scores / softcap)`` on the scaled scores, before
  masking: flash_attn >= 2.6 and FA3). FA2 takes ``alibi_slopes`` (``(nheads,)``
  or ``(batch, nheads)`` fp32, "a bias of ``-alibi_slope * |i + seqlen_k -
  seqlen_q - j|`` is added to the attention score of query i and key j": the
  definition ``lz.attention`` uses); FA3's ``flash_attn_func`` has no ALiBi.
  Neither takes attention sinks.
* Training under ``torch.compile``: each kernel declares a forward-with-residuals / backward pair
  (:mod:`.flash_attn_pairs`, on FlashAttention's ``_flash_attn_forward`` / ``_flash_attn_backward``), so
  the compiled graph runs the kernel inside ``layerzero::kernel_attention`` (Dynamo never traces
  FlashAttention itself, hence ``compile_safe``) and its backward reuses the saved log-sum-exp.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from layerzero.backends.first_order import first_order
from layerzero.backends.flash_attn_pairs import FA2_PAIR, FA3_PAIR
from layerzero.context import SelectionContext
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "flash_attn_v2_attention", "flash_attn_v3_attention",
           "FLASH_ATTN_KERNEL_IDS"]

_PIP_V2 = "pip install flash-attn --no-build-isolation"
_PIP_V3 = "build flash-attention's hopper/ package (pip install flash-attn-3 where wheels exist)"


@functools.cache
def _func(module: str, pip: str) -> Any:
    try:
        return importlib.import_module(module).flash_attn_func
    except ImportError as exc:
        raise ImportError(f"{module} is not installed or broken ({exc}); install with: {pip}") from exc


def _window(is_causal: bool, window: int | None) -> tuple[bool, tuple[int, int]]:
    if window is None:
        return is_causal, (-1, -1)
    return True, (int(window) - 1, 0)


def flash_attn_v2_attention(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                            softcap=None, sinks=None, alibi_slopes=None):
    causal, ws = _window(is_causal, window)
    variants: dict[str, Any] = {}
    if softcap is not None:  # flash_attn >= 2.6: softcap=0.0 is off, anything > 0 caps the scaled scores
        variants["softcap"] = float(softcap)
    if alibi_slopes is not None:  # (nheads,) or (batch, nheads) fp32: -slope * |i + seqlen_k - seqlen_q - j|
        variants["alibi_slopes"] = alibi_slopes
    out = _func("flash_attn", _PIP_V2)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                       softmax_scale=scale, causal=causal, window_size=ws, **variants)
    return first_order(out.transpose(1, 2), "attention", "flash_attn_v2_attention", "torch_sdpa_math")


def flash_attn_v3_attention(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                            softcap=None, sinks=None, alibi_slopes=None):
    causal, ws = _window(is_causal, window)
    variants: dict[str, Any] = {} if softcap is None else {"softcap": float(softcap)}
    out = _func("flash_attn_interface", _PIP_V3)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 softmax_scale=scale, causal=causal, window_size=ws, **variants)
    if isinstance(out, tuple):  # releases before mid-2025 return (out, softmax_lse)
        out = out[0]
    return first_order(out.transpose(1, 2), "attention", "flash_attn_v3_attention", "torch_sdpa_math")


def _window_alignment(ctx: SelectionContext) -> list[Reason]:
    if ctx.window is not None and ctx.seq_len_q is not None and ctx.seq_len_k is not None \
            and ctx.seq_len_q != ctx.seq_len_k:
        return [Reason(ReasonCode.CAUSAL_ALIGNMENT,
                       f"sliding window is anchored lower-right, which differs from layerzero's upper-left window "
                       f"when seq_len_q={ctx.seq_len_q} != seq_len_k={ctx.seq_len_k}")]
    return []


def _specs() -> list[KernelSpec]:
    half = frozenset({torch.float16, torch.bfloat16})
    tol = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2)}
    common: dict[str, Any] = dict(platforms=frozenset({"cuda"}), dtypes=half, head_dim_max=256, head_dim_v_equal=True,
                                  mask_kinds=frozenset({"none"}), causal_alignment="lower_right", supports_window=True,
                                  deterministic=False, tolerance=tol, extra_check=_window_alignment)
    return [
        KernelSpec("flash_attn_v2_attention", "attention", "flash_attn", flash_attn_v2_attention, priority=75,
                   min_compute_capability=(8, 0), supports_softcap=True, supports_alibi=True, residual_pair=FA2_PAIR,
                   description="flash_attn.flash_attn_func (FlashAttention-2), BSHD views", **common),
        KernelSpec("flash_attn_v3_attention", "attention", "flash_attn_v3", flash_attn_v3_attention, priority=80,
                   min_compute_capability=(9, 0), max_compute_capability=(9, 0), head_dim_multiple=8,
                   supports_dropout=False, supports_softcap=True, residual_pair=FA3_PAIR,
                   description="flash_attn_interface.flash_attn_func (FlashAttention-3, Hopper)", **common),
    ]


FLASH_ATTN_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("flash_attn", "flash_attn_v3")
KERNEL_IDS: tuple[str, ...] = FLASH_ATTN_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the flash_attn (FA2) and flash_attn_v3 (FA3) backends and their kernels (idempotent)."""
    backends.register("flash_attn", module="flash_attn", pip=_PIP_V2)
    backends.register("flash_attn_v3", module="flash_attn_interface", pip=_PIP_V3)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
