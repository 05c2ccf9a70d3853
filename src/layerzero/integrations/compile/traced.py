"""What Dynamo traces in place of ``lz.attention`` & co. (same signatures as the public functions).

Each stand-in validates the call (so a bad call fails when traced, with layerzero's message), asks
:mod:`.choose` for the kernel at trace time, and then:

* a ``compile_native`` kernel (PyTorch's own: the SDPA kernels, ``torch_rms_norm``, ``torch_layer_norm``,
  the activations, RoPE, cross-entropy): its plain PyTorch code is traced, so Inductor fuses and
  pattern-matches it exactly as it would the user's own PyTorch code;
* an attention kernel with a :class:`~layerzero.spec.ResidualPair`: one ``layerzero::kernel_attention``
  node whose backward reuses the saved output and log-sum-exp (:mod:`.residual`);
* anything else: the dispatched custom op (``layerzero::attention``, ``layerzero::rms_norm``, ...), which
  recomputes the forward in its backward (:mod:`.dispatched`). Attention's selects at run time; a
  row-wise op runs the opaque kernel selection chose at trace time (its ``pinned_kernel=`` argument), or
  selects at run time where none was chosen (a live policy scope).

Attention variants (softcap, sinks, ALiBi) are traced too when a native kernel serves them; the residual op
takes none, so an opaque choice for a variant call is the dispatched op.

Packed and paged attention and sampling are always dispatched ops (:mod:`.dispatched_serving`): their
kernels read the batch layout from tensor values or draw random numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from layerzero.integrations.compile.choose import (
    BUCKETS,
    LIVE,
    NATIVE_IMPLS,
    OPAQUE,
    PINNED,
    RESIDUAL,
    RUNTIME,
    bucket,
    choose_attention,
    choose_rows,
)
from layerzero.integrations.compile.dispatched import ATTENTION_MOD, attention_op
from layerzero.integrations.compile.dispatched_rows import (
    ELEMENTWISE_MOD,
    LINEAR_LOSSES_MOD,
    LOSSES_MOD,
    NORMS_MOD,
    cross_entropy_op,
    geglu_op,
    gelu_op,
    layer_norm_op,
    linear_cross_entropy_op,
    rms_norm_op,
    rope_op,
    silu_op,
    swiglu_op,
)
from layerzero.integrations.compile.dispatched_serving import (
    PAGED_MOD,
    SAMPLING_MOD,
    VARLEN_MOD,
    attention_paged_op,
    attention_varlen_op,
    sample_op,
)
from layerzero.integrations.compile.residual import residual_attention

__all__ = ["traced_attention", "traced_rms_norm", "traced_layer_norm", "traced_rope", "traced_swiglu",
           "traced_geglu", "traced_gelu", "traced_silu", "traced_cross_entropy",
           "traced_linear_cross_entropy", "traced_attention_varlen", "traced_attention_paged", "traced_sample"]

Tensor = torch.Tensor


def _grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch._dynamo.assume_constant_result
def operation_name_problem(operation: str) -> str | None:
    """``layerzero.ops.attention.operation_name_problem`` run at trace time (it reads the registry and difflib,
    which Dynamo does not trace); the operation name is a constant of the trace."""
    return ATTENTION_MOD.operation_name_problem(operation)


def _attention_kernel(operation: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                      dropout_p: float, scale: float | None, window: int | None,
                      variants: tuple[bool, bool, bool] = (False, False, False)) -> str:
    """The trace-time choice; reading ``RUNTIME.version`` and ``LIVE.any`` here makes Dynamo guard on them.
    ``variants``: whether the call has a softcap, sinks, ALiBi slopes."""
    mask_kind = "none" if attn_mask is None else "bool" if attn_mask.dtype == torch.bool else "additive"
    contiguous = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    head = (RUNTIME.version, LIVE.any, operation, q.dtype, q.device)
    # A float option that took a second value is a symbolic float (Dynamo's automatic dynamic), and the choice's
    # arguments must be constants: it gets what selection reads of them (scale: None or its sign; dropout: on or
    # off), each a guarded comparison.
    scale_sign = None if scale is None else 1.0 if scale > 0 else -1.0
    dropout = 0.5 if dropout_p > 0 else 0.0
    tail = (mask_kind, dropout, scale_sign, window, _grad(q, k, v), torch.are_deterministic_algorithms_enabled(),
            contiguous, *variants)
    hq, hkv, d, dv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    kid = choose_attention(*head, None, hq, hkv, None, None, d, dv, is_causal, *tail)
    if kid == BUCKETS:
        kid = choose_attention(*head, bucket(q.shape[0]), hq, hkv, bucket(q.shape[2]), bucket(k.shape[2]), d, dv,
                               is_causal, *tail)
    return kid


def traced_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                     dropout_p: float = 0.0, scale: float | None = None, layout: str = "BHSD",
                     window: int | None = None, softcap: float | None = None, sinks: Tensor | None = None,
                     alibi_slopes: Tensor | None = None, operation: str | None = None,
                     enable_gqa: bool | None = None) -> Tensor:
    if isinstance(is_causal, bool):  # a SymBool (``q_len > 1`` under dynamic shapes) reads as one when traced;
        is_causal = True if is_causal else False  # a branch on it makes it a constant, under a guard
    operation, is_causal = ATTENTION_MOD.names_and_layout(operation, is_causal, layout, q, k, v,
                                                          operation_name_problem)
    bshd = layout == "BSHD"
    if bshd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if enable_gqa is not None and enable_gqa is not True:
        ATTENTION_MOD.gqa_refused(operation, enable_gqa, q, k, v)
    args = (q, k, v, attn_mask, is_causal, dropout_p, scale, window)
    flags = (softcap is not None, sinks is not None, alibi_slopes is not None)
    variants = any(flags)
    ATTENTION_MOD.ATTENTION.validate(operation, (*args, softcap, sinks, alibi_slopes) if variants else args)
    # a variant (softcap, sinks, ALiBi) is traced when a native kernel serves it (PyTorch's SDPA with an
    # additive mask for sinks and ALiBi, attention in PyTorch ops for a softcap), else the dispatched op runs
    kid = _attention_kernel(operation, *args, flags)
    if kid == OPAQUE:
        seed = None
        if dropout_p > 0.0:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        out = attention_op(q, k, v, attn_mask, is_causal, float(dropout_p), scale, window, operation, seed, softcap,
                           sinks, alibi_slopes)
    elif kid.startswith(RESIDUAL):
        out = residual_attention(kid[len(RESIDUAL):], *args)
    elif variants:
        out = NATIVE_IMPLS[kid](*args, softcap, sinks, alibi_slopes)
    else:
        out = NATIVE_IMPLS[kid](*args)
    return out.transpose(1, 2) if bshd else out


def _rows_kernel(operation: str, x: Tensor, grad: bool, interleaved: bool = False, head_dim: int | None = None,
                 approximate: str = "none", width: int | None = None) -> str:
    """The trace-time choice for a row-wise op over ``x``'s last dimension, or over ``width`` columns when
    given (the linear cross-entropy's vocabulary); guards as for attention."""
    head = (RUNTIME.version, LIVE.any, operation, x.dtype, x.device, x.shape[-1] if width is None else width)
    tail = (grad, torch.are_deterministic_algorithms_enabled(), x.is_contiguous(), interleaved, head_dim, approximate)
    kid = choose_rows(*head, None, None, *tail)
    if kid == BUCKETS:
        rows = x.numel() // x.shape[-1]
        kid = choose_rows(*head, bucket(rows), bucket(x.shape[0]) if x.dim() > 1 else 1, *tail)
    return kid


def _route(kid: str) -> tuple[Any, str]:
    """``(the traced PyTorch function for kid, "")``, or ``(None, the pinned_kernel= of the dispatched op)``: the pinned
    kernel, or "" to select at run time (no row-wise residual op yet)."""
    if kid.startswith(PINNED):
        return None, kid[len(PINNED):]
    if kid == OPAQUE or kid.startswith(RESIDUAL):
        return None, ""
    return NATIVE_IMPLS[kid], ""


def traced_rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    NORMS_MOD.RMS_NORM.validate("rms_norm", (x, weight, eps))
    fn, pin = _route(_rows_kernel("rms_norm", x, _grad(x, weight)))
    return rms_norm_op(x, weight, float(eps), pin) if fn is None else fn(x, weight, eps)


def traced_layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                      eps: float = 1e-5) -> Tensor:
    NORMS_MOD.LAYER_NORM.validate("layer_norm", (x, weight, bias, eps))
    fn, pin = _route(_rows_kernel("layer_norm", x, _grad(x, weight, bias)))
    return layer_norm_op(x, weight, bias, float(eps), pin) if fn is None else fn(x, weight, bias, eps)


