"""The torch attention specs: what each SDPA kernel accepts, as PyTorch's own dispatcher checks it.

Each spec declares the checks PyTorch's dispatcher runs before it would pick
that kernel (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` for CUDA,
``sdp_utils_cpp.cpp`` for the CPU flash kernel), written for torch 2.4 .. 2.13.
Calling an aten op directly skips those checks *and* the fix-ups
``F.scaled_dot_product_attention`` does around them (head-dim padding, bool ->
additive masks, ``enable_gqa``), so where the aten op is stricter than the
public function the spec says so (or the adapter in :mod:`.attention` does the
fix-up) and selection picks another kernel. Constraints that the spec's fields
cannot express (dtype or alignment that depends on the GPU generation, training
limits on sm86/89) live in small ``extra_check`` functions next to the specs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layerzero.backends.torch.attention import (
    torch_sdpa,
    torch_sdpa_cudnn,
    torch_sdpa_efficient,
    torch_sdpa_flash,
    torch_sdpa_flash_cpu,
    torch_sdpa_gqa,
    torch_sdpa_math,
)
from layerzero.backends.torch.attention_variants import torch_attention_eager
from layerzero.backends.torch.attention import flash_cpu_backward, flash_cpu_fake, flash_cpu_forward
from layerzero.backends.torch.capabilities import CUDNN_OP, FLOATS, GQA_NATIVE, HALF, MAX_SM
from layerzero.backends.torch.fast import sdpa_gqa_specialize, sdpa_specialize
from layerzero.context import SelectionContext
from layerzero.spec import KernelSpec, Reason, ReasonCode, ResidualPair

__all__ = ["attention_specs", "FLASH_CPU_PAIR"]

Tolerance = dict[str, tuple[float, float]]

_CUDA = frozenset({"cuda"})
_CPU = frozenset({"cpu"})
_ANY_MASK = frozenset({"none", "bool", "additive"})


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
    half = ctx.dtype in HALF
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
    if not CUDNN_OP:
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


#: The CPU flash kernel's forward-with-log-sum-exp and backward, for a graph that runs it opaquely.
FLASH_CPU_PAIR = ResidualPair(flash_cpu_forward, flash_cpu_backward, flash_cpu_fake)


# -- the specs, in registration order ------------------------------------------------------------------

def attention_specs(tol: Tolerance) -> list[KernelSpec]:
    """Every torch attention spec, with tolerances ``tol``: SDPA itself, the CUDA aten kernels, CPU and math."""
    return _sdpa_specs(tol) + _cuda_specs(tol) + _cpu_and_math_specs(tol)


def _factory(tol: Tolerance) -> Callable[..., KernelSpec]:
    def spec(kid: str, impl: Callable[..., object], priority: int, **kw: object) -> KernelSpec:
        return KernelSpec(kid, "attention", "torch", impl, priority=priority, tolerance=tol, compile_native=True,
                          **kw)  # type: ignore[arg-type]

    return spec


def _sdpa_specs(tol: Tolerance) -> list[KernelSpec]:
    """``F.scaled_dot_product_attention`` as is, and with native GQA and sliding windows."""
    spec = _factory(tol)
    return [
        # F.scaled_dot_product_attention: runs its own checks and falls back to math, so it takes any
        # float dtype, mask, dropout and both causal shapes; only the window (no argument for it) and
        # GQA (this adapter does not pass enable_gqa; torch_sdpa_gqa does) are out.
        # shape_free: F.scaled_dot_product_attention checks every input itself, and raises for the one shape
        # constraint here (GQA heads without enable_gqa), so one plan may serve every shape of a call family.
        spec("torch_sdpa", torch_sdpa, 70, dtypes=FLOATS, mask_kinds=_ANY_MASK, supports_gqa=False,
             supports_mqa=False, shape_free=True, specialize=sdpa_specialize,
             description="F.scaled_dot_product_attention: PyTorch's own kernel choice"),
        # Ranked just below torch_sdpa, above the direct aten kernels: it is SDPA's own choice for GQA/MQA
        # (measured on H100 and H200 with torch 2.11, SDPA's pick for GQA ran 1.1-2x faster than the direct
        # flash kernel); tuning promotes a direct kernel where it measures faster. It covers torch_sdpa
        # (enable_gqa=True with equal head counts is plain SDPA, see fast.py), so a family whose first
        # call is GQA gets one shape-free plan for its GQA and MHA shapes.
        # sinks and ALiBi as an additive mask plus one zero key (attention_variants.variant_inputs); SDPA has no
        # form of a softcap.
        spec("torch_sdpa_gqa", torch_sdpa_gqa, 68, dtypes=FLOATS, mask_kinds=_ANY_MASK, supports_window=True,
             supports_sinks=True, supports_alibi=True, specialize=sdpa_gqa_specialize, shape_free=True, covers=frozenset({"torch_sdpa"}),
             description="F.scaled_dot_product_attention with native GQA (enable_gqa) and sliding windows"),
    ]


def _cuda_specs(tol: Tolerance) -> list[KernelSpec]:
    """The CUDA aten kernels: FlashAttention-2, memory-efficient (CUTLASS) and cuDNN."""
    spec = _factory(tol)
    return [
        # can_use_flash_attention (cuda/sdp_utils.cpp) + mha_fwd (flash_attn/flash_api.cpp):
        # - check_flash_attention_hardware_support: sm80 .. MAX_SM;
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
        spec("torch_sdpa_flash", torch_sdpa_flash, 65, platforms=_CUDA, min_compute_capability=(8, 0),
             max_compute_capability=MAX_SM, dtypes=HALF, head_dim_max=256, head_dim_multiple=8,
             head_dim_v_equal=True, mask_kinds={"none"}, causal_alignment="lower_right",
             supports_gqa=GQA_NATIVE, supports_mqa=GQA_NATIVE, requires_contiguous=True,
             extra_check=_flash_cuda_check,
             description="aten::_scaled_dot_product_flash_attention (FlashAttention-2 in PyTorch)"),
        # can_use_mem_efficient_attention:
        # - check_mem_efficient_hardware_support: sm50 .. MAX_SM;
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
        spec("torch_sdpa_efficient", torch_sdpa_efficient, 60, platforms=_CUDA, min_compute_capability=(5, 0),
             max_compute_capability=MAX_SM, dtypes=HALF | {torch.float32}, mask_kinds={"none"},
             supports_gqa=False, supports_mqa=False, requires_contiguous=True, extra_check=_efficient_check,
             description="aten::_scaled_dot_product_efficient_attention (xFormers/CUTLASS kernel in PyTorch)"),
        # can_use_cudnn_attention:
        # - check_cudnn_hardware_support: sm80 .. MAX_SM; check_dtypes_low_precision: float16, bfloat16;
        # - check_cudnn_tensor_shapes: head dims <= 128 (256 only on sm90/sm100 with cuDNN > 9.2.2 and a
        #   new enough cudnn-frontend at build time, which cannot be seen from Python) and multiples of 8,
        #   seq_len_k != 1, batch/heads <= 65535 (_cudnn_check);
        # - check_cudnn_dropout / cuDNN 9.11-9.13: dropout only in 1/16 steps or not at all: declared none;
        # - check_cudnn_deterministic: rejected under torch.use_deterministic_algorithms(True);
        # - causal: MHA.cpp sets cudnn-frontend set_causal_mask (top-left), SDPA's upper-left alignment;
        # - GQA: not declared, for the same reason as the memory-efficient kernel.
        spec("torch_sdpa_cudnn", torch_sdpa_cudnn, 58, platforms=_CUDA, min_compute_capability=(8, 0),
             max_compute_capability=MAX_SM, dtypes=HALF, head_dim_max=128, head_dim_multiple=8,
             mask_kinds={"none"}, supports_gqa=False, supports_mqa=False, supports_dropout=False,
             requires_contiguous=True, deterministic=False, extra_check=_cudnn_check,
             description="aten::_scaled_dot_product_cudnn_attention (cuDNN fused attention)"),
    ]


def _cpu_and_math_specs(tol: Tolerance) -> list[KernelSpec]:
    """The fused CPU flash kernel, and the math composite that runs anywhere."""
    spec = _factory(tol)
    return [
        # use_flash_attention_cpp (sdp_utils_cpp.cpp):
        # - cpp_supported_flash_dtypes: float32, float64, bfloat16, float16;
        # - check_for_dropout: no dropout;
        # - check_head_dim_size_cpp: q, k and v share one head_dim (any size);
        # - check_attn_mask_shape: a float mask of q's dtype with 2 or 4 dims; the adapter converts bool
        #   masks and adds leading dims, as SDPA does before calling it;
        # - check_batch_size_and_num_heads_dense<supports_gqa=true>: GQA/MQA from torch 2.5;
        # - check_last_dim_stride_equals_1_dense: the op reads garbage otherwise (it does not check);
        # - causal is upper-left like SDPA.
        spec("torch_sdpa_flash_cpu", torch_sdpa_flash_cpu, 60, platforms=_CPU, dtypes=FLOATS,
             head_dim_v_equal=True, mask_kinds=_ANY_MASK, supports_gqa=GQA_NATIVE, supports_mqa=GQA_NATIVE,
             supports_dropout=False, requires_contiguous=True, residual_pair=FLASH_CPU_PAIR,
             description="aten::_scaled_dot_product_flash_attention_for_cpu (fused CPU kernel)"),
        # The math composite runs anywhere; the adapter repeats K/V heads for GQA and turns bool masks
        # (and the sliding window) into additive ones.
        spec("torch_sdpa_math", torch_sdpa_math, 10, dtypes=FLOATS, mask_kinds=_ANY_MASK, supports_window=True,
             supports_sinks=True, supports_alibi=True,
             description="aten::_scaled_dot_product_attention_math (reference composite, any device)"),
        # Attention in PyTorch ops (scores and softmax in float32 for half inputs): every variant, softcap
        # included, on any device; ranked last, so it runs what no fused kernel here can.
        spec("torch_attention_eager", torch_attention_eager, 5, dtypes=FLOATS, mask_kinds=_ANY_MASK,
             supports_window=True, supports_softcap=True, supports_sinks=True, supports_alibi=True,
             description="attention in PyTorch ops with softcap, sinks and ALiBi (q k^T, softmax, p v)"),
    ]
