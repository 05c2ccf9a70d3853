"""The FlashInfer backend: single-request prefill, batched prefill and batched decode.

* ``flashinfer_prefill``: ``flashinfer.single_prefill_with_kv_cache(q, k, v,
  causal=, kv_layout="HND", sm_scale=, window_left=)`` for one request
  (batch 1). q goes in as (seq_q, heads, head_dim); k/v stay (kv_heads, seq_k,
  head_dim), which is the "HND" layout, with no copy.
* ``flashinfer_batch_prefill``: ``BatchPrefillWithPagedKVCacheWrapper`` for a
  batch of requests: q becomes FlashInfer's ragged (batch * seq_q, heads,
  head_dim) form with ``qo_indptr = [0, seq_q, 2 * seq_q, ...]``; k/v are the
  paged cache below. ``plan(qo_indptr, kv_indptr, kv_indices, last_page_len,
  heads, kv_heads, head_dim, page_size, causal=, window_left=, ...)`` once per
  shape, ``run(q, (k, v))`` per call.
* ``flashinfer_decode``: ``BatchDecodeWithPagedKVCacheWrapper`` with one page
  per sequence and the HND layout: our k/v (batch, kv_heads, seq_k, head_dim)
  *are* a paged cache of ``batch`` pages of ``seq_k`` tokens, so no copy is
  made. ``plan()`` runs once per shape (a small cache of wrappers sharing one
  128 MiB workspace per device); ``run(q, (k, v))`` per call. A general paged
  KV cache (block tables over a shared page pool) is outside the
  ``lz.attention`` API, whose k/v are dense per-sequence tensors.

FlashInfer aligns causal masks and windows to the lower right (the query
block is the *last* ``seq_q`` positions), so both specs declare
``causal_alignment="lower_right"`` and accept a window only when
``seq_q == seq_k``. Head dims 64, 128 and 256 (the sizes FlashInfer's
prebuilt and JIT kernels cover); fp16/bf16; no explicit mask, no dropout;
inference only (no autograd).

Variants: all three take ``logits_soft_cap`` (``0.0``, the default, is off;
a positive cap computes ``cap * tanh(x / cap)`` on the scaled logits, before
masking, as Gemma 2 does). FlashInfer's ALiBi is ``pos_encoding_mode="ALIBI"``
with its own per-head slopes, not the caller's, and these wrappers take no
sinks, so those variants are rejected.
"""

from __future__ import annotations

import functools
import importlib
from collections import OrderedDict
from typing import Any

import torch

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "flashinfer_prefill", "flashinfer_batch_prefill",
           "flashinfer_decode", "FLASHINFER_KERNEL_IDS", "HEAD_DIMS"]

_PIP = "pip install flashinfer-python"
HEAD_DIMS = frozenset({64, 128, 256})
_WORKSPACE_BYTES = 128 * 1024 * 1024
_MAX_WRAPPERS = 32

_lock = forksafe.module_lock()
_workspaces: dict[tuple[str, int | None], torch.Tensor] = {}
_wrappers: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


@functools.cache
def load_library() -> Any:
    """The flashinfer module, imported once (``cache_clear()`` forgets it); flashinfer_ragged shares it."""
    try:
        return importlib.import_module("flashinfer")
    except ImportError as exc:
        raise ImportError(f"flashinfer is not installed or broken ({exc}); install with: {_PIP}") from exc


def _window_left(window: int | None) -> int:
    return -1 if window is None else int(window) - 1


def _soft_cap(softcap: float | None) -> float:
    return 0.0 if softcap is None else float(softcap)  # logits_soft_cap=0.0 (the default) is off


def flashinfer_prefill(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                       softcap=None, sinks=None, alibi_slopes=None):
    out = load_library().single_prefill_with_kv_cache(
        q[0].transpose(0, 1).contiguous(), k[0].contiguous(), v[0].contiguous(),
        causal=bool(is_causal or window is not None),
        kv_layout="HND", sm_scale=scale, window_left=_window_left(window), logits_soft_cap=_soft_cap(softcap))
    return out.transpose(0, 1).unsqueeze(0)  # (seq_q, heads, d) -> (1, heads, seq_q, d)


def workspace(dev: torch.device) -> torch.Tensor:
    with _lock:
        ws = _workspaces.get((dev.type, dev.index))
        if ws is None:
            ws = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
            _workspaces[(dev.type, dev.index)] = ws
    return ws


def _remember(key: tuple[Any, ...], wrapper: Any) -> Any:
    with _lock:
        _wrappers[key] = wrapper
        while len(_wrappers) > _MAX_WRAPPERS:
            _wrappers.popitem(last=False)
    return wrapper


