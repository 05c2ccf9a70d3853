"""The torch backend: PyTorch's own kernels, registered whenever torch imports.

Attention goes to each SDPA kernel directly through its aten op (flash,
memory-efficient, cuDNN, math, CPU flash) rather than through the
``sdpa_kernel`` context manager, which costs tens of microseconds per call on a
GPU host. ``torch_sdpa`` is ``F.scaled_dot_product_attention`` itself:
PyTorch's own choice, kept as a candidate so layerzero is never worse than it.

Constraints follow PyTorch's ``sdp_utils`` checks (``check_flash_attention_
hardware_support``, ``check_head_dim_size_flash``,
``check_flash_causal_non_square_seqlens``, ...). Where the aten op is stricter
than the public function (no GQA in the direct memory-efficient call, no mask
for direct flash), the spec says so and selection picks another kernel.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from layerzero.ops._shared import half_cos_sin, window_mask
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

__all__ = ["register", "TORCH_KERNEL_IDS"]

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_GQA_KW = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

_sdpa = F.scaled_dot_product_attention
_aten = torch.ops.aten


# -- attention adapters: (q, k, v, attn_mask, is_causal, dropout_p, scale, window), BHSD --------------

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


def torch_sdpa(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale)


def torch_sdpa_gqa(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    mask, is_causal = _windowed(q, k, mask, is_causal, window)
    if q.shape[1] != k.shape[1]:
        if _GQA_KW:
            return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
        k, v = _expand_kv(q, k, v)
    return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale)


def torch_sdpa_math(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    mask, is_causal = _windowed(q, k, mask, is_causal, window)
    if q.shape[1] != k.shape[1]:
        k, v = _expand_kv(q, k, v)
    return _aten._scaled_dot_product_attention_math(q, k, v, mask, dropout_p, is_causal, scale=scale)[0]


def torch_sdpa_flash(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    return _aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


def torch_sdpa_efficient(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, dropout_p, is_causal, scale=scale)[0]


def torch_sdpa_cudnn(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _aten._scaled_dot_product_cudnn_attention(q, k, v, None, grad, dropout_p, is_causal, False,
                                                     scale=scale)[0]


def torch_sdpa_flash_cpu(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=mask,
                                                            scale=scale)[0]


# -- norms -----------------------------------------------------------------------------------------

_rms = torch.rms_norm if hasattr(torch, "rms_norm") else None


def torch_rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return _rms(x, x.shape[-1:], weight, eps)  # type: ignore[misc]


def torch_rms_norm_composed(x, weight, eps):  # type: ignore[no-untyped-def]
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def torch_layer_norm(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    return torch.layer_norm(x, x.shape[-1:], weight, bias, eps)


def torch_layer_norm_composed(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# -- rope and activations ---------------------------------------------------------------------------

def torch_rope(x, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    c, s = half_cos_sin(x, cos, sin, False)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def torch_rope_interleaved(x, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    c, s = half_cos_sin(x, cos, sin, True)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def torch_swiglu(gate, up):  # type: ignore[no-untyped-def]
    return F.silu(gate) * up


def torch_gelu(x, approximate):  # type: ignore[no-untyped-def]
    return F.gelu(x, approximate=approximate)


def torch_silu(x):  # type: ignore[no-untyped-def]
    return F.silu(x)


# -- sampling -----------------------------------------------------------------------------------------

def torch_sample_greedy(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    return logits.argmax(-1)


def torch_sample(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sp.masked_fill(drop, 0.0))
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])


def torch_sample_gumbel(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    """Sampling by the Gumbel-max trick: argmax(logits / T + Gumbel noise); no top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    g = -torch.log(-torch.log(u.clamp_(min=1e-20)))
    return (logits.float() / temperature + g).argmax(-1)


# -- registration -------------------------------------------------------------------------------------

