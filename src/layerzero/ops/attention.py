"""``lz.attention``: scaled dot-product attention with kernel selection.

Kernels of the ``attention`` family are called with the canonical arguments
``(q, k, v, attn_mask, is_causal, dropout_p, scale, window)`` in BHSD layout,
and, only when a call has an attention variant, three more:
``(..., softcap, sinks, alibi_slopes)``. A call without variants passes the
eight arguments alone, so kernels written for them (which do not declare
``supports_softcap`` / ``supports_sinks`` / ``supports_alibi`` and are never
selected for a variant call) keep working unchanged.
(batch, heads, sequence, head_dim); BSHD inputs are handed over as transposed
views and the output is transposed back, so it comes back in the caller's
layout. ``is_causal`` means what it means in
``F.scaled_dot_product_attention``: upper-left aligned when Sq != Sk.
``window`` (sliding-window attention) lets each query see the ``window`` most
recent keys up to its own position (causal).

The variants, in the order the reference applies them to the scores
``s = q k^T * scale`` of query ``i`` and key ``j`` of head ``h``:

* ``softcap`` ``c`` (Gemma 2): ``s = tanh(s / c) * c``, before any mask;
* ``alibi_slopes`` (FlashAttention's definition): ``s -= slope[h] * |i + seq_k - seq_q - j|``;
* the causal / window / explicit masks;
* ``sinks`` (GPT-OSS): a per-head logit ``sinks[h]`` joins each row's softmax as one more column, which is
  dropped afterwards: ``p_j = exp(s_j) / (exp(sinks[h]) + sum_j' exp(s_j'))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from layerzero.accel import attention_hit
from layerzero.context import SelectionContext
from layerzero.ops.base import (FLOAT_MAX, GUARD_NAMES, OpDef, default_generator, finite_number, kind, largest,
                                layout_problem, number_guard, option_flag, option_number, pick, shown,
                                window_problem)
from layerzero.ops.contract import CallContract
from layerzero.ops.names import OPERATIONS, operation_problem
from layerzero.policy.scope import LIVE
from layerzero.runtime import get_runtime
from layerzero.ops.attention_variants import variant_key, variant_problem, variants_admitted
from layerzero.tensor_helpers import alibi_bias, holds_in_dtype, masked_softmax, softcapped, window_mask

__all__ = ["attention", "ATTENTION", "AttentionOp", "attention_reference", "window_mask", "gqa_refused"]

_LAYOUTS = ("BHSD", "BSHD")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
                        window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                        alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference in BHSD (no dropout): softmax(q k^T * scale + mask) v, GQA by head repetition, with the
    variants applied as the module docstring orders them."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k64 = k64.repeat_interleave(hq // hkv, dim=1)
        v64 = v64.repeat_interleave(hq // hkv, dim=1)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcapped((q64 @ k64.transpose(-2, -1)) * s, softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.shape[2], k.shape[2], torch.float64)
    keep = window_mask(q.shape[2], k.shape[2], window, is_causal, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.double()
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:  # fully masked rows give 0, like SDPA's math kernel on new torch
        probs = masked_softmax(scores)
    return probs @ v64


class AttentionOp(OpDef):
    family = "attention"
    arg_names = ("q", "k", "v", "attn_mask", "is_causal", "dropout_p", "scale", "window", "softcap", "sinks",
                 "alibi_slopes")
    input_aliases = ("query", "key", "value", "mask", "layout", "enable_gqa")
    grad_inputs = ("q", "k", "v")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        """Name the first problem of ``args`` (the eight canonical arguments, or eleven with the variants)."""
        q, k, v, mask, is_causal, dropout_p, scale, window, *variants = args
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise self.invalid(operation, f"{name} must be a torch.Tensor, got {type(t).__name__}", args)
        for name, t in (("q", q), ("k", k), ("v", v)):
            problem = layout_problem(name, t)
            if problem is not None:
                raise self.invalid(operation, problem, args)
            if t.dim() != 4:
                raise self.invalid(operation, f"{name} must be 4-D (batch, heads, seq, head_dim), got {t.dim()}-D", args)
        if not (q.dtype == k.dtype == v.dtype):
            raise self.invalid(operation, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}", args)
        if not q.is_floating_point():
            raise self.invalid(operation, f"attention needs floating-point inputs, got {q.dtype}", args)
        if not (q.device == k.device == v.device):
            raise self.invalid(operation, f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}", args)
        b, hq, sq, d = q.shape
        bk, hkv, sk, dk = k.shape
        bv, hv, sv, dv = v.shape
        if dk != d:
            raise self.invalid(operation, f"q and k head dims differ: {d} vs {dk}", args)
        if not (b == bk == bv):
            raise self.invalid(operation, f"batch sizes differ: q={b}, k={bk}, v={bv}", args)
        if hkv != hv or sk != sv:
            raise self.invalid(operation, f"k and v must agree on heads and sequence length, got {tuple(k.shape)} "
                                          f"and {tuple(v.shape)} (BHSD)", args)
        if hkv == 0 or hq % hkv:
            raise self.invalid(operation, f"query heads ({hq}) must be divisible by key/value heads ({hkv}) "
                                          "for grouped-query attention", args)
        if d == 0 or dv == 0 or sq == 0 or sk == 0 or b == 0 or hq == 0:
            raise self.invalid(operation, "empty attention inputs (a zero-sized dimension)", args)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise self.invalid(operation, f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}", args)
            problem = layout_problem("attn_mask", mask)
            if problem is not None:
                raise self.invalid(operation, problem, args)
            if mask.device != q.device:
                raise self.invalid(operation, f"attn_mask is on {mask.device}, q on {q.device}", args)
            if mask.dtype != torch.bool and mask.dtype != q.dtype:
                raise self.invalid(operation, f"attn_mask must be bool or {q.dtype}, got {mask.dtype}", args)
            if not 2 <= mask.dim() <= 4:
                raise self.invalid(operation, f"attn_mask must have 2 to 4 dimensions (broadcastable to (batch, heads, "
                                              f"seq_q, seq_k)), got {mask.dim()}-D", args)
            # each of the mask's trailing dims is the target's or 1 (compared as ints: under torch.compile
            # ``torch.broadcast_shapes`` raises the tracer's own error, which no ``except`` here would see)
            target = (b, hq, sq, sk)[4 - mask.dim():]
            if not all(m == t or m == 1 for m, t in zip(mask.shape, target, strict=True)):
                raise self.invalid(operation, f"attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                                              f"(batch, heads, seq_q, seq_k)=({b}, {hq}, {sq}, {sk})", args)
        if not isinstance(is_causal, bool):
            raise self.invalid(operation, f"is_causal must be a bool, got {kind(is_causal)}", args)
        if mask is not None and is_causal:
            raise self.invalid(operation, "attn_mask and is_causal=True cannot be combined (as in SDPA)", args)
        if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise self.invalid(operation, f"dropout_p must be in [0, 1), got {shown(dropout_p)}", args)
        if scale is not None and not finite_number(scale):
            raise self.invalid(operation, f"scale must be a finite number or None, got {shown(scale)}", args)
        if scale is not None and scale <= 0 and (is_causal or window is not None):
            raise self.invalid(operation, f"scale={scale!r} with a causal mask or window: PyTorch's flash kernels "
                                          "return NaN there (-inf * 0); a scale must be > 0 with them", args)
        problem = window_problem(window)
        if problem is not None:
            raise self.invalid(operation, problem, args)
        problem = variant_problem(q, *variants)
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        q, k, v, mask, is_causal, dropout_p, scale, window, *variants = args
        softcap, sinks, alibi = (*variants, None, None, None)[:3]
        return SelectionContext.from_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                               scale=scale, layout="BHSD", window=window, softcap=softcap,
                                               sinks=sinks, alibi_slopes=alibi)

    def consumes_rng(self, operation: str, ctx: SelectionContext) -> bool:
        return ctx.dropout_p > 0

    def generator(self, operation: str, args: tuple[Any, ...]) -> torch.Generator | None:
        dropout_p = args[5]
        return default_generator(args[0].device) if dropout_p and dropout_p > 0 else None

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        q, v = args[0], args[2]
        return self.output_meta_check(operation, out, (*q.shape[:3], v.shape[-1]), q.dtype, q.device)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return attention_reference(*args)

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """No dropout (the reference has none), and scores the inputs' dtype holds: beyond it (``scale=1e308``,
        huge values) a kernel's NaN is the dtype's limit, not its fault."""
        q, k, _, _, _, dropout_p, scale, *_ = args
        if dropout_p:
            return False
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else abs(scale)
        return holds_in_dtype(s * largest(q) * largest(k) * q.shape[-1], q.dtype)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        b = ctx.batch_size or 1
        hq = ctx.num_heads or 8
        hkv = ctx.num_kv_heads or hq
        sq = ctx.seq_len_q or 16
        sk = ctx.seq_len_k or sq
        d = ctx.head_dim or 64
        dv = ctx.head_dim_v or d
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        q = torch.randn(b, hq, sq, d, **kw)
        k = torch.randn(b, hkv, sk, d, **kw)
        v = torch.randn(b, hkv, sk, dv, **kw)
        mask = None
        if ctx.mask_kind == "bool":
            mask = torch.rand(sq, sk, device=ctx.device, generator=generator) > 0.2
            mask[:, 0] = True
        elif ctx.mask_kind == "additive":
            mask = torch.randn(sq, sk, device=ctx.device, generator=generator).to(kw["dtype"])
        is_causal = ctx.is_causal or operation == "attention.causal"
        args = (q, k, v, mask, is_causal, ctx.dropout_p, ctx.scale, ctx.window)
        if not (ctx.softcap or ctx.sinks or ctx.alibi):
            return args
        sinks = torch.randn(hq, **kw) if ctx.sinks else None
        alibi = (torch.rand(hq, device=ctx.device, generator=generator) * 0.5 + 0.01) if ctx.alibi else None
        return (*args, 5.0 if ctx.softcap else None, sinks, alibi)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        q = pick(merged, "query", "q", operation=operation)
        k = pick(merged, "key", "k", operation=operation)
        v = pick(merged, "value", "v", operation=operation)
        mask = pick(merged, "attn_mask", "mask", default=None)
        is_causal = option_flag(merged, "is_causal", operation)
        if not is_causal and merged.get("is_causal") is not None and operation.endswith(".causal"):
            raise self.invalid(operation, f"is_causal=False contradicts the operation ({operation} is causal; "
                                          "'attention.full' is not)", (q, k, v))
        is_causal = is_causal or operation.endswith(".causal")
        enable_gqa = merged.get("enable_gqa")
        if enable_gqa is not None and enable_gqa is not True:  # SDPA's spelling, as lz.attention reads it
            gqa_refused(operation, enable_gqa, q, k, v)
        args = (q, k, v, mask, is_causal, option_number(merged, "dropout_p", 0.0, operation), merged.get("scale"),
                merged.get("window"))
        variants = (merged.get("softcap"), merged.get("sinks"), merged.get("alibi_slopes"))
        return args if all(x is None for x in variants) else (*args, *variants)

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        causal = operation.endswith("causal")
        return [SelectionContext(device=device, dtype=torch.float32, batch_size=b, seq_len_q=sq, seq_len_k=sk,
                                 num_heads=8, num_kv_heads=8, head_dim=64, is_causal=causal)
                for b, sq, sk in ((1, 1, 128), (2, 64, 64), (4, 128, 128))]


ATTENTION = AttentionOp()
_OP_CAUSAL = "attention.causal"
_OP_FULL = "attention.full"


def _bad_operation(operation: Any, q: Any, k: Any, v: Any) -> Exception:
    return ATTENTION.invalid("attention", f"operation must be 'attention' or an 'attention.*' name, got {operation!r}",
                             (q, k, v))


def operation_name_problem(operation: str) -> str | None:
    """What is wrong with ``operation`` as an ``lz.attention(operation=...)`` name, or None: it must be a
    built-in attention operation or one a registered kernel declares (or one below it), as ``dispatch()``
    requires: the family's kernels serve any ``attention.*`` name by prefix, so a misspelling would run as full
    attention."""
    if operation in OPERATIONS:
        return None
    return operation_problem(operation, (s.operation for s in get_runtime().kernels))


def gqa_refused(operation: str, enable_gqa: Any, q: Any, k: Any, v: Any) -> None:
    """``enable_gqa=False`` (or another non-bool) as ``F.scaled_dot_product_attention`` reads it: query heads
    that differ from the key/value heads are refused. Left out (None) or True, grouped-query attention runs, as
    layerzero always runs it. ``q``, ``k``, ``v`` are BHSD; what is not a 4-D tensor is left for validation."""
    if not isinstance(enable_gqa, bool):
        raise ATTENTION.invalid(operation, f"enable_gqa must be a bool or None, got {enable_gqa!r}", (q, k, v))
    try:
        hq, hkv = q.shape[1], k.shape[1]
    except (AttributeError, IndexError, TypeError):
        return
    if hq != hkv:
        raise ATTENTION.invalid(operation, f"query heads ({hq}) differ from key/value heads ({hkv}) and enable_gqa="
                                           "False (as in SDPA); pass enable_gqa=True, or leave it out: layerzero "
                                           "runs grouped-query attention by default", (q, k, v))


def _bad_layout(operation: str, layout: Any, q: Any, k: Any, v: Any) -> Exception:
    return ATTENTION.invalid(operation, f"layout must be one of {_LAYOUTS}, got {layout!r}", (q, k, v))


def names_and_layout(operation: Any, is_causal: Any, layout: Any, q: Any, k: Any, v: Any,
                     problem_of: Callable[[str], str | None] | None = None) -> tuple[str, Any]:
    """``(operation, is_causal)`` as ``lz.attention``'s prologue reads them, for entry points that do not run it
    (the torch.compile stand-in): the operation name checked and defaulted, ``attention.causal`` making the call
    causal, ``layout`` one of ``BHSD``/``BSHD``; raises the prologue's errors. ``problem_of`` replaces
    :func:`operation_name_problem` (a trace calls a constant-result wrapper of it: Dynamo cannot trace difflib)."""
    if operation is None:
        operation = _OP_CAUSAL if is_causal else _OP_FULL
    elif operation.__class__ is not str or not operation.startswith("attention") or operation[9:10] not in ("", "."):
        raise _bad_operation(operation, q, k, v)
    elif operation == _OP_CAUSAL:
        is_causal = True
    elif operation not in OPERATIONS:
        problem = (problem_of or operation_name_problem)(operation)
        if problem is not None:
            raise ATTENTION.invalid(operation, problem, (q, k, v))
    if layout != "BHSD" and layout != "BSHD":
        raise _bad_layout(operation, layout, q, k, v)
    return operation, is_causal


def _bhsd(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
    """BSHD views as BHSD (what is not a tensor of rank >= 3 is left for validation to name)."""
    try:
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    except (AttributeError, TypeError, IndexError, RuntimeError):
        return q, k, v


_DOC = """Scaled dot-product attention through the fastest correct kernel here.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)`` (``layout="BHSD"``, the default, as in
            ``F.scaled_dot_product_attention``) or ``(batch, seq, heads, head_dim)`` (``"BSHD"``).
            k and v may have fewer heads than q (GQA/MQA) when the query heads divide evenly.
        attn_mask: boolean (True = attend) or additive float mask of 2 to 4 dimensions broadcastable to
            (B, H, Sq, Sk) (it may not add dimensions or sizes of its own, and is on q's device).
        is_causal: causal mask, upper-left aligned when Sq != Sk (SDPA's meaning).
        dropout_p: attention dropout probability (applied as SDPA does; use 0.0 for inference).
        scale: softmax scale; ``1/sqrt(head_dim)`` when None.
        layout: ``"BHSD"`` or ``"BSHD"``; the output comes back in the same layout.
        window: sliding-window size (each query sees at most ``window`` keys ending at itself).
        enable_gqa: as in ``F.scaled_dot_product_attention``: False refuses k/v with fewer heads than q; left
            out (None) or True, grouped-query attention runs (layerzero's default).
        softcap: attention-logit softcapping (Gemma 2): scores become ``tanh(scores / softcap) * softcap``
            after scaling, before any mask; a finite positive number.
        sinks: ``(heads,)`` per-head sink logits (GPT-OSS), float32 or q's dtype: each joins its head's
            softmax denominator as one more column, then is dropped.
        alibi_slopes: ``(heads,)`` or ``(batch, heads)`` float32 ALiBi slopes; adds
            ``-slope * |i + seq_k - seq_q - j|`` to the score of query ``i`` and key ``j`` (FlashAttention's
            definition: for causal self-attention ``-slope * (i - j)``).
        operation: override the operation name (``"attention.decode"``, ``"attention.prefill"``, ...):
            a built-in ``attention.*`` name or one a registered kernel declares (a misspelling is an
            ``InvalidInputError``); ``attention.causal`` when ``is_causal`` else ``attention.full`` by default.
            ``operation="attention.causal"`` is causal attention whatever ``is_causal`` says (its default,
            False, cannot be told from an explicit one); the name selects, policies match and the mask is
            ``is_causal``'s for every other name.

    Example:
        >>> out = lz.attention(q, k, v, is_causal=True)
    """

#: ``lz.attention``'s cached call. The shape-free plan (torch_sdpa / torch_sdpa_gqa) serves a call only when
#: the shapes are ones SDPA would not quietly broadcast or accept where validation rejects them: 4-D q and
#: k (the ``reads`` unpack their shapes: any other rank raises, which sends the call to validation), v of k's shape (PyTorch's CPU flash kernel reads k's sequence length of v without checking it), one
#: batch size, no empty dimension, no mask (a mask's shape is in the exact key). ``is_causal`` must be a
#: bool, ``window`` an int and ``scale`` a finite number: their keys compare ``1 == True``, ``2.0 == 2``,
#: and ``scale`` is not keyed. A call with a variant (``softcap``, ``sinks``, ``alibi_slopes``) passes them as
#: three more kernel arguments (``*variants``; none at all without one, so eight-argument kernels keep working),
#: its family key gains their :func:`variant_key`, and :func:`variants_admitted` guards what that key leaves out.
#: Variant plans never carry a ``direct`` form (no SDPA specialization is made for them).
ATTENTION_CONTRACT = CallContract(
    name="attention",
    signature="q, k, v, *, attn_mask=None, is_causal=False, dropout_p=0.0, scale=None, layout='BHSD', window=None, "
              "softcap=None, sinks=None, alibi_slopes=None, operation=None, enable_gqa=None",
    args="q, k, v, attn_mask, is_causal, dropout_p, scale, window, *variants",
    operation="operation",
    prologue="""
if operation is None and layout == "BHSD":
    operation = OP_CAUSAL if is_causal else OP_FULL
else:  # a name given, or another layout: both checked (names_and_layout)
    operation, is_causal = names_and_layout(operation, is_causal, layout, q, k, v)
bshd = layout == "BSHD"
if bshd:
    q, k, v = bhsd(q, k, v)
if enable_gqa is not None and enable_gqa is not True:
    gqa_refused(operation, enable_gqa, q, k, v)
variants = () if softcap is None and sinks is None and alibi_slopes is None else (softcap, sinks, alibi_slopes)
""",
    family="((operation, q.dtype, q.is_cpu or q.device, is_causal, dropout_p, window, "
           "None if attn_mask is None else (attn_mask.dtype, attn_mask.device)) if not variants else "
           "(operation, q.dtype, q.is_cpu or q.device, is_causal, dropout_p, window, "
           "None if attn_mask is None else (attn_mask.dtype, attn_mask.device), variant_key(*variants)))",
    reads="qb, qh, qsq, qd = qs = q.shape\nkb, kh, ksk, kd = ks = k.shape",
    shape="qs, ks, v.shape, None if attn_mask is None else attn_mask.shape",
    shape_free=True,
    family_guard="(attn_mask is None and ks == v.shape and qb == kb and qd == kd and not qh % kh "
                 "and qb and qh and qsq and qd and ksk)",
    guard="(is_causal.__class__ is bool and (window is None or window.__class__ is int) and (scale is None or "
          "(scale.__class__ is float or scale.__class__ is int) and -FLOAT_MAX <= scale <= FLOAT_MAX "
          "and (scale > 0 or not is_causal and window is None)) "
          "and (not variants or variants_admitted(q, *variants)) and " + number_guard("dropout_p") + ")",
    direct="plan.direct(q, k, v)",  # PyTorch's SDPA itself: q, k and v say it all
    direct_when="scale is None",
    result="out.transpose(1, 2) if bshd else out",
    namespace={"FLOAT_MAX": FLOAT_MAX, "OP_CAUSAL": _OP_CAUSAL, "OP_FULL": _OP_FULL, "names_and_layout": names_and_layout,
               "bhsd": _bhsd, "variant_key": variant_key,
               "variants_admitted": variants_admitted, "gqa_refused": gqa_refused, **GUARD_NAMES},
    doc=_DOC,
    compiled=lambda runtime: attention_hit(runtime, LIVE, _OP_FULL, _OP_CAUSAL),
)

attention = ATTENTION.bind_contract(ATTENTION_CONTRACT, get_runtime())
