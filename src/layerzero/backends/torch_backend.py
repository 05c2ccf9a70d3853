"""The torch backend: PyTorch's own kernels, registered whenever torch imports.

Attention goes to each SDPA kernel directly through its aten op (flash,
memory-efficient, cuDNN, math, CPU flash) rather than through the
``sdpa_kernel`` context manager, which costs tens of microseconds per call on a
GPU host. ``torch_sdpa`` is ``F.scaled_dot_product_attention`` itself:
PyTorch's own choice, kept as a candidate so layerzero is never worse than it.

Each attention spec declares the checks PyTorch's dispatcher runs before it
would pick that kernel (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``
for CUDA, ``sdp_utils_cpp.cpp`` for the CPU flash kernel), written for torch
2.4 .. 2.13. Calling an aten op directly skips those checks *and* the fix-ups
``F.scaled_dot_product_attention`` does around them (head-dim padding, bool ->
additive masks, ``enable_gqa``), so where the aten op is stricter than the
public function the spec says so (or the adapter below does the fix-up) and
selection picks another kernel. Constraints that the spec's fields cannot
express (dtype or alignment that depends on the GPU generation, training limits
on sm86/89) live in small ``extra_check`` functions next to the spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from layerzero.context import SelectionContext
from layerzero.ops._shared import half_cos_sin, window_mask
from layerzero.backends.torch_fast import (
    layer_norm_specialize,
    rms_norm_specialize,
    sdpa_gqa_specialize,
    sdpa_specialize,
)
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "TORCH_KERNEL_IDS", "TORCH_VERSION"]

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # an odd local build string: assume a recent torch
        return (99, 0)


TORCH_VERSION: tuple[int, int] = _version(torch.__version__)

# torch 2.5 added ``enable_gqa`` to SDPA and grouped-query support to the flash kernels
# (``check_batch_size_and_num_heads_dense<supports_gqa>``); 2.4's kernels index K/V with the
# query's head count, so GQA must not reach them there.
_GQA_NATIVE = TORCH_VERSION >= (2, 5)
# ``check_flash_attention_hardware_support`` / ``check_cudnn_hardware_support`` accept
# [sm80, sm90] up to torch 2.6 and [sm80, sm121] once Blackwell builds shipped (2.7);
# ``check_mem_efficient_hardware_support`` likewise [sm50, sm90] -> [sm50, sm121].
_MAX_SM: tuple[int, int] = (12, 1) if TORCH_VERSION >= (2, 7) else (9, 0)

_sdpa = F.scaled_dot_product_attention
_aten = torch.ops.aten


def _cudnn_signature_ok() -> bool:
    """True when the aten cuDNN op takes ``attn_bias, compute_log_sumexp`` (torch >= 2.5).

    torch 2.4's op had another signature and no backward, so the adapter below does not apply there.
    """
    try:
        schema = _aten._scaled_dot_product_cudnn_attention.default._schema
    except (AttributeError, RuntimeError):
        return False
    return [a.name for a in schema.arguments][3:5] == ["attn_bias", "compute_log_sumexp"]


_CUDNN_OP = _cudnn_signature_ok()


# -- attention adapters: (q, k, v, attn_mask, is_causal, dropout_p, scale, window), BHSD --------------

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


def torch_sdpa_gqa(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    mask, is_causal = _windowed(q, k, mask, is_causal, window)
    if q.shape[1] != k.shape[1]:
        if _GQA_NATIVE:
            return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
        k, v = _expand_kv(q, k, v)
    return _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale)


def torch_sdpa_math(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
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


# -- constraints the KernelSpec fields cannot express -------------------------------------------------

def _flash_cuda_check(ctx: SelectionContext) -> list[Reason]:
    """``check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120``: FlashAttention-2's
    backward has no kernel for head_dim in (192, 224], nor (224, 256] with dropout, on sm86-89 / sm120-121."""
    cc, d = ctx.compute_capability, ctx.head_dim
    if not ctx.requires_grad or cc is None or d is None:
        return []
    if not ((8, 6) <= cc <= (8, 9) or (12, 0) <= cc <= (12, 1)):
        return []
    if d <= 192 or (d > 224 and ctx.dropout_p == 0.0):
        return []
    return [Reason(ReasonCode.HEAD_DIM_TOO_LARGE,
                   f"training with head_dim={d}{' and dropout' if ctx.dropout_p else ''} on compute capability "
                   f"{cc[0]}.{cc[1]}: the flash backward supports head_dim <= 192 there "
                   "(or > 224 without dropout)")]


def _efficient_check(ctx: SelectionContext) -> list[Reason]:
    """``can_use_mem_efficient_attention``: bfloat16 only from sm80; q and v head dims must be multiples of
    ``minimum_gemm_alignment`` (8 for half types with tensor cores, 4 for float32 on sm80+, else 1)."""
    out: list[Reason] = []
    cc = ctx.compute_capability
    if cc is None or ctx.dtype is None:
        return out
    if ctx.dtype == torch.bfloat16 and cc < (8, 0):
        out.append(Reason(ReasonCode.DTYPE_UNSUPPORTED,
                          f"dtype=bfloat16 needs compute capability >= 8.0 for memory-efficient attention, "
                          f"this GPU has {cc[0]}.{cc[1]} (supported: float16, float32)"))
    half = ctx.dtype in _HALF
    if cc >= (8, 0):
        align = 8 if half else 4
    elif cc >= (7, 0):
        align = 8 if half else 1
    else:
        align = 1
    for name, d in (("head_dim", ctx.head_dim), ("value head_dim", ctx.head_dim_v)):
        if d is not None and d % align:
            out.append(Reason(ReasonCode.HEAD_DIM_ALIGNMENT,
                              f"{name}={d} is not a multiple of {align} for {ctx.dtype_name} on compute "
                              f"capability {cc[0]}.{cc[1]} (pad the head dimension)"))
    return out


_CUDNN_MAX_DIM = 65535  # check_cudnn_tensor_shapes: batch and heads each at most 65535


def _cudnn_check(ctx: SelectionContext) -> list[Reason]:
    """``check_cudnn_tensor_shapes``: value head_dim <= 128 and a multiple of 8, key/value length != 1,
    batch and heads <= 65535; and the aten op's torch >= 2.5 signature."""
    out: list[Reason] = []
    if not _CUDNN_OP:
        out.append(Reason(ReasonCode.BACKEND_UNAVAILABLE,
                          f"torch {torch.__version__} has no aten cuDNN attention op with the torch >= 2.5 "
                          "signature (attn_bias, compute_log_sumexp) and backward"))
    dv = ctx.head_dim_v
    if dv is not None and dv != ctx.head_dim:  # head_dim itself is covered by the spec's fields
        if dv > 128:
            out.append(Reason(ReasonCode.HEAD_DIM_TOO_LARGE, f"value head_dim={dv} > 128 supported"))
        if dv % 8:
            out.append(Reason(ReasonCode.HEAD_DIM_ALIGNMENT,
                              f"value head_dim={dv} is not a multiple of 8 (pad the head dimension)"))
    if ctx.seq_len_k == 1:
        out.append(Reason(ReasonCode.SEQ_LEN_UNSUPPORTED, "seq_len_k=1 (cuDNN attention needs 2 or more keys)"))
    for name, n in (("batch_size", ctx.batch_size), ("num_heads", ctx.num_heads)):
        if n is not None and n > _CUDNN_MAX_DIM:
            out.append(Reason(ReasonCode.BATCH_TOO_LARGE, f"{name}={n} > {_CUDNN_MAX_DIM} supported"))
    return out