def _pages(b: int, sk: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Page table of k/v seen as ``b`` HND pages of ``sk`` tokens: indptr, indices, last page lengths."""
    return (torch.arange(b + 1, dtype=torch.int32, device=dev), torch.arange(b, dtype=torch.int32, device=dev),
            torch.full((b,), sk, dtype=torch.int32, device=dev))


def _wrapper(kind: str, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None, window: int | None,
             softcap: float | None = None) -> Any:
    """The planned ``BatchDecodeWithPagedKVCacheWrapper`` (``kind="decode"``) or
    ``BatchPrefillWithPagedKVCacheWrapper`` (``"prefill"``) for this shape, k/v seen as one HND page per
    sequence; planned once, then cached."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dev = q.device
    key = (kind, dev.type, dev.index, q.dtype, b, hq, hkv, sq, sk, d, causal, scale, window, softcap)
    wrapper = _wrappers.get(key)
    if wrapper is not None:
        return wrapper
    fi = load_library()
    indptr, indices, last_len = _pages(b, sk, dev)
    common: dict[str, Any] = dict(pos_encoding_mode="NONE", window_left=_window_left(window), q_data_type=q.dtype,
                                  kv_data_type=k.dtype, sm_scale=scale, logits_soft_cap=_soft_cap(softcap))
    if kind == "decode":
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(dev), "HND")
        wrapper.plan(indptr, indices, last_len, hq, hkv, d, sk, **common)
    else:
        wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(dev), "HND")
        qo_indptr = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=dev)  # steps of seq_q
        wrapper.plan(qo_indptr, indptr, indices, last_len, hq, hkv, d, sk, causal=causal, **common)
    return _remember(key, wrapper)


def flashinfer_batch_prefill(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                             softcap=None, sinks=None, alibi_slopes=None):
    b, hq, sq, d = q.shape
    causal = bool(is_causal or window is not None)
    wrapper = _wrapper("prefill", q, k, causal, scale, window, softcap)
    ragged = q.transpose(1, 2).reshape(b * sq, hq, d)  # (batch * seq_q, heads, d): qo_indptr steps of seq_q
    out = wrapper.run(ragged, (k.contiguous(), v.contiguous()))
    return out.reshape(b, sq, hq, -1).transpose(1, 2)


def flashinfer_decode(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                      softcap=None, sinks=None, alibi_slopes=None):
    wrapper = _wrapper("decode", q, k, False, scale, window, softcap)
    # q: (batch, heads, d); the paged cache: (pages, kv_heads, page_size, d) for k and for v
    out = wrapper.run(q[:, :, 0].contiguous(), (k.contiguous(), v.contiguous()))
    return out.unsqueeze(2)


def _check(ctx: SelectionContext) -> list[Reason]:
    out = []
    if ctx.head_dim is not None and ctx.head_dim not in HEAD_DIMS:
        out.append(Reason(ReasonCode.HEAD_DIM_ALIGNMENT,
                          f"head_dim={ctx.head_dim} (FlashInfer kernels: {', '.join(map(str, sorted(HEAD_DIMS)))})"))
    if ctx.window is not None and ctx.seq_len_q is not None and ctx.seq_len_k is not None \
            and ctx.seq_len_q != ctx.seq_len_k:
        out.append(Reason(ReasonCode.CAUSAL_ALIGNMENT,
                          f"sliding window is anchored lower-right, which differs from layerzero's upper-left window "
                          f"when seq_len_q={ctx.seq_len_q} != seq_len_k={ctx.seq_len_k}"))
    return out


def _decode_check(ctx: SelectionContext) -> list[Reason]:
    out = _check(ctx)
    if ctx.seq_len_q is not None and ctx.seq_len_q != 1:
        out.append(Reason(ReasonCode.CUSTOM, f"decode kernel: seq_len_q={ctx.seq_len_q} (needs exactly 1 query token)"))
    return out


def _specs() -> list[KernelSpec]:
    half = frozenset({torch.float16, torch.bfloat16})
    tol = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2)}
    common: dict[str, Any] = dict(platforms=frozenset({"cuda"}), min_compute_capability=(8, 0), dtypes=half,
                                  head_dim_v_equal=True, mask_kinds=frozenset({"none"}),
                                  causal_alignment="lower_right", supports_dropout=False, supports_autograd=False,
                                  supports_softcap=True, compile_safe=False, tolerance=tol)
    return [
        KernelSpec("flashinfer_prefill", "attention", "flashinfer", flashinfer_prefill, priority=62,
                   max_batch_size=1, supports_window=True, extra_check=_check,
                   description="flashinfer.single_prefill_with_kv_cache (one request, HND k/v)", **common),
        KernelSpec("flashinfer_batch_prefill", "attention", "flashinfer", flashinfer_batch_prefill, priority=61,
                   supports_window=True, cuda_graph_safe=False, extra_check=_check,
                   description="flashinfer BatchPrefillWithPagedKVCacheWrapper: ragged q, one HND page per sequence",
                   **common),
        KernelSpec("flashinfer_decode", "attention", "flashinfer", flashinfer_decode, priority=62,
                   supports_window=False, cuda_graph_safe=False, extra_check=_decode_check,
                   description="flashinfer BatchDecodeWithPagedKVCacheWrapper, one HND page per sequence", **common),
    ]


FLASHINFER_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("flashinfer",)
KERNEL_IDS: tuple[str, ...] = FLASHINFER_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the flashinfer backend and its kernels (idempotent)."""
    backends.register("flashinfer", module="flashinfer", pip=_PIP)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