def traced_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    ELEMENTWISE_MOD.ROPE.validate("rope", (x, cos, sin, interleaved))
    fn, pin = _route(_rows_kernel("rope", x, _grad(x, cos, sin), bool(interleaved), x.shape[-1]))
    return rope_op(x, cos, sin, interleaved, pin) if fn is None else fn(x, cos, sin, interleaved)


def traced_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    ELEMENTWISE_MOD.SWIGLU.validate("swiglu", (gate, up))
    fn, pin = _route(_rows_kernel("swiglu", gate, _grad(gate, up)))
    return swiglu_op(gate, up, pin) if fn is None else fn(gate, up)


def traced_geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    ELEMENTWISE_MOD.GEGLU.validate("geglu", (gate, up, approximate))
    fn, pin = _route(_rows_kernel("geglu", gate, _grad(gate, up), approximate=approximate))
    return geglu_op(gate, up, approximate, pin) if fn is None else fn(gate, up, approximate)


def traced_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    ELEMENTWISE_MOD.GELU.validate("gelu", (x, approximate))
    fn, pin = _route(_rows_kernel("gelu", x, _grad(x), approximate=approximate))
    return gelu_op(x, approximate, pin) if fn is None else fn(x, approximate)


def traced_silu(x: Tensor) -> Tensor:
    ELEMENTWISE_MOD.SILU.validate("silu", (x,))
    fn, pin = _route(_rows_kernel("silu", x, _grad(x)))
    return silu_op(x, pin) if fn is None else fn(x)


