"""The torch kernels of ``lz.attention_varlen`` and ``lz.attention_paged``, and their specs.

* ``torch_varlen_sdpa`` / ``torch_paged_sdpa``: one ``F.scaled_dot_product_attention`` per sequence (the
  paged one gathers the sequence's pages into dense K/V first) with a bottom-right boolean mask; softcap
  runs as explicit math in float32. They run on every device and are the always-correct fallback; they
  read the offsets / lengths to the host (a sync on a GPU) and raise ``ValueError`` for bad values,
  which the runtime then names as bad input (``diagnose``).
* ``torch_paged_dense``: every sequence's pages gathered in one ``index_select`` into a padded
  ``(batch, kv_heads, max_pages * page_size, head_dim)`` K/V and one SDPA call with a per-row mask built on
  the device: no host read, no per-sequence loop (its data checks happen only once it raised).
* ``torch_varlen_attn`` / ``torch_paged_varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's
  FlashAttention-2 varlen kernel; CUDA, float16/bfloat16, sm80+). Its signature changed across releases
  (``is_causal=`` early on, ``window_size=``, ``enable_gqa=``, ``seqused_k=`` and ``block_table=`` later),
  so the adapter reads the installed signature and each spec rejects what it lacks.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F

from layerzero.backends.torch.capabilities import FLOATS, GQA_NATIVE, HALF
from layerzero.context import SelectionContext
from layerzero.ragged import attend_math, checked_offsets, gather_pages, keep_mask, paged_problem, zeros_from
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["varlen_specs", "torch_varlen_sdpa", "torch_paged_sdpa", "torch_paged_dense", "torch_varlen_attn",
           "torch_paged_varlen_attn", "varlen_attn_params"]

_CUDA = frozenset({"cuda"})


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
            window: int | None, softcap: float | None) -> torch.Tensor:
    """One sequence ``(s, heads, d)``: SDPA with a bottom-right mask; rows that see no key are zeros."""
    sq, sk = q.shape[0], k.shape[0]
    if softcap is not None:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return attend_math(q, k, v, is_causal, scale, window, softcap, compute).to(q.dtype)
    r0 = max(0, sq - sk) if (is_causal or window is not None) else 0  # rows before r0 see no key
    if sk == 0 or r0 >= sq:
        return zeros_from(q, k, v, sq)
    out = q.new_zeros(sq, q.shape[1], v.shape[-1])
    keep = keep_mask(sq, sk, is_causal, window, q.device)
    qh, kh, vh = q[r0:].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    gqa = qh.shape[0] != kh.shape[0]
    if gqa and not GQA_NATIVE:
        g = qh.shape[0] // kh.shape[0]
        kh, vh, gqa = kh.repeat_interleave(g, 0), vh.repeat_interleave(g, 0), False
    kw = {"enable_gqa": True} if gqa else {}
    res = F.scaled_dot_product_attention(qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0),
                                         attn_mask=None if keep is None else keep[r0:], scale=scale, **kw)
    out[r0:] = res[0].transpose(0, 1)
    return out


def torch_varlen_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    oq, ok = checked_offsets(q, k, cu_q, cu_k, max_q, max_k)
    parts = [_attend(q[oq[b]:oq[b + 1]], k[ok[b]:ok[b + 1]], v[ok[b]:ok[b + 1]], is_causal, scale, window, softcap)
             for b in range(len(oq) - 1)]
    return torch.cat(parts, 0) if parts else zeros_from(q, k, v, 0)


def torch_paged_sdpa(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    problem = paged_problem(q.shape[1], kc.shape[0], kc.shape[1], table, seq_lens)
    if problem is not None:
        raise ValueError(problem)
    outs = [_attend(q[b], gather_pages(kc, table[b], n), gather_pages(vc, table[b], n), is_causal, scale, window,
                    softcap) for b, n in enumerate(seq_lens.tolist())]
    return torch.stack(outs, 0)


def torch_paged_dense(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    b, sq, hq, d = q.shape
    page, hkv = kc.shape[1], kc.shape[2]
    sk = table.shape[1] * page
    if not q.is_cuda:  # a host read costs nothing here: check the page table and lengths as torch_paged_sdpa does
        problem = paged_problem(sq, kc.shape[0], page, table, seq_lens)
        if problem is not None:
            raise ValueError(problem)
    # the slots past a sequence's last used page may hold anything (-1 or a large number as padding): they
    # read page 0, and the keys they bring are masked below
    slots = torch.arange(table.shape[1], device=table.device).view(1, -1)
    used = (seq_lens.long().view(-1, 1) + page - 1) // page
    idx = torch.where(slots < used, table.long(), 0).reshape(-1)
    k = kc.index_select(0, idx).reshape(b, sk, hkv, d).transpose(1, 2)
    v = vc.index_select(0, idx).reshape(b, sk, hkv, vc.shape[-1]).transpose(1, 2)
    pos = (seq_lens.long() - sq).view(b, 1, 1) + torch.arange(sq, device=q.device).view(1, sq, 1)  # query position
    j = torch.arange(sk, device=q.device).view(1, 1, sk)
    keep = j < seq_lens.long().view(b, 1, 1)
    if is_causal or window is not None:
        keep = keep & (j <= pos)
    if window is not None:
        keep = keep & (j > pos - window)
    qh = q.transpose(1, 2)
    if softcap is not None:
        if hq != hkv:
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (1.0 / math.sqrt(d)) if scale is None else scale
        scores = torch.tanh((qh.to(compute) @ k.to(compute).transpose(-2, -1)) * s / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~keep.unsqueeze(1), float("-inf")), -1)
        return (torch.nan_to_num(probs, nan=0.0) @ v.to(compute)).to(q.dtype).transpose(1, 2)
    if hq != hkv and not GQA_NATIVE:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    kw = {"enable_gqa": True} if hq != k.shape[1] else {}
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=keep.unsqueeze(1), scale=scale, **kw)
    return torch.where(keep.any(-1).unsqueeze(1).unsqueeze(-1), out, 0).transpose(1, 2)


# -- torch.nn.attention.varlen.varlen_attn --------------------------------------------------------------------

@functools.cache
def varlen_attn_params() -> frozenset[str]:
    """The keyword parameters of this torch's ``varlen_attn`` (empty when it has none)."""
    try:
        fn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return frozenset()
    return frozenset(inspect.signature(fn).parameters)