def _specs() -> list[KernelSpec]:
    cuda = frozenset({"cuda"})
    cpu = frozenset({"cpu"})
    tol16 = {"float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2), "float32": (2e-5, 2e-5), "float64": (1e-9, 1e-9)}
    # On CUDA, float32 SDPA kernels may use TF32-free paths but different summation orders.
    tol_attn = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (1e-4, 1e-4),
                "float64": (1e-9, 1e-9)}
    specs: list[KernelSpec] = [
        KernelSpec("torch_sdpa", "attention", "torch", torch_sdpa, priority=70, dtypes=_FLOATS,
                   supports_gqa=False, supports_mqa=False, tolerance=tol_attn,
                   description="F.scaled_dot_product_attention: PyTorch's own kernel choice"),
        KernelSpec("torch_sdpa_gqa", "attention", "torch", torch_sdpa_gqa, priority=55, dtypes=_FLOATS,
                   supports_window=True, tolerance=tol_attn,
                   description="F.scaled_dot_product_attention with native GQA (enable_gqa) and sliding windows"),
        KernelSpec("torch_sdpa_flash", "attention", "torch", torch_sdpa_flash, priority=65, platforms=cuda,
                   min_compute_capability=(8, 0), dtypes=_HALF, head_dim_max=256, head_dim_multiple=8,
                   head_dim_v_equal=True, mask_kinds={"none"}, causal_alignment="lower_right",
                   supports_gqa=False, supports_mqa=False, requires_contiguous=True, tolerance=tol_attn,
                   description="aten::_scaled_dot_product_flash_attention (FlashAttention-2 in PyTorch)"),
        KernelSpec("torch_sdpa_efficient", "attention", "torch", torch_sdpa_efficient, priority=60,
                   platforms=cuda, min_compute_capability=(5, 0), dtypes=_HALF | {torch.float32},
                   head_dim_multiple=8, mask_kinds={"none"}, supports_gqa=False, supports_mqa=False,
                   requires_contiguous=True, tolerance=tol_attn,
                   description="aten::_scaled_dot_product_efficient_attention (xFormers/CUTLASS kernel in PyTorch)"),
        KernelSpec("torch_sdpa_cudnn", "attention", "torch", torch_sdpa_cudnn, priority=58, platforms=cuda,
                   min_compute_capability=(8, 0), dtypes=_HALF, head_dim_max=128, head_dim_multiple=8,
                   head_dim_v_equal=True, mask_kinds={"none"}, causal_alignment="lower_right",
                   supports_gqa=False, supports_mqa=False, supports_dropout=False, requires_contiguous=True,
                   tolerance=tol_attn, description="aten::_scaled_dot_product_cudnn_attention (cuDNN fused attention)"),
        KernelSpec("torch_sdpa_flash_cpu", "attention", "torch", torch_sdpa_flash_cpu, priority=60, platforms=cpu,
                   dtypes=_FLOATS, mask_kinds={"none", "additive"}, supports_gqa=False, supports_mqa=False,
                   supports_dropout=False, tolerance=tol_attn,
                   description="aten::_scaled_dot_product_flash_attention_for_cpu (fused CPU kernel)"),
        KernelSpec("torch_sdpa_math", "attention", "torch", torch_sdpa_math, priority=10, dtypes=_FLOATS,
                   supports_window=True, tolerance=tol_attn,
                   description="aten::_scaled_dot_product_attention_math (reference composite, any device)"),
        KernelSpec("torch_rms_norm", "rms_norm", "torch", torch_rms_norm, priority=60, dtypes=_FLOATS,
                   tolerance=tol16, description="torch.rms_norm (fused on CPU and CUDA)"),
        KernelSpec("torch_rms_norm_composed", "rms_norm", "torch", torch_rms_norm_composed, priority=20,
                   dtypes=_FLOATS, tolerance=tol16,
                   description="x * rsqrt(mean(x^2) + eps) * weight in float32 (HF LlamaRMSNorm arithmetic)"),
        KernelSpec("torch_layer_norm", "layer_norm", "torch", torch_layer_norm, priority=60, dtypes=_FLOATS,
                   tolerance=tol16, description="torch.layer_norm"),
        KernelSpec("torch_layer_norm_composed", "layer_norm", "torch", torch_layer_norm_composed, priority=20,
                   dtypes=_FLOATS, tolerance=tol16, description="layer norm composed in float32"),
        KernelSpec("torch_rope", "rope", "torch", torch_rope, priority=50, dtypes=_FLOATS,
                   supports_interleaved=False, tolerance=tol16, description="rotate-half RoPE (GPT-NeoX / Llama)"),
        KernelSpec("torch_rope_interleaved", "rope", "torch", torch_rope_interleaved, priority=50, dtypes=_FLOATS,
                   supports_interleaved=True, tolerance=tol16, description="interleaved-pair RoPE (GPT-J)"),
        KernelSpec("torch_swiglu", "swiglu", "torch", torch_swiglu, priority=50, dtypes=_FLOATS, tolerance=tol16,
                   description="F.silu(gate) * up"),
        KernelSpec("torch_gelu", "gelu", "torch", torch_gelu, priority=50, dtypes=_FLOATS,
                   approximations={"none", "tanh"}, tolerance=tol16, description="F.gelu"),
        KernelSpec("torch_silu", "silu", "torch", torch_silu, priority=50, dtypes=_FLOATS, tolerance=tol16,
                   description="F.silu"),
        KernelSpec("torch_sample_greedy", "sample.greedy", "torch", torch_sample_greedy, priority=60,
                   dtypes=_FLOATS, supports_autograd=False, description="argmax over the vocabulary"),
        KernelSpec("torch_sample", "sample", "torch", torch_sample, priority=50, dtypes=_FLOATS,
                   supports_autograd=False,
                   description="temperature, top-k and top-p filtering, then torch.multinomial"),
        KernelSpec("torch_sample_gumbel", "sample.temperature", "torch", torch_sample_gumbel, priority=40,
                   dtypes=_FLOATS, supports_autograd=False,
                   description="Gumbel-max sampling (temperature only): one pass, no sort"),
    ]
    return specs


TORCH_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the torch backend and its kernels (idempotent)."""
    backends.register("torch", module="torch", pip="pip install torch")
    out = []
    for spec in _specs():
        if spec.kernel_id not in kernels:
            out.append(kernels.register(spec))
    if _rms is None:  # torch < 2.4 has no fused rms_norm: keep the composed kernel only
        kernels.unregister("torch_rms_norm")
    return out

