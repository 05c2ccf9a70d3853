"""FlashInfer for ``lz.attention_varlen`` (ragged prefill) and ``lz.attention_paged`` (paged decode / prefill).

Written against flashinfer's ``prefill.py`` / ``decode.py`` wrappers:

* varlen: ``BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")``, ``plan(qo_indptr, kv_indptr, num_qo_heads,
  num_kv_heads, head_dim_qk, causal=, window_left=, logits_soft_cap=, sm_scale=, q_data_type=, kv_data_type=)``
  then ``run(q, k, v)`` on our packed ``(total, heads, head_dim)`` tensors; ``qo_indptr``/``kv_indptr`` are our
  offsets.
* paged: the NHD paged cache ``(num_pages, page_size, kv_heads, head_dim)`` is our cache layout, and the
  block table becomes FlashInfer's CSR page list: ``kv_indptr`` (pages per sequence, cumulated),
  ``kv_indices`` (each sequence's used pages in order) and ``kv_last_page_len``. ``seq_q = 1`` plans a
  ``BatchDecodeWithPagedKVCacheWrapper`` (``plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads,
  head_dim, page_size, ...)``, ``run(q (batch, heads, d), (k_cache, v_cache))``), more a
  ``BatchPrefillWithPagedKVCacheWrapper`` with ``qo_indptr`` in steps of ``seq_q``.

``plan()`` runs once per batch layout (the offsets, lengths and used pages, read to the host as ``plan``
itself does) and the planned wrapper is reused while the layout holds: every layer of a serving step, or
every step of a batch whose pages did not change. FlashInfer aligns ``causal`` and ``window_left`` bottom-right
(query ``i`` at key position ``kv_len - qo_len + i``); our ``window=w`` is ``window_left=w - 1``; the soft cap
is applied to the scaled logits (``logits_soft_cap``). Head dims 64/128/256, fp16/bf16, no autograd.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch

from layerzero import forksafe
from layerzero.backends.flashinfer import HEAD_DIMS, load_library, workspace
from layerzero.context import SelectionContext
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "flashinfer_varlen", "flashinfer_paged", "csr_pages",
           "planned_wrappers"]

_MAX_WRAPPERS = 64

_lock = forksafe.module_lock()
_wrappers: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def planned_wrappers() -> int:
    """How many planned wrappers are cached (for tests and the bench)."""
    return len(_wrappers)


def _cached(key: tuple[Any, ...], make: Any) -> Any:
    with _lock:
        wrapper = _wrappers.get(key)
        if wrapper is not None:
            _wrappers.move_to_end(key)
            return wrapper
    wrapper = make()
    with _lock:
        _wrappers[key] = wrapper
        while len(_wrappers) > _MAX_WRAPPERS:
            _wrappers.popitem(last=False)
    return wrapper


def _common(q: torch.Tensor, k: torch.Tensor, scale: float | None, window: int | None, softcap: float | None
            ) -> dict[str, Any]:
    return {"window_left": -1 if window is None else int(window) - 1, "logits_soft_cap": softcap, "sm_scale": scale,
            "q_data_type": q.dtype, "kv_data_type": k.dtype}


def flashinfer_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    causal = bool(is_causal or window is not None)
    oq, ok = tuple(cu_q.tolist()), tuple(cu_k.tolist())
    key = ("ragged", q.device.type, q.device.index, q.dtype, q.shape[1:], k.shape[1:], causal, scale, window,
           softcap, oq, ok)

    def make() -> Any:
        w = load_library().BatchPrefillWithRaggedKVCacheWrapper(workspace(q.device), "NHD")
        w.plan(cu_q, cu_k, q.shape[1], k.shape[1], q.shape[2], causal=causal, **_common(q, k, scale, window, softcap))
        return w

    return _cached(key, make).run(q, k, v)


def csr_pages(table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """FlashInfer's page list for a block table: ``(kv_indptr, kv_indices, kv_last_page_len, layout key)``."""
    lens = seq_lens.tolist()
    used = [-(-n // page_size) for n in lens]
    rows = table.tolist()
    indices = [p for b, n in enumerate(used) for p in rows[b][:n]]
    indptr = [0]
    for n in used:
        indptr.append(indptr[-1] + n)
    last = [n - (u - 1) * page_size if u else 0 for n, u in zip(lens, used, strict=True)]
    dev = table.device
    as_t = functools.partial(torch.tensor, dtype=torch.int32, device=dev)
    return as_t(indptr), as_t(indices), as_t(last), (tuple(lens), tuple(indices))


def flashinfer_paged(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    b, sq, hq, d = q.shape
    page, hkv = kc.shape[1], kc.shape[2]
    causal = bool(is_causal or window is not None)
    indptr, indices, last, layout = csr_pages(table, seq_lens, page)
    kind = "decode" if sq == 1 else "prefill"
    key = (kind, q.device.type, q.device.index, q.dtype, b, sq, hq, hkv, d, page, causal, scale, window, softcap,
           layout)

    def make() -> Any:
        fi = load_library()
        common = _common(q, kc, scale, window, softcap)
        if kind == "decode":
            w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(q.device), "NHD")
            w.plan(indptr, indices, last, hq, hkv, d, page, pos_encoding_mode="NONE", **common)
        else:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(q.device), "NHD")
            qo_indptr = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
            w.plan(qo_indptr, indptr, indices, last, hq, hkv, d, page, causal=causal, pos_encoding_mode="NONE",
                   **common)
        return w

    wrapper = _cached(key, make)
    if kind == "decode":
        return wrapper.run(q[:, 0], (kc, vc)).unsqueeze(1)
    return wrapper.run(q.reshape(b * sq, hq, d), (kc, vc)).reshape(b, sq, hq, -1)


def _check(ctx: SelectionContext) -> list[Reason]:
    if ctx.head_dim is not None and ctx.head_dim not in HEAD_DIMS:
        return [Reason(ReasonCode.HEAD_DIM_ALIGNMENT,
                       f"head_dim={ctx.head_dim} (FlashInfer kernels: {', '.join(map(str, sorted(HEAD_DIMS)))})")]
    return []


def _specs() -> list[KernelSpec]:
    common: dict[str, Any] = dict(platforms=frozenset({"cuda"}), min_compute_capability=(8, 0),
                                  dtypes=frozenset({torch.float16, torch.bfloat16}), head_dim_v_equal=True,
                                  supports_window=True, supports_softcap=True, supports_autograd=False,
                                  cuda_graph_safe=False, compile_safe=False, extra_check=_check,
                                  tolerance={"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2)})
    return [
        KernelSpec("flashinfer_varlen", "attention_varlen", "flashinfer", flashinfer_varlen, priority=62,
                   description="flashinfer BatchPrefillWithRaggedKVCacheWrapper, planned once per batch layout",
                   **common),
        KernelSpec("flashinfer_paged", "attention_paged", "flashinfer", flashinfer_paged, priority=72,
                   description="flashinfer BatchDecode/BatchPrefillWithPagedKVCacheWrapper (NHD pages), planned "
                               "once per batch layout", **common),
    ]


BACKENDS: tuple[str, ...] = ("flashinfer",)
KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Declare flashinfer (as :mod:`layerzero.backends.flashinfer` does) and add the ragged / paged kernels."""
    backends.register("flashinfer", module="flashinfer", pip="pip install flashinfer-python")
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
