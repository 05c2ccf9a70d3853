"""``lz.attention_varlen``: attention over a packed batch of sequences of different lengths.

The layout is FlashAttention's and ``torch.nn.attention.varlen.varlen_attn``'s: ``q`` ``(total_q, heads,
head_dim)``, ``k``/``v`` ``(total_k, kv_heads, head_dim)``, sequence ``b`` owning rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k``/``v``.
Kernels get the canonical arguments ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
is_causal, scale, window, softcap)``.

Semantics (see :mod:`layerzero.ragged`): the causal mask and the window are aligned bottom-right per
sequence, as FlashAttention aligns them (``lz.attention``'s ``is_causal`` is SDPA's upper-left); a
0-length sequence owns no rows; a query row that sees no key is zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.ops.attention_ragged import float_problem, heads_problem, index_problem, option_problem
from layerzero.ops.base import FLOAT_MAX, OpDef, option_flag, pick
from layerzero.ops.contract import CallContract
from layerzero.ragged import attend_math, lengths, varlen_problem
from layerzero.runtime import get_runtime

__all__ = ["attention_varlen", "ATTENTION_VARLEN", "VarlenAttentionOp", "varlen_reference", "cu_seqlens"]

_SHAPES = {"q": "(total_q, heads, head_dim)", "k": "(total_k, kv_heads, head_dim)",
           "v": "(total_k, kv_heads, head_dim)"}


def cu_seqlens(lens: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Cumulative offsets ``[0, l0, l0 + l1, ...]`` as the int32 tensor the op takes."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, is_causal: bool = False, scale: float | None = None,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Float64 reference: each sequence on its own, bottom-right masks, softcap before masking."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64, device=q.device)
    oq, ok = cu_q.tolist(), cu_k.tolist()
    for b in range(len(oq) - 1):
        qs, ks = slice(oq[b], oq[b + 1]), slice(ok[b], ok[b + 1])
        out[qs] = attend_math(q[qs], k[ks], v[ks], is_causal, scale, window, softcap, torch.float64)
    return out


class VarlenAttentionOp(OpDef):
    family = "attention_varlen"
    arg_names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "is_causal",
                 "scale", "window", "softcap")
    input_aliases = ("query", "key", "value", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap = args
        problem = float_problem({"q": q, "k": k, "v": v}, {"q": 3, "k": 3, "v": 3}, _SHAPES)
        if problem is None:
            problem = heads_problem(q.shape[1], k.shape[1], q.shape[2], k.shape[2])
        if problem is None and (k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]):
            problem = (f"k and v must agree on tokens and heads, got {tuple(k.shape)} and {tuple(v.shape)} "
                       "(total_k, kv_heads, head_dim)")
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            problem = problem or index_problem(name, cu, 1, q.device, "of offsets (batch + 1,)")
        if problem is None and (cu_q.shape[0] < 2 or cu_q.shape != cu_k.shape):
            problem = (f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 2 entries, got "
                       f"{cu_q.shape[0]} and {cu_k.shape[0]}")
        for name, n in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if problem is None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                problem = f"{name} must be a non-negative int, got {n!r}"
        problem = problem or option_problem(is_causal, scale, window, softcap)
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        q, k, _, cu_q, cu_k, max_q, max_k = args[:7]
        problem = varlen_problem(q, k, cu_q, cu_k, max_q, max_k)
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap = args
        return SelectionContext(
            device=q.device, dtype=q.dtype, batch_size=cu_q.shape[0] - 1, seq_len_q=max_q, seq_len_k=max_k,
            num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2], head_dim_v=v.shape[2],
            num_tokens=q.shape[0], is_causal=is_causal, scale=scale, window=window, softcap=softcap is not None,
            requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            is_contiguous=q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
            cuda_graph_capturing=q.is_cuda and torch.cuda.is_current_stream_capturing(),
            compiling=torch.compiler.is_compiling())

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        q, v = args[0], args[2]
        return self.output_meta_check(operation, out, (q.shape[0], q.shape[1], v.shape[-1]), q.dtype, q.device)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return varlen_reference(*args)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        b, sq = ctx.batch_size or 3, ctx.seq_len_q or 16
        sk = ctx.seq_len_k or sq
        lens_q = [max(1, (sq * (b - i)) // b) for i in range(b)]  # ragged, the first one the longest
        lens_k = [max(0, n + sk - sq) for n in lens_q]
        hq = ctx.num_heads or 4
        hkv, d = ctx.num_kv_heads or hq, ctx.head_dim or 32
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        q = torch.randn(sum(lens_q), hq, d, **kw)
        k = torch.randn(sum(lens_k), hkv, d, **kw)
        v = torch.randn(sum(lens_k), hkv, ctx.head_dim_v or d, **kw)
        return (q, k, v, cu_seqlens(lens_q, ctx.device), cu_seqlens(lens_k, ctx.device), max(lens_q),
                max(lens_k), ctx.is_causal, ctx.scale, ctx.window, None)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        m = {**inputs, **kwargs}
        cu_q = pick(m, "cu_seqlens_q", "cu_seq_lens_q", operation=operation)
        cu_k = pick(m, "cu_seqlens_k", "cu_seq_lens_k", default=cu_q)
        max_q = pick(m, "max_seqlen_q", "max_length_q", default=None)
        max_k = pick(m, "max_seqlen_k", "max_length_k", default=None)
        if max_q is None and isinstance(cu_q, torch.Tensor) and cu_q.dim() == 1:  # else validation names cu_q
            max_q = max(lengths(cu_q), default=0)
        if max_k is None and isinstance(cu_k, torch.Tensor) and cu_k.dim() == 1:
            max_k = max(lengths(cu_k), default=0)
        return (pick(m, "query", "q", operation=operation), pick(m, "key", "k", operation=operation),
                pick(m, "value", "v", operation=operation), cu_q, cu_k, max_q, max_k,
                option_flag(m, "is_causal", operation), m.get("scale"), m.get("window"), m.get("softcap"))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, batch_size=b, seq_len_q=sq, seq_len_k=sq,
                                 num_heads=4, num_kv_heads=kv, head_dim=32, is_causal=causal)
                for b, sq, kv, causal in ((3, 16, 4, True), (2, 8, 2, False))]


ATTENTION_VARLEN = VarlenAttentionOp()

_DOC = """Attention over a packed batch: sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q``.

    Args:
        q: ``(total_q, heads, head_dim)``; k, v: ``(total_k, kv_heads, head_dim)`` (GQA/MQA when kv_heads
            divides heads).
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` offsets on q's device, from 0, non-decreasing,
            ending at total_q / total_k (0-length sequences allowed: they own no rows).
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence.
        is_causal: causal per sequence, aligned bottom-right when a sequence's q and k lengths differ
            (FlashAttention's meaning; ``lz.attention`` follows SDPA's upper-left).
        scale: softmax scale (``1/sqrt(head_dim)`` when None).
        window: each query sees the ``window`` keys ending at its own (bottom-right) position; causal.
        softcap: ``tanh(scores / softcap) * softcap`` before masking (Gemma 2).

    Returns:
        ``(total_q, heads, head_dim)`` in q's dtype; a query row that sees no key is zeros.

    Example:
        >>> out = lz.attention_varlen(q, k, v, cu, cu, 512, 512, is_causal=True)
    """

#: ``lz.attention_varlen``'s cached call. The key leaves out the token counts (every packed batch of a
#: training run has another total) and keys ``max_seqlen_*`` by power-of-two bucket, so one plan serves a
#: run; validation's relations between the leading dims are guarded (``k`` and ``v`` of one token count) or
#: are data checks (offsets against the totals, lengths against ``max_seqlen_*``) that the torch kernels make
#: as they read the offsets and that :meth:`VarlenAttentionOp.diagnose` names once a kernel raised.
ATTENTION_VARLEN_CONTRACT = CallContract(
    name="attention_varlen",
    signature="q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False, scale=None, "
              "window=None, softcap=None",
    args="q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window, softcap",
    operation='"attention_varlen"',
    family='("attention_varlen", q.dtype, q.is_cpu or q.device, k.dtype, v.dtype, cu_seqlens_q.dtype, '
           'cu_seqlens_k.dtype, cu_seqlens_q.is_cpu, cu_seqlens_k.is_cpu, is_causal, window, softcap is None)',
    shape="q.shape[1:], k.shape[1:], v.shape[1:], cu_seqlens_q.shape, cu_seqlens_k.shape, "
          "max_seqlen_q.bit_length(), max_seqlen_k.bit_length()",
    guard="(k.shape[0] == v.shape[0] and is_causal.__class__ is bool and max_seqlen_q.__class__ is int "
          "and max_seqlen_k.__class__ is int and max_seqlen_q >= 0 and max_seqlen_k >= 0 "
          "and (window is None or window.__class__ is int) "
          "and (scale is None or (scale.__class__ is float or scale.__class__ is int) "
          "and -FLOAT_MAX <= scale <= FLOAT_MAX) "
          "and (softcap is None or (softcap.__class__ is float or softcap.__class__ is int) and 0 < softcap <= FLOAT_MAX))",
    namespace={"FLOAT_MAX": FLOAT_MAX},
    doc=_DOC,
)

attention_varlen = ATTENTION_VARLEN.bind_contract(ATTENTION_VARLEN_CONTRACT, get_runtime())