def traced_cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean") -> Tensor:
    args = (logits, target, ignore_index, label_smoothing, reduction)
    LOSSES_MOD.CROSS_ENTROPY.validate("cross_entropy", args)
    fn, pin = _route(_rows_kernel("cross_entropy", logits, _grad(logits)))
    if fn is None:
        return cross_entropy_op(logits, target, int(ignore_index), float(label_smoothing), reduction, pin)
    return fn(*args)


def traced_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                                ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                                softcap: float | None = None) -> Tensor:
    args = (hidden, weight, target, bias, ignore_index, label_smoothing, reduction, softcap)
    LINEAR_LOSSES_MOD.LINEAR_CROSS_ENTROPY.validate("linear_cross_entropy", args)
    # as the op's context: hidden_size is the vocabulary, head_dim the model's width, rows the tokens
    fn, pin = _route(_rows_kernel("linear_cross_entropy", hidden, _grad(hidden, weight, bias), head_dim=hidden.shape[1],
                              width=weight.shape[0]))
    if fn is None:
        return linear_cross_entropy_op(hidden, weight, target, bias, int(ignore_index), float(label_smoothing),
                                       reduction, None if softcap is None else float(softcap), pin)
    return fn(*args)


def traced_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, is_causal: bool = False,
                            scale: float | None = None, window: int | None = None,
                            softcap: float | None = None) -> Tensor:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window, softcap)
    VARLEN_MOD.ATTENTION_VARLEN.validate("attention_varlen", args)
    return attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(is_causal),
                               None if scale is None else float(scale), window,
                               None if softcap is None else float(softcap))


def traced_attention_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, *,
                           is_causal: bool = True, scale: float | None = None, window: int | None = None,
                           softcap: float | None = None) -> Tensor:
    args = (q, k_cache, v_cache, block_table, seq_lens, is_causal, scale, window, softcap)
    PAGED_MOD.ATTENTION_PAGED.validate("attention_paged", args)
    return attention_paged_op(q, k_cache, v_cache, block_table, seq_lens, bool(is_causal),
                              None if scale is None else float(scale), window,
                              None if softcap is None else float(softcap))


def traced_sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    SAMPLING_MOD.SAMPLE.validate("sample", (logits, temperature, top_k, top_p, generator))
    seed = None
    if generator is not None:  # a custom op takes no Generator: a seed drawn from it seeds one in the op
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return sample_op(logits, float(temperature), top_k, None if top_p is None else float(top_p), seed)