# -- norms -----------------------------------------------------------------------------------------

_rms = torch.rms_norm if hasattr(torch, "rms_norm") else None


def torch_rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return _rms(x, x.shape[-1:], weight, eps)  # type: ignore[misc]


def _wide(x: torch.Tensor) -> torch.dtype:
    # Half types are computed in float32 (as HF's LlamaRMSNorm does); float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def torch_rms_norm_composed(x, weight, eps):  # type: ignore[no-untyped-def]
    xf = x.to(_wide(x))
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if weight is not None:
        out = out * weight.to(xf.dtype)
    return out.to(x.dtype)


def torch_layer_norm(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    return torch.layer_norm(x, x.shape[-1:], weight, bias, eps)


def torch_layer_norm_composed(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    xf = x.to(_wide(x))
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(xf.dtype)
    if bias is not None:
        out = out + bias.to(xf.dtype)
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


def torch_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):  # type: ignore[no-untyped-def]
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def torch_geglu(gate, up, approximate):  # type: ignore[no-untyped-def]
    return F.gelu(gate, approximate=approximate) * up


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

def _attention_specs(tol: dict[str, tuple[float, float]]) -> list[KernelSpec]:
    cuda = frozenset({"cuda"})
    cpu = frozenset({"cpu"})
    any_mask = frozenset({"none", "bool", "additive"})

    def spec(kid: str, impl: Callable[..., object], priority: int, **kw: object) -> KernelSpec:
        return KernelSpec(kid, "attention", "torch", impl, priority=priority, tolerance=tol,
                          **kw)  # type: ignore[arg-type]

    return [
        # F.scaled_dot_product_attention: runs its own checks and falls back to math, so it takes any
        # float dtype, mask, dropout and both causal shapes; only the window (no argument for it) and
        # GQA (this adapter does not pass enable_gqa; torch_sdpa_gqa does) are out.
        # shape_free: F.scaled_dot_product_attention checks every input itself, and raises for the one shape
        # constraint here (GQA heads without enable_gqa), so one plan may serve every shape of a call family.
        spec("torch_sdpa", torch_sdpa, 70, dtypes=_FLOATS, mask_kinds=any_mask, supports_gqa=False,
             supports_mqa=False, shape_free=True, specialize=sdpa_specialize,
             description="F.scaled_dot_product_attention: PyTorch's own kernel choice"),
        # Ranked just below torch_sdpa, above the direct aten kernels: it is SDPA's own choice for GQA/MQA
        # (measured on H100 and H200 with torch 2.11, SDPA's pick for GQA ran 1.1-2x faster than the direct
        # flash kernel); tuning promotes a direct kernel where it measures faster. It covers torch_sdpa
        # (enable_gqa=True with equal head counts is plain SDPA, see torch_fast), so a family whose first
        # call is GQA gets one shape-free plan for its GQA and MHA shapes.
        spec("torch_sdpa_gqa", torch_sdpa_gqa, 68, dtypes=_FLOATS, mask_kinds=any_mask, supports_window=True,
             specialize=sdpa_gqa_specialize, shape_free=True, covers=frozenset({"torch_sdpa"}),
             description="F.scaled_dot_product_attention with native GQA (enable_gqa) and sliding windows"),
        # can_use_flash_attention (cuda/sdp_utils.cpp) + mha_fwd (flash_attn/flash_api.cpp):
        # - check_flash_attention_hardware_support: sm80 .. _MAX_SM;
        # - check_dtypes_flash_attention / check_dtypes_low_precision: float16, bfloat16 on sm80+;
        # - check_head_dim_size_flash: q, k, v share one head_dim <= 256; mha_fwd: "head_size must be a
        #   multiple of 8, this is ensured by padding!" (SDPA pads; the direct op does not);
        # - check_for_attn_mask: no mask at all;
        # - check_flash_causal_non_square_seqlens: FA2 aligns causal lower-right, SDPA upper-left;
        # - check_batch_size_and_num_heads_dense<supports_gqa=true> + mha_fwd "num_heads % num_heads_k":
        #   GQA/MQA natively from torch 2.5;
        # - check_last_dim_stride_equals_1_dense; dropout is supported;
        # - backward: deterministic when torch.use_deterministic_algorithms(True) (mha_bwd deterministic=True);
        # - check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: _flash_cuda_check.
        spec("torch_sdpa_flash", torch_sdpa_flash, 65, platforms=cuda, min_compute_capability=(8, 0),
             max_compute_capability=_MAX_SM, dtypes=_HALF, head_dim_max=256, head_dim_multiple=8,
             head_dim_v_equal=True, mask_kinds={"none"}, causal_alignment="lower_right",
             supports_gqa=_GQA_NATIVE, supports_mqa=_GQA_NATIVE, requires_contiguous=True,
             extra_check=_flash_cuda_check,
             description="aten::_scaled_dot_product_flash_attention (FlashAttention-2 in PyTorch)"),
        # can_use_mem_efficient_attention:
        # - check_mem_efficient_hardware_support: sm50 .. _MAX_SM;
        # - dtypes: float16, float32, bfloat16 on sm80+, float16, float32 below (_efficient_check);
        # - check_head_dim_size_mem_efficient: q/k and v head dims multiples of minimum_gemm_alignment
        #   (_efficient_check); the value head_dim may differ from the query's;
        # - causal is CustomMaskType::CausalFromTopLeft: the same upper-left alignment as SDPA;
        # - masks: SDPA pads and aligns the bias (preprocess_mask) before this op; the adapter passes none;
        # - GQA: not declared: we could not confirm that the direct op accepts fewer K/V heads across
        #   torch 2.4 .. 2.13 (torch_sdpa_gqa and the math kernel serve GQA);
        # - check_last_dim_stride_equals_1_dense<ignore_singleton_dim=false>;
        # - backward: num_splits_key = 1 under torch.use_deterministic_algorithms(True), so deterministic.
        # Not expressible here: check_data_ptr_alignment_mem_efficient (storage offsets of sliced views).
        spec("torch_sdpa_efficient", torch_sdpa_efficient, 60, platforms=cuda, min_compute_capability=(5, 0),
             max_compute_capability=_MAX_SM, dtypes=_HALF | {torch.float32}, mask_kinds={"none"},
             supports_gqa=False, supports_mqa=False, requires_contiguous=True, extra_check=_efficient_check,
             description="aten::_scaled_dot_product_efficient_attention (xFormers/CUTLASS kernel in PyTorch)"),
        # can_use_cudnn_attention:
        # - check_cudnn_hardware_support: sm80 .. _MAX_SM; check_dtypes_low_precision: float16, bfloat16;
        # - check_cudnn_tensor_shapes: head dims <= 128 (256 only on sm90/sm100 with cuDNN > 9.2.2 and a
        #   new enough cudnn-frontend at build time, which cannot be seen from Python) and multiples of 8,
        #   seq_len_k != 1, batch/heads <= 65535 (_cudnn_check);
        # - check_cudnn_dropout / cuDNN 9.11-9.13: dropout only in 1/16 steps or not at all: declared none;
        # - check_cudnn_deterministic: rejected under torch.use_deterministic_algorithms(True);
        # - causal: MHA.cpp sets cudnn-frontend set_causal_mask (top-left), SDPA's upper-left alignment;
        # - GQA: not declared, for the same reason as the memory-efficient kernel.
        spec("torch_sdpa_cudnn", torch_sdpa_cudnn, 58, platforms=cuda, min_compute_capability=(8, 0),
             max_compute_capability=_MAX_SM, dtypes=_HALF, head_dim_max=128, head_dim_multiple=8,
             mask_kinds={"none"}, supports_gqa=False, supports_mqa=False, supports_dropout=False,
             requires_contiguous=True, deterministic=False, extra_check=_cudnn_check,
             description="aten::_scaled_dot_product_cudnn_attention (cuDNN fused attention)"),
        # use_flash_attention_cpp (sdp_utils_cpp.cpp):
        # - cpp_supported_flash_dtypes: float32, float64, bfloat16, float16;
        # - check_for_dropout: no dropout;
        # - check_head_dim_size_cpp: q, k and v share one head_dim (any size);
        # - check_attn_mask_shape: a float mask of q's dtype with 2 or 4 dims; the adapter converts bool
        #   masks and adds leading dims, as SDPA does before calling it;
        # - check_batch_size_and_num_heads_dense<supports_gqa=true>: GQA/MQA from torch 2.5;
        # - check_last_dim_stride_equals_1_dense: the op reads garbage otherwise (it does not check);
        # - causal is upper-left like SDPA.
        spec("torch_sdpa_flash_cpu", torch_sdpa_flash_cpu, 60, platforms=cpu, dtypes=_FLOATS,
             head_dim_v_equal=True, mask_kinds=any_mask, supports_gqa=_GQA_NATIVE, supports_mqa=_GQA_NATIVE,
             supports_dropout=False, requires_contiguous=True,
             description="aten::_scaled_dot_product_flash_attention_for_cpu (fused CPU kernel)"),
        # The math composite runs anywhere; the adapter repeats K/V heads for GQA and turns bool masks
        # (and the sliding window) into additive ones.
        spec("torch_sdpa_math", torch_sdpa_math, 10, dtypes=_FLOATS, mask_kinds=any_mask, supports_window=True,
             description="aten::_scaled_dot_product_attention_math (reference composite, any device)"),
    ]


def _specs() -> list[KernelSpec]:
    tol16 = {"float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2), "float32": (2e-5, 2e-5), "float64": (1e-9, 1e-9)}
    # On CUDA, float32 SDPA kernels may use TF32-free paths but different summation orders.
    tol_attn = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (1e-4, 1e-4),
                "float64": (1e-9, 1e-9)}
    specs = _attention_specs(tol_attn)
    specs += [
        KernelSpec("torch_rms_norm", "rms_norm", "torch", torch_rms_norm, priority=60, dtypes=_FLOATS,
                   tolerance=tol16, specialize=rms_norm_specialize, shape_free=True,
                   description="torch.rms_norm (fused on CPU and CUDA)"),
        KernelSpec("torch_rms_norm_composed", "rms_norm", "torch", torch_rms_norm_composed, priority=20,
                   dtypes=_FLOATS, tolerance=tol16,
                   description="x * rsqrt(mean(x^2) + eps) * weight in float32 (HF LlamaRMSNorm arithmetic)"),
        KernelSpec("torch_layer_norm", "layer_norm", "torch", torch_layer_norm, priority=60, dtypes=_FLOATS,
                   tolerance=tol16, specialize=layer_norm_specialize, shape_free=True,
                   description="torch.layer_norm"),
        KernelSpec("torch_layer_norm_composed", "layer_norm", "torch", torch_layer_norm_composed, priority=20,
                   dtypes=_FLOATS, tolerance=tol16,
                   description="layer norm composed in float32 (float64 for float64 inputs)"),
        KernelSpec("torch_rope", "rope", "torch", torch_rope, priority=50, dtypes=_FLOATS,
                   supports_interleaved=False, tolerance=tol16, description="rotate-half RoPE (GPT-NeoX / Llama)"),
        KernelSpec("torch_rope_interleaved", "rope", "torch", torch_rope_interleaved, priority=50, dtypes=_FLOATS,
                   supports_interleaved=True, tolerance=tol16, description="interleaved-pair RoPE (GPT-J)"),
        KernelSpec("torch_swiglu", "swiglu", "torch", torch_swiglu, priority=50, dtypes=_FLOATS, tolerance=tol16,
                   description="F.silu(gate) * up"),
        KernelSpec("torch_cross_entropy", "cross_entropy", "torch", torch_cross_entropy, priority=50,
                   dtypes=_FLOATS, tolerance=tol16,
                   description="F.cross_entropy (in half precision a large sum overflows as it does in PyTorch: "
                               "upcast the logits)"),
        KernelSpec("torch_geglu", "geglu", "torch", torch_geglu, priority=50, dtypes=_FLOATS,
                   approximations={"none", "tanh"}, tolerance=tol16, description="F.gelu(gate) * up"),
        KernelSpec("torch_gelu", "gelu", "torch", torch_gelu, priority=50, dtypes=_FLOATS,
                   approximations={"none", "tanh"}, tolerance=tol16, shape_free=True, description="F.gelu"),
        KernelSpec("torch_silu", "silu", "torch", torch_silu, priority=50, dtypes=_FLOATS, tolerance=tol16,
                   shape_free=True, description="F.silu"),
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
    if _rms is None and "torch_rms_norm" in kernels:  # torch < 2.4 has no fused rms_norm: keep the composed one
        kernels.unregister("torch_rms_norm")
    return out