def _varlen_attn_call(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, **extra):  # type: ignore[no-untyped-def]
    fn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    params = varlen_attn_params()
    kw = dict(extra)
    if scale is not None:
        kw["scale"] = scale
    if "window_size" in params:
        if is_causal or window is not None:
            kw["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kw["is_causal"] = bool(is_causal)
    if q.shape[1] != k.shape[-2]:
        kw["enable_gqa"] = True
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    return _varlen_attn_call(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window)


def torch_paged_varlen_attn(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    b, sq, hq, d = q.shape
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = _varlen_attn_call(q.reshape(b * sq, hq, d), kc, vc, cu_q, None, sq, table.shape[1] * kc.shape[1],
                            is_causal, scale, window, seqused_k=seq_lens, block_table=table)
    return out.reshape(b, sq, hq, -1)


def _varlen_attn_check(ctx: SelectionContext) -> list[Reason]:
    params = varlen_attn_params()
    out = []
    if not params:
        out.append(Reason(ReasonCode.BACKEND_UNAVAILABLE,
                          f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"))
        return out
    if ctx.window is not None and "window_size" not in params:
        out.append(Reason(ReasonCode.WINDOW_UNSUPPORTED, "this torch's varlen_attn has no window_size argument"))
    if ctx.is_gqa and "enable_gqa" not in params:
        out.append(Reason(ReasonCode.GQA_UNSUPPORTED, "this torch's varlen_attn has no enable_gqa argument"))
    return out


_FA2_PAGE = 256  # FlashAttention-2's paged KV: "Paged KV cache block size must be divisible by 256"


def _paged_varlen_attn_check(ctx: SelectionContext) -> list[Reason]:
    out = _varlen_attn_check(ctx)
    params = varlen_attn_params()
    if params and not {"block_table", "seqused_k"} <= params:
        out.append(Reason(ReasonCode.BACKEND_UNAVAILABLE,
                          f"torch {torch.__version__}'s varlen_attn takes no block_table / seqused_k"))
    page = ctx.hidden_size  # the paged op's context carries the page size here
    if page is not None and page % _FA2_PAGE:
        out.append(Reason(ReasonCode.CUSTOM, f"page_size={page} is not a multiple of {_FA2_PAGE} "
                                             "(FlashAttention-2's paged kernel)"))
    return out


def varlen_specs(tol: dict[str, tuple[float, float]]) -> list[KernelSpec]:
    """The torch specs of ``attention_varlen`` and ``attention_paged``."""
    flash = dict(platforms=_CUDA, min_compute_capability=(8, 0), dtypes=HALF, head_dim_max=256,
                 head_dim_multiple=8, head_dim_v_equal=True, tolerance=tol)
    return [
        KernelSpec("torch_varlen_attn", "attention_varlen", "torch", torch_varlen_attn, priority=70,
                   supports_window=True, extra_check=_varlen_attn_check, compile_safe=True,
                   description="torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention-2 varlen)",
                   **flash),  # type: ignore[arg-type]
        KernelSpec("torch_varlen_sdpa", "attention_varlen", "torch", torch_varlen_sdpa, priority=20, dtypes=FLOATS,
                   supports_window=True, supports_softcap=True, cuda_graph_safe=False, compile_safe=False,
                   tolerance=tol, description="F.scaled_dot_product_attention per sequence (any device; reads "
                                              "the offsets to the host)"),
        KernelSpec("torch_paged_varlen_attn", "attention_paged", "torch", torch_paged_varlen_attn, priority=70,
                   supports_window=True, supports_autograd=False, extra_check=_paged_varlen_attn_check,
                   description="varlen_attn with block_table and seqused_k (PyTorch's FlashAttention-2, paged)",
                   **flash),  # type: ignore[arg-type]
        KernelSpec("torch_paged_dense", "attention_paged", "torch", torch_paged_dense, priority=30, dtypes=FLOATS,
                   supports_window=True, supports_softcap=True, tolerance=tol,
                   description="pages gathered into padded dense K/V, one masked SDPA call (no host read)"),
        KernelSpec("torch_paged_sdpa", "attention_paged", "torch", torch_paged_sdpa, priority=20, dtypes=FLOATS,
                   supports_window=True, supports_softcap=True, cuda_graph_safe=False, compile_safe=False,
                   tolerance=tol, description="pages gathered per sequence, then SDPA per sequence (any device; "
                                              "reads the lengths and page table to the host)"),
    ]
