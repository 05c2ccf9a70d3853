"""The torch attention kernels: adapters ``(q, k, v, attn_mask, is_causal, dropout_p, scale, window)``, BHSD.

``torch_sdpa_gqa`` and ``torch_sdpa_math`` also take ``sinks`` and ``alibi_slopes`` (an additive mask and a
sink key, :mod:`.attention_variants`); no SDPA kernel can apply a softcap.

Attention goes to each SDPA kernel directly through its aten binding (flash,
memory-efficient, cuDNN, math, CPU flash) rather than through the
``sdpa_kernel`` context manager, which costs tens of microseconds per call on a
GPU host. ``torch_sdpa`` is ``F.scaled_dot_product_attention`` itself:
PyTorch's own choice, kept as a candidate so layerzero is never worse than it.
Calling an aten op directly skips the fix-ups ``F.scaled_dot_product_attention``
does (head-dim padding, bool -> additive masks, ``enable_gqa``), so where the
op is stricter than the public function the adapter does the fix-up or the spec
(:mod:`.attention_specs`) says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerzero.backends.torch.attention_variants import variant_inputs
from layerzero.backends.torch.capabilities import GQA_NATIVE
from layerzero.tensor_helpers import window_mask

__all__ = ["torch_sdpa", "torch_sdpa_gqa", "torch_sdpa_math", "torch_sdpa_flash", "torch_sdpa_efficient",
           "torch_sdpa_cudnn", "torch_sdpa_flash_cpu", "flash_cpu_forward", "flash_cpu_backward", "flash_cpu_fake"]

_sdpa = F.scaled_dot_product_attention


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as the additive float mask the aten kernels expect (SDPA's
    ``convert_boolean_attn_mask``): 0 where attended, -inf elsewhere."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _windowed(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, window: int | None
              ) -> tuple[torch.Tensor | None, bool]:
    """Fold causal + sliding window into a boolean mask (SDPA has no window argument)."""
    if window is None:
        return mask, is_causal
    keep = window_mask(q.shape[2], k.shape[2], window, True, q.device)
    if mask is not None:
        keep = keep & mask if mask.dtype == torch.bool else torch.zeros_like(mask).masked_fill(~keep, -math.inf) + mask
    return keep, False


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _wants_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # The fused CUDA kernels only save the log-sum-exp their backward needs when asked to.
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


_flash = getattr(torch, "_scaled_dot_product_flash_attention", None)
_efficient = getattr(torch, "_scaled_dot_product_efficient_attention", None)
_cudnn = getattr(torch, "_scaled_dot_product_cudnn_attention", None)
_flash_cpu = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)


# Hot-path note: keyword arguments cost ~1 us per call in torch's argument parser, and ``torch.ops.aten.X``
# several more than the ``torch.X`` binding, so the adapters pass ``scale`` only when it is set and call
# the ``torch._scaled_dot_product_*`` bindings.

def torch_sdpa(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _sdpa(q, k, v, mask, dropout_p, is_causal)
    return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale)


def torch_sdpa_gqa(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                   softcap=None, sinks=None, alibi_slopes=None):
    if sinks is not None or alibi_slopes is not None:  # as an additive mask (and a sink key): attention_variants
        k, v, mask, is_causal = variant_inputs(q, k, v, mask, is_causal, window, sinks, alibi_slopes)
    else:
        mask, is_causal = _windowed(q, k, mask, is_causal, window)
    if q.shape[1] != k.shape[1]:
        if GQA_NATIVE:
            return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
        k, v = _expand_kv(q, k, v)
    return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale)


def torch_sdpa_math(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                    softcap=None, sinks=None, alibi_slopes=None):
    if sinks is not None or alibi_slopes is not None:
        k, v, mask, is_causal = variant_inputs(q, k, v, mask, is_causal, window, sinks, alibi_slopes)
    else:
        mask, is_causal = _windowed(q, k, mask, is_causal, window)
    if q.shape[1] != k.shape[1]:
        k, v = _expand_kv(q, k, v)
    if mask is not None:  # the aten math op adds a bool mask as 0/1 instead of masking with it
        mask = _additive(mask, q.dtype)
    return torch._scaled_dot_product_attention_math(q, k, v, mask, dropout_p, is_causal, scale=scale)[0]


def torch_sdpa_flash(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _flash(q, k, v, dropout_p, is_causal)[0]
    return _flash(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


def torch_sdpa_efficient(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _efficient(q, k, v, None, _wants_lse(q, k, v), dropout_p, is_causal)[0]
    return _efficient(q, k, v, None, _wants_lse(q, k, v), dropout_p, is_causal, scale=scale)[0]


def torch_sdpa_cudnn(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _cudnn(q, k, v, None, _wants_lse(q, k, v), dropout_p, is_causal)[0]
    return _cudnn(q, k, v, None, _wants_lse(q, k, v), dropout_p, is_causal, False, scale=scale)[0]


def torch_sdpa_flash_cpu(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if mask is not None:
        # The aten op takes only a float mask of q's dtype with 2 or 4 dims (SDPA converts first).
        mask = _additive(mask, q.dtype)
        if mask.dim() not in (2, 4):
            mask = mask[(None,) * (4 - mask.dim())]
    if mask is None and scale is None:
        return _flash_cpu(q, k, v, dropout_p, is_causal)[0]
    return _flash_cpu(q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale)[0]


def _flash_cpu_mask(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = _additive(mask, q.dtype)
    return mask if mask.dim() in (2, 4) else mask[(None,) * (4 - mask.dim())]


def flash_cpu_forward(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    """The CPU flash kernel keeping its log-sum-exp: ``(out, (lse,))`` for :data:`FLASH_CPU_PAIR`."""
    out, lse = _flash_cpu(q, k, v, dropout_p, is_causal, attn_mask=_flash_cpu_mask(q, mask), scale=scale)
    return out, (lse.contiguous(),)


def flash_cpu_backward(grad, args, out, residuals):  # type: ignore[no-untyped-def]
    """``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` on the saved output and log-sum-exp."""
    q, k, v, mask, is_causal, dropout_p, scale, _window = args
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, residuals[0], dropout_p, is_causal, attn_mask=_flash_cpu_mask(q, mask), scale=scale)
    return dq, dk, dv, None


def flash_cpu_fake(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    """The residuals' metadata: a float32 (batch, heads, seq_q) log-sum-exp."""
    return (q.new_empty(q.shape[:3], dtype=torch.float32),)
